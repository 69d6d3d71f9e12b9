"""Online RL end to end on a tiny random model with SmolLM2's tokenizer: one GRPO step is the same at TP=2 and
dp_shard=2 as on one process, the first epoch's ratio is 1, skipping the old log-prob forward (one optimizer
step per rollout) changes no number, the reference page's metrics are all logged, and a resumed run continues
the same trajectory (same rollouts, same losses)."""
from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
from helpers import REPO, run_entry, tiny_model

from aligner.models.fetch import fetch_model
from aligner.models.hf import save_hf_checkpoint

HERE = Path(__file__).resolve().parent
REWARDS = f"{HERE / 'online_rewards.py'}"
OLD_PASS = HERE / "online_old_pass.py"  # the entry point with the old log-prob forward forced on
REFERENCE_METRICS = ("eps", "objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
                     "objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg",
                     "policy/entropy_avg", "val/ratio", "val/ratio_var", "val/num_eos_tokens", "lr", "episode")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    rows = [{"prompt": f"What is {a} + {b}?", "solution": str(a + b)} for a, b in
            [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4), (6, 1), (8, 3)]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def overrides(algorithm: str, model_dir: Path, out: Path, data: Path, **extra) -> list[str]:
    length_key = "max_completion_length" if algorithm == "grpo" else "response_length"
    kw = {
        "model.path": model_dir, "model.arch": "null", "data.train": data, "data.validation": "null",
        "trainer.output_dir": out, "trainer.global_batch_size": 4, "trainer.micro_batch_size": 4,
        "trainer.max_seq_len": 128, "trainer.max_steps": 2, "trainer.save_interval": 0,
        "trainer.val_check_interval": 0, "optim.lr": 1e-3, "optim.sched.name": "constant",
        "logger.progress_bar": False, "generation.compile": False, "generation.dtype": "float32",
        f"{algorithm}.{length_key}": 8, f"{algorithm}.reward_funcs": f"[{REWARDS}:length]",
        f"{algorithm}.num_sample_generations": 1,
    }
    kw.update(extra)
    return [f"{k}={v}" for k, v in kw.items()]


def run(algorithm: str, args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    return run_entry(REPO / "examples" / f"train_{algorithm}.py", args, nproc, timeout=600)


def metrics(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def test_grpo_step_is_the_same_at_tp2_and_dp_shard2(tiny_dir, prompts, tmp_path):
    extra = {"grpo.num_generations": 4, "trainer.max_steps": 1}
    results = {}
    for name, layout, nproc in (("single", {}, 1), ("tp2", {"parallel.tp": 2}, 2), ("fsdp2", {"parallel.dp_shard": 2}, 2)):
        out = tmp_path / name
        run("grpo", overrides("grpo", tiny_dir, out, prompts, **extra, **layout), nproc=nproc)
        results[name] = metrics(out)[1]
    single = results["single"]
    for key in REFERENCE_METRICS:
        assert key in single, key
    assert abs(single["val/ratio"] - 1.0) < 1e-6 and single["val/ratio_var"] < 1e-10  # first epoch: ratio 1
    assert single["policy/clipfrac_avg"] == 0.0 and single["objective/kl"] == 0.0  # no reference (beta 0)
    assert single["objective/scores_std"] > 0.0 and single["train/grad_norm"] > 0.0  # a real update
    assert single["episode"] == 16.0
    for name in ("tp2", "fsdp2"):
        m = results[name]
        assert m["objective/scores"] == pytest.approx(single["objective/scores"], abs=1e-6), name  # same rollouts
        for key in ("loss/policy_avg", "policy/entropy_avg", "objective/entropy", "train/grad_norm"):
            # Equal to float32 rounding: objective/entropy is a per-sequence sum of ~86, where one float32 ulp
            # is 7.6e-6 and another summation order (FSDP, TP) moves it by one or two (1.1e-5 on an AVX2 CPU).
            assert m[key] == pytest.approx(single[key], rel=1e-6, abs=1e-5), (name, key)


# Everything the old log-prob forward fed: the statistics of the old log-probs, and the loss and update.
OLD_PASS_METRICS = ("objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
                    "objective/negative_kl_frac", "rollout/logprob_mismatch", "objective/scores", "loss/policy_avg",
                    "train/grad_norm", "policy/entropy_avg", "policy/approxkl_avg", "policy/clipfrac_avg",
                    "val/ratio", "val/ratio_var")


@pytest.mark.parametrize("algorithm, extra", [
    # beta > 0: a reference model, so objective/kl moves off 0 at step 2; four micro-batches per step.
    ("grpo", {"grpo.num_generations": 4, "grpo.beta": 0.04}),
    ("grpo", {"grpo.num_generations": 4, "grpo.loss_type": "dr_grpo", "trainer.micro_batch_size": 8}),
    # Sequence-level ratio; without a KL in the reward the advantages need no old log-probs either.
    ("rloo", {"rloo.rloo_k": 2, "rloo.num_ppo_epochs": 1, "rloo.kl_coef": 0.0}),
], ids=["grpo_beta", "grpo_dr_grpo", "rloo_no_kl"])
def test_one_step_per_rollout_skips_the_old_logprob_forward_and_changes_no_number(
        tiny_dir, prompts, tmp_path, algorithm, extra):
    skipped, forced = tmp_path / "skipped", tmp_path / "forced"
    run(algorithm, overrides(algorithm, tiny_dir, skipped, prompts, **extra))
    run_entry(OLD_PASS, [algorithm, *overrides(algorithm, tiny_dir, forced, prompts, **extra)], timeout=600)
    a, b = metrics(skipped), metrics(forced)
    for step in (1, 2):
        for key in OLD_PASS_METRICS:
            assert a[step][key] == pytest.approx(b[step][key], rel=0, abs=1e-5), (step, key)
        assert a[step]["val/ratio"] == 1.0 and a[step]["policy/clipfrac_avg"] == 0.0  # exactly, by construction
        assert a[step]["objective/entropy"] > 1.0 and a[step]["train/grad_norm"] > 0.0  # real numbers compared
    if "grpo.beta" in extra:
        assert a[2]["objective/kl"] != 0.0  # the policy moved off the reference: the KL was compared for real
        assert a[1]["objective/kl"] == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("algorithm, settings, skipped", [
    ("grpo", [], True),  # the defaults: one iteration, one mini-batch
    ("grpo", ["grpo.beta=0.04"], True),  # GRPO's KL is a loss term: the advantages never need old log-probs
    ("grpo", ["grpo.num_iterations=2"], False),
    ("grpo", ["grpo.num_mini_batches=2"], False),
    ("rloo", ["rloo.num_ppo_epochs=1"], False),  # rloo.kl_coef 0.05 in the reward needs them before training
    ("rloo", ["rloo.num_ppo_epochs=1", "rloo.kl_coef=0"], True),
    ("reinforce", [], False),  # one epoch, but a KL penalty in the reward
    ("ppo", ["ppo.num_ppo_epochs=1", "ppo.kl_coef=0"], True),
    ("ppo", ["ppo.num_ppo_epochs=1"], False),
])
def test_the_old_logprob_forward_is_skipped_only_where_nothing_needs_it(algorithm, settings, skipped):
    from aligner.config import load_config
    from aligner.trainers.online import OnlineSettings, old_from_training_forward

    cfg = load_config(algorithm, settings)
    assert old_from_training_forward(OnlineSettings(algorithm, getattr(cfg, algorithm))) is skipped


@pytest.mark.parametrize("algorithm", ["ppo", "rloo"])
def test_stop_token_settings_follow_the_reference_config(algorithm):
    """TRL's stop_token / stop_token_id: ``eos`` keeps the EOS stop even with generation.ignore_eos, an id is
    one more stop token, the two exclude each other, anything else is an error naming the key."""
    from aligner.config import load_config
    from aligner.trainers.online import OnlineSettings, stop_settings

    def settings(*overrides):
        cfg = load_config(algorithm, list(overrides))
        return OnlineSettings(algorithm, getattr(cfg, algorithm)), cfg.generation

    s, gen = settings()
    assert s.forward_batch_size == 64 and stop_settings(s, gen, 100, "m") == ([], False)
    assert stop_settings(*settings("generation.ignore_eos=true"), 100, "m") == ([], True)
    assert stop_settings(*settings("generation.ignore_eos=true", f"{algorithm}.stop_token=eos"), 100, "m") == ([], False)
    s, gen = settings("generation.stop_token_ids=[5]", f"{algorithm}.stop_token_id=7",
                      f"{algorithm}.local_rollout_forward_batch_size=2")
    assert stop_settings(s, gen, 100, "m") == ([5, 7], False) and s.forward_batch_size == 2
    with pytest.raises(ValueError, match=rf"{algorithm}.stop_token_id=7 is not a token id of m's tokenizer \(0 to 6\)"):
        stop_settings(s, gen, 7, "m")
    with pytest.raises(ValueError, match=rf"{algorithm}.stop_token='newline' is not null or 'eos'"):
        settings(f"{algorithm}.stop_token=newline")
    with pytest.raises(ValueError, match="exclude each other"):
        settings(f"{algorithm}.stop_token=eos", f"{algorithm}.stop_token_id=2")
    with pytest.raises(ValueError, match=rf"{algorithm}.local_rollout_forward_batch_size=0 must be >= 1"):
        settings(f"{algorithm}.local_rollout_forward_batch_size=0")


def test_rloo_resume_continues_the_same_trajectory(tiny_dir, prompts, tmp_path):
    common = {"rloo.num_ppo_epochs": 2, "rloo.rloo_k": 2, "trainer.max_steps": 4, "trainer.save_interval": 2}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run("rloo", overrides("rloo", tiny_dir, straight, prompts, **common))
    run("rloo", overrides("rloo", tiny_dir, resumed, prompts, **{**common, "trainer.max_steps": 2}))
    proc = run("rloo", overrides("rloo", tiny_dir, resumed, prompts, **common))
    assert "resumed from" in proc.stdout + proc.stderr
    a, b = metrics(straight), metrics(resumed)
    for step in (1, 2, 3, 4):
        for key in ("objective/scores", "objective/kl", "loss/policy_avg", "val/ratio"):
            assert a[step][key] == b[step][key], (step, key)
    # RLOO folds the KL into the reward: rlhf_reward = scores + non_score_reward, non_score = -kl_coef * kl.
    for step in (1, 2, 3, 4):
        m = a[step]
        assert m["objective/rlhf_reward"] == pytest.approx(m["objective/scores"] + m["objective/non_score_reward"], abs=1e-6)
        assert m["objective/non_score_reward"] == pytest.approx(-0.05 * m["objective/kl"], abs=1e-6)
    assert a[1]["objective/kl"] == 0.0 and a[2]["objective/kl"] != 0.0  # the policy moved off the reference
    assert a[1]["val/ratio_var"] > 0.0  # the second epoch's ratio is no longer 1
    assert (straight / "samples" / "step_1.jsonl").is_file()
    assert not math.isnan(a[4]["objective/kl"])


def test_reinforce_uses_the_solution_column(tiny_dir, prompts, tmp_path):
    out = tmp_path / "reinforce"
    run("reinforce", overrides("reinforce", tiny_dir, out, prompts, **{
        "reinforce.reward_funcs": f"[{REWARDS}:digits,{REWARDS}:matches_solution]", "reinforce.reward_weights": "[1.0,2.0]",
        "trainer.max_steps": 1}))
    m = metrics(out)[1]
    # The weighted total is the score: digits + 2 * matches_solution, each logged with its mean.
    assert m["objective/scores"] == pytest.approx(m["rewards/digits/mean"] + 2 * m["rewards/matches_solution/mean"], abs=1e-6)
    assert 0.0 <= m["rewards/matches_solution/mean"] <= 1.0


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory) -> Path:
    from aligner.models.heads import attach_value_head

    model = tiny_model(seed=1, vocab_size=49152, tie_word_embeddings=True, num_hidden_layers=2)
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = 1, 2, 2
    attach_value_head(model, std=0.5)
    out = tmp_path_factory.mktemp("rm") / "model"
    save_hf_checkpoint(model, model.config, out, tokenizer_dir=fetch_model("smollm2-135m-instruct"))
    return out


def test_ppo_with_a_reward_model_logs_every_metric_and_resumes(tiny_dir, tiny_rm, prompts, tmp_path):
    # No-grad forwards (reference, values, reward model) in micro-batches of 2 rows, training in one of 4.
    common = {"ppo.reward_model.path": tiny_rm, "ppo.reward_model.arch": "null", "ppo.num_ppo_epochs": 1,
              "ppo.reward_funcs": "[]", "trainer.max_steps": 2, "trainer.save_interval": 1,
              "ppo.local_rollout_forward_batch_size": 2}
    out = tmp_path / "ppo"
    run("ppo", overrides("ppo", tiny_dir, out, prompts, **common))
    m = metrics(out)
    for key in (*REFERENCE_METRICS, "loss/value_avg", "val/clipfrac_avg", "rollout/logprob_mismatch",
                "objective/negative_kl_frac", "time/generation", "time/scoring", "time/training"):
        assert key in m[1], key
    assert m[1]["val/ratio"] == pytest.approx(1.0, abs=1e-6)  # one epoch: the ratio never leaves 1
    assert m[1]["objective/kl"] == 0.0 and m[1]["loss/value_avg"] > 0.0
    assert m[1]["rewards/reward_model/mean"] == pytest.approx(m[1]["objective/scores"], abs=1e-6)
    # float32 engine vs training forward, also after an update: the engine was refit to the new weights.
    assert m[1]["rollout/logprob_mismatch"] < 1e-4 and m[2]["rollout/logprob_mismatch"] < 1e-4
    assert "time/refit" in m[2]
    # The critic is in the checkpoint: a run resumed from step 1 repeats step 2 exactly.
    resumed = tmp_path / "resumed"
    run("ppo", overrides("ppo", tiny_dir, resumed, prompts, **{**common, "trainer.max_steps": 1}))
    run("ppo", overrides("ppo", tiny_dir, resumed, prompts, **common))
    r = metrics(resumed)
    for key in ("objective/scores", "loss/policy_avg", "loss/value_avg", "objective/kl"):
        assert r[2][key] == m[2][key], key


GROUPED_METRICS = ("objective/scores", "objective/entropy", "objective/kl", "policy/approxkl_avg",
                   "policy/clipfrac_avg", "loss/policy_avg", "policy/entropy_avg", "val/ratio",
                   "rollout/logprob_mismatch", "rollout/response_length", "train/grad_norm")


@pytest.mark.parametrize("algorithm, extra", [
    ("grpo", {}),  # the defaults: the training forward's own log-probs are the old ones
    ("grpo", {"grpo.beta": 0.04, "grpo.num_iterations": 2, "trainer.micro_batch_size": 2}),  # reference, old passes
    # Sequence-level losses: per-sample sums inside the rows; the KL in the reward needs reference and old passes.
    ("rloo", {"rloo.rloo_k": 4, "rloo.num_ppo_epochs": 2, "trainer.micro_batch_size": 8}),
    ("reinforce", {"reinforce.num_rollouts_per_prompt": 2, "reinforce.num_ppo_epochs": 1}),
], ids=["grpo_defaults", "grpo_reference_old_pass_micro_batches", "rloo_kl_two_epochs", "reinforce_kl"])
def test_grouped_rows_train_like_one_row_per_sample(tiny_dir, prompts, tmp_path, algorithm, extra):
    """{grpo,rloo,reinforce}.shared_prompt (the prompt's samples in one row, the prompt run once) changes no
    number."""
    rows, grouped = tmp_path / "rows", tmp_path / "grouped"
    run(algorithm, overrides(algorithm, tiny_dir, rows, prompts, **{f"{algorithm}.shared_prompt": False, **extra}))
    run(algorithm, overrides(algorithm, tiny_dir, grouped, prompts, **extra))
    a, b = metrics(rows), metrics(grouped)
    for step in (1, 2):
        for key in GROUPED_METRICS:
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-4, abs=1e-5), (step, key)
    assert a[2]["train/grad_norm"] > 0 and a[2]["objective/entropy"] > 1.0  # real numbers compared
    if algorithm != "grpo":  # the KL in the reward came from grouped reference and old forwards
        assert a[2]["objective/kl"] != 0.0


def test_group_rows_lays_out_each_prompts_samples_in_one_row():
    import torch

    from aligner.trainers.online_batch import from_group_layout, group_rows, to_group_layout

    # Two prompts ([5, 6, 7] and [8, 9]) with two samples each, right-padded with 0.
    tokens = torch.tensor([[5, 6, 7, 10, 11, 0], [5, 6, 7, 12, 0, 0], [8, 9, 13, 14, 15, 0], [8, 9, 16, 0, 0, 0]])
    attention_mask = (torch.arange(6) < torch.tensor([5, 4, 5, 3])[:, None]).long()
    labels = torch.full((4, 6), -100)
    labels[0, 2:4], labels[1, 2], labels[2, 1:4], labels[3, 1] = torch.tensor([10, 11]), 12, torch.tensor([13, 14, 15]), 16
    batch = {"tokens": tokens, "attention_mask": attention_mask, "labels": labels}
    g = group_rows(batch, [3, 3, 2, 2], k=2, pad_id=0)
    assert g["tokens"].tolist()[0][:8] == [5, 6, 7, 10, 11, 7, 12, 0]
    assert g["labels"].tolist()[0][:7] == [-100, -100, 10, 11, -100, 12, -100]
    assert g["position_ids"].tolist()[0][:7] == [0, 1, 2, 3, 4, 2, 3]
    assert g["branch_ids"].tolist()[0][:7] == [0, 0, 1, 1, 1, 2, 2]
    assert g["sequence_ids"].tolist()[0][:7] == [-1, -1, 0, 0, -1, 1, -1]
    assert g["tokens"].tolist()[1][:7] == [8, 9, 13, 14, 15, 9, 16]
    assert g["labels"].tolist()[1][:7] == [-100, 13, 14, 15, -100, 16, -100]
    assert g["attention_mask"].sum(-1).tolist() == [7, 7] and g["tokens"].shape == (2, 8)
    values = torch.arange(24, dtype=torch.float32).view(4, 6) * (labels != -100)
    there = to_group_layout(values, batch, g)
    assert there[0, 2:4].tolist() == [2.0, 3.0] and there[0, 5] == 8.0 and there[1, 1:4].tolist() == [13.0, 14.0, 15.0]
    assert torch.equal(from_group_layout(there, batch, g), values)
    with pytest.raises(ValueError, match="does not share the prompt"):
        group_rows(batch, [3, 3, 2, 2], k=4, pad_id=0)

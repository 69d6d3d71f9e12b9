"""Self-rewarding end to end on a tiny random model with SmolLM2's tokenizer and a scripted judge
(``self_rewarding_scripted_judge.py``: the score is a rule on the judgement text): pairs and metrics agree with
the pairs file, the reference becomes the policy at each iteration, a resumed run repeats the same pairs and
losses, TP=2, dp_shard=2 and PP=2 equal one process, and the meta-judge adds Elo-ranked judgement pairs."""
from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
from helpers import run_entry

HERE = Path(__file__).resolve().parent
ENTRY = HERE / "self_rewarding_scripted_judge.py"
PROMPTS = ["Tell me the capital of Peru.", "What is a baby cat called?", "How do I water a cactus?",
           "What is the opposite of hot?", "Name a colour of the sky.", "What is 3 + 4?",
           "Say hello politely.", "What is the plural of mouse?"]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> dict[str, Path]:
    """Short judge and meta-judge templates (a user's own files): the tiny model has 256 positions."""
    d = tmp_path_factory.mktemp("templates")
    (d / "judge.jinja").write_text("Rate 0-5.\nQ: {{ prompt }}\nA: {{ response }}\n")
    (d / "meta.jinja").write_text("Q: {{ prompt }}\nA: {{ response }}\nA) {{ judgement_a }}\nB) {{ judgement_b }}\n")
    return {"judge": d / "judge.jinja", "meta": d / "meta.jinja"}


def overrides(model_dir: Path, out: Path, data: Path, templates: dict[str, Path], **extra) -> list[str]:
    kw = {
        "model.path": model_dir, "model.arch": "null", "data.train": data, "data.validation": "null",
        "trainer.output_dir": out, "trainer.global_batch_size": 4, "trainer.micro_batch_size": 2,
        "trainer.max_seq_len": 256, "self_rewarding.judge_template": templates["judge"],
        "self_rewarding.meta_judge_template": templates["meta"], "trainer.save_interval": 0, "trainer.val_check_interval": 0,
        "optim.lr": 1e-3, "optim.sched.name": "constant", "logger.progress_bar": False,
        "generation.compile": False, "generation.dtype": "float32", "generation.max_batch_size": 32,
        "generation.temperature": 1.0, "generation.top_p": 1.0, "generation.max_new_tokens": 8,
        "self_rewarding.max_iterations": 2, "self_rewarding.num_responses_to_gen": 3,
        "self_rewarding.num_evals_to_average": 2, "self_rewarding.judge_max_new_tokens": 4,
        "self_rewarding.judge_prefill": "Score:", "self_rewarding.beta": 0.5,
    }
    kw.update(extra)
    return [f"{k}={v}" for k, v in kw.items()]


def run(args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    return run_entry(ENTRY, args, nproc)


def metrics(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def pairs(out: Path, iteration: int) -> list[dict]:
    return [json.loads(line) for line in (out / "pairs" / f"iteration_{iteration}.jsonl").read_text().splitlines()]


def test_iterations_pairs_metrics_and_exact_resume(tiny_dir, prompts, templates, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(overrides(tiny_dir, straight, prompts, templates))
    m = metrics(straight)
    assert sorted(m) == [1, 2, 3, 4]  # 2 iterations x 1 epoch x (8 prompts / 4 per step)
    assert [m[s]["train/iteration"] for s in (1, 2, 3, 4)] == [0, 0, 1, 1]
    for step in (1, 2, 3, 4):
        rows = [r for it in (0, 1) for r in pairs(straight, it) if r["step"] == step]
        assert len(rows) == 4 and all(r["iteration"] == (step - 1) // 2 for r in rows)
        good = [r for r in rows if r["bad"] is None]
        assert m[step]["train/pairs"] == len(good) > 0
        assert m[step]["train/bad_samples_per_GBS"] == pytest.approx((4 - len(good)) / 4)
        ends = sum(f == "length" for r in rows for f in r["finish_reasons"])
        assert m[step]["train/bad_ends_per_GBS"] == pytest.approx(ends / 12)
        for r in good:  # judge means; chosen is the best mean, rejected the worst (no length control)
            means = [sum(v for v in s if v is not None) / len([v for v in s if v is not None])
                     for s in r["scores"] if any(v is not None for v in s)]
            assert r["chosen_score"] == pytest.approx(max(means)) and r["rejected_score"] == pytest.approx(min(means))
        assert m[step]["train/chosen_generated_rewards"] == pytest.approx(sum(r["chosen_score"] for r in good) / len(good))
        assert m[step]["train/rejected_generated_rewards"] == pytest.approx(
            sum(r["rejected_score"] for r in good) / len(good))
        for key in ("train/preference_loss", "train/sft_loss", "train/rewards_chosen_mean",
                    "train/rewards_rejected_mean", "train/chosen_lengths", "train/rejected_lengths", "time/generation"):
            assert math.isfinite(m[step][key]), key
    # The reference is the policy at each iteration's start: DPO's first loss there is log 2, rewards 0.
    for step in (1, 3):
        assert m[step]["train/preference_loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert m[step]["train/rewards_chosen_mean"] == pytest.approx(0.0, abs=1e-6)
    for step in (2, 4):
        assert abs(m[step]["train/rewards_chosen_mean"]) + abs(m[step]["train/rewards_rejected_mean"]) > 1e-4

    # Stop in the middle of iteration 1 and resume: the reference (iteration 0's final policy) and the running
    # iteration's pairs come back from the checkpoint. A line written after the checkpoint is dropped.
    run(overrides(tiny_dir, resumed, prompts, templates, **{"trainer.max_steps": 3}))
    with open(resumed / "pairs" / "iteration_1.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "written": "after the checkpoint"}) + "\n")
    proc = run(overrides(tiny_dir, resumed, prompts, templates))
    assert "resumed from" in proc.stdout + proc.stderr
    r = metrics(resumed)
    for step in (1, 2, 3, 4):
        for key in ("train/loss", "train/preference_loss", "train/rewards_chosen_mean", "train/chosen_generated_rewards",
                    "train/bad_samples_per_GBS", "train/grad_norm"):
            assert r[step][key] == m[step][key], (step, key)
    assert pairs(resumed, 0) == pairs(straight, 0) and pairs(resumed, 1) == pairs(straight, 1)


def test_tp2_dp_shard2_and_pp2_equal_one_process(tiny_dir, prompts, templates, tmp_path):
    # optim.eps 1e-4: AdamW's step 1 turns the layouts' float32 rounding (another summation order) into weight
    # differences up to lr / eps times larger; 1e-4 keeps step 2 comparable to 1e-5, as in tests/parallel.
    extra = {"self_rewarding.max_iterations": 1, "optim.eps": 1e-4}
    results = {}
    layouts = (("single", {}, 1), ("tp2", {"parallel.tp": 2}, 2), ("fsdp2", {"parallel.dp_shard": 2}, 2),
               ("pp2", {"parallel.pp": 2}, 2))
    for name, layout, nproc in layouts:
        out = tmp_path / name
        run(overrides(tiny_dir, out, prompts, templates, **extra, **layout), nproc=nproc)
        results[name] = (metrics(out), pairs(out, 0))
    single, single_pairs = results["single"]
    assert sorted(single) == [1, 2]
    for name in ("tp2", "fsdp2", "pp2"):
        m, p = results[name]
        assert [(r["prompt"], r["chosen"], r["rejected"], r["scores"]) for r in p] == \
            [(r["prompt"], r["chosen"], r["rejected"], r["scores"]) for r in single_pairs], name
        for step in (1, 2):
            for key in ("train/loss", "train/preference_loss", "train/rewards_chosen_mean", "train/rewards_rejected_mean",
                        "train/chosen_generated_rewards", "train/bad_samples_per_GBS", "train/grad_norm"):
                assert m[step][key] == pytest.approx(single[step][key], abs=1e-5), (name, step, key)


def test_meta_judge_adds_elo_ranked_judgement_pairs(tiny_dir, prompts, templates, tmp_path):
    out = tmp_path / "meta"
    proc = run(overrides(tiny_dir, out, prompts, templates, **{
        "self_rewarding.max_iterations": 1, "trainer.max_steps": 1, "self_rewarding.num_evals_to_average": 3,
        "self_rewarding.judge_max_new_tokens": 6, "self_rewarding.use_meta_judge": True,
        "self_rewarding.meta_judge_pcnt": 0.5, "self_rewarding.meta_judge_prefill": "'Winner: Judgement'",
        "self_rewarding.meta_judge_max_new_tokens": 2}))
    assert "meta_judge_pcnt=0.5 is above 0.15" in proc.stdout
    m = metrics(out)[1]
    meta = [r for r in pairs(out, 0) if r["kind"] == "meta_judge"]
    assert m["train/meta_judge_pairs"] == len(meta) >= 1 and len(meta) <= 2  # at most 0.5 of the 4 prompts
    for r in meta:
        # Both orders of every pair of the 3 judgements were compared; the winners are the scripted rule.
        assert len(r["winners"]) == 6 and r["chosen"] != r["rejected"]
        assert max(r["ratings"]) > min(r["ratings"]) and abs(sum(r["ratings"])) < 1e-6
        assert r["chosen"].startswith("Score:") and r["rejected"].startswith("Score:")
    assert math.isfinite(m["train/loss"])

"""Preference training end to end through the real entry points, on a tiny random model with SmolLM2's tokenizer:
DPO's step-1 loss is log 2 at every layout, layouts agree step by step, the reference modes agree, resume is
exact, KTO/CPO/ORPO/SimPO/RM log consistent metrics, and bad pairs stop the run before anything is written."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, free_port, subprocess_env

DATA = REPO / "examples" / "data"
LOG2 = math.log(2.0)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> dict[str, Path]:
    """The first records of the shipped files, so each tiny run tokenizes little."""
    out = tmp_path_factory.mktemp("data")
    files = {}
    for name, n in (("preference_train", 24), ("preference_val", 8), ("kto_train", 24), ("kto_val", 8)):
        lines = (DATA / f"{name}.jsonl").read_text().splitlines()[:n]
        files[name] = out / f"{name}.jsonl"
        files[name].write_text("\n".join(lines) + "\n")
    return files


def overrides(model_dir: Path, out: Path, data: dict[str, Path], kind: str = "preference", **extra) -> list[str]:
    kw = {
        "model.path": str(model_dir), "model.arch": "null", "data.train": str(data[f"{kind}_train"]),
        "data.validation": str(data[f"{kind}_val"]), "trainer.output_dir": str(out),
        "trainer.global_batch_size": 4, "trainer.micro_batch_size": 1, "trainer.max_seq_len": 128,
        "trainer.max_steps": 3, "trainer.save_interval": 3, "trainer.val_check_interval": 3,
        "trainer.val_samples": 0, "optim.lr": 1e-3, "optim.sched.name": "constant", "logger.progress_bar": False,
    }
    kw.update(extra)
    return [f"{k}={v}" for k, v in kw.items()]


def run(algorithm: str, args: list[str], nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    entry = REPO / "examples" / f"train_{algorithm}.py"
    if nproc == 1:
        cmd = [sys.executable, str(entry), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), str(entry), *args]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-5000:]}")
    return proc


def metrics(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def test_dpo_step_one_is_log2_and_layouts_agree(tiny_dir, small_data, tmp_path):
    """Step 1: policy == reference, so the sigmoid loss is log 2 exactly; TP=2, dp_shard=2 and PP=2 follow
    one process for 3 steps (NeMo-Aligner's users hit a step-0 mismatch under TP)."""
    plain = dict(**{"dpo.rpo_alpha": 0})
    runs = {"single": ({}, 1), "tp2": ({"parallel.tp": 2}, 2), "fsdp2": ({"parallel.dp_shard": 2}, 2),
            "pp2": ({"parallel.pp": 2}, 2)}
    results = {}
    for name, (layout, nproc) in runs.items():
        out = tmp_path / name
        run("dpo", overrides(tiny_dir, out, small_data, **plain, **layout), nproc=nproc)
        results[name] = metrics(out)
    for name, m in results.items():
        assert abs(m[1]["train/preference_loss"] - LOG2) < 1e-6, (name, m[1]["train/preference_loss"])
        assert abs(m[1]["train/loss"] - LOG2) < 1e-6, name
        assert abs(m[1]["train/rewards/margins"]) < 1e-6 and m[1]["train/rewards/accuracies"] == 0.0, name
    single = results["single"]
    for name in ("tp2", "fsdp2", "pp2"):
        for step in (1, 2, 3):
            assert abs(results[name][step]["train/loss"] - single[step]["train/loss"]) < 1e-5, (name, step)
        assert abs(results[name][3]["val/loss"] - single[3]["val/loss"]) < 1e-5, name
    assert single[3]["train/loss"] < LOG2  # lr 1e-3 on 4 pairs: it learns within 3 steps


def test_reference_on_the_fly_equals_precompute_and_rpo_adds_nll(tiny_dir, small_data, tmp_path):
    pre, fly = tmp_path / "pre", tmp_path / "fly"
    run("dpo", overrides(tiny_dir, pre, small_data))
    run("dpo", overrides(tiny_dir, fly, small_data, **{"dpo.reference": "on_the_fly"}))
    a, b = metrics(pre), metrics(fly)
    for step in (1, 2, 3):
        assert abs(a[step]["train/loss"] - b[step]["train/loss"]) < 1e-5, step
        # rpo_alpha=1 (the default): the loss is the preference loss plus the chosen NLL.
        m = a[step]
        assert abs(m["train/loss"] - (m["train/preference_loss"] + m["train/sft_loss"])) < 1e-5
    assert abs(a[1]["train/preference_loss"] - LOG2) < 1e-6
    assert abs(a[3]["val/rewards/margins"] - b[3]["val/rewards/margins"]) < 1e-5


@pytest.mark.parametrize("algorithm", ["dpo", "simpo"])
def test_shared_prompt_rows_train_exactly_as_two_rows_per_pair(tiny_dir, small_data, tmp_path, algorithm):
    """data.shared_prompt: one [prompt | chosen | rejected] row per pair gives the losses, metrics and
    reference log-probs of two rows per pair."""
    results = {}
    for shared in (True, False):
        out = tmp_path / f"shared_{shared}"
        run(algorithm, overrides(tiny_dir, out, small_data, **{"data.shared_prompt": shared,
                                                                "trainer.micro_batch_size": 2}))
        results[shared] = metrics(out)
    a, b = results[True], results[False]
    for step in (1, 2, 3):
        for key in ("train/loss", "train/preference_loss", "train/sft_loss", "train/rewards/margins",
                    "train/logps/chosen", "train/logps/rejected", "train/grad_norm"):
            assert abs(a[step][key] - b[step][key]) < 1e-5, (step, key, a[step][key], b[step][key])
    for key in ("val/loss", "val/rewards/margins", "val/logps/rejected"):
        assert abs(a[3][key] - b[3][key]) < 1e-5, key
    if algorithm == "dpo":
        assert abs(a[1]["train/preference_loss"] - LOG2) < 1e-6


def test_dpo_resume_is_exact(tiny_dir, small_data, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = {"trainer.max_steps": 4, "trainer.save_interval": 2, "trainer.val_check_interval": 2}
    run("dpo", overrides(tiny_dir, straight, small_data, **common))
    run("dpo", overrides(tiny_dir, resumed, small_data, **{**common, "trainer.max_steps": 2}))
    proc = run("dpo", overrides(tiny_dir, resumed, small_data, **common))
    assert "resumed from" in proc.stdout + proc.stderr
    a, b = metrics(straight), metrics(resumed)
    for step in (1, 2, 3, 4):
        assert a[step]["train/loss"] == b[step]["train/loss"], step


@pytest.mark.parametrize("algorithm,beta,alpha,avg", [("cpo", 0.1, 1.0, False), ("simpo", 2.0, 1.0, True),
                                                      ("orpo", 0.1, 1.0, True)])
def test_reference_free_losses_log_consistent_metrics(tiny_dir, small_data, tmp_path, algorithm, beta, alpha, avg):
    out = tmp_path / algorithm
    proc = run(algorithm, overrides(tiny_dir, out, small_data))
    assert "reference log-probs" not in proc.stdout  # no reference model or pass
    m = metrics(out)
    for step in (1, 2, 3):
        s = m[step]
        # Rewards are beta times the log-probs the loss used (summed for CPO, per-token means otherwise).
        assert abs(s["train/rewards/chosen"] - beta * s["train/logps/chosen"]) < 1e-5
        assert abs(s["train/rewards/margins"] - (s["train/rewards/chosen"] - s["train/rewards/rejected"])) < 1e-5
        assert abs(s["train/loss"] - (s["train/preference_loss"] + alpha * s["train/sft_loss"])) < 1e-5
        if avg:  # the chosen NLL is the negative mean chosen log-prob
            assert abs(s["train/sft_loss"] + s["train/logps/chosen"]) < 1e-5
    # Training pulls the held-out pairs apart (the steps' own batches differ, so their losses do not compare).
    assert m[3]["val/rewards/margins"] > m[0]["val/rewards/margins"], (m[0], m[3])


def test_kto_logs_kl_and_warns_about_weights(tiny_dir, small_data, tmp_path):
    out = tmp_path / "kto"
    proc = run("kto", overrides(tiny_dir, out, small_data, kind="kto", **{"kto.desirable_weight": 3.0}))
    labels = [json.loads(line)["label"] for line in small_data["kto_train"].read_text().splitlines()]
    n_d, n_u = sum(labels), len(labels) - sum(labels)
    assert f"= 3.0 * {n_d} / (1.0 * {n_u}) = {3.0 * n_d / n_u:.3f} is outside [1, 4/3]" in proc.stdout
    m = metrics(out)
    assert m[1]["train/kl"] == 0.0  # policy == reference at step 1: log-ratio 0, clamped at 0
    assert all(m[s]["train/kl"] >= 0.0 for s in (1, 2, 3))
    # At step 1 every reward is 0, so each desirable loss is w_D * (1 - sigmoid(0)) = 1.5, undesirable 0.5.
    assert abs(m[1]["train/rewards/chosen"]) < 1e-6 and abs(m[1]["train/rewards/rejected"]) < 1e-6
    assert 0.5 - 1e-6 <= m[1]["train/loss"] <= 1.5 + 1e-6


def test_reward_model_trains_and_exports_value_head(tiny_dir, small_data, tmp_path):
    out = tmp_path / "rm"
    run("rm", overrides(tiny_dir, out, small_data, **{"trainer.max_steps": 4}))
    m = metrics(out)
    for step in (1, 2, 3, 4):
        s = m[step]
        assert abs(s["train/rewards/margins"] - (s["train/rewards/chosen"] - s["train/rewards/rejected"])) < 1e-5
        assert 0.0 <= s["train/accuracy"] <= 1.0
    assert "val/accuracy" in m[4]
    from aligner.checkpoint import export_hf
    from aligner.models import from_pretrained
    from aligner.models.heads import has_value_head

    latest = (out / "checkpoints" / "latest").read_text().strip()
    hf = Path(export_hf(out / "checkpoints" / latest, tmp_path / "rm-hf"))
    assert (hf / "value_head.safetensors").is_file()
    assert has_value_head(from_pretrained(hf))


def test_identical_pair_stops_the_run_naming_the_line(tiny_dir, small_data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = small_data["preference_train"].read_text().splitlines()[:5]
    record = json.loads(lines[2])
    record["rejected"] = record["chosen"]
    lines[2] = json.dumps(record)
    bad.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    proc = run("dpo", overrides(tiny_dir, out, {**small_data, "preference_train": bad}), check=False)
    assert proc.returncode != 0
    assert f"{bad}:3" in proc.stderr + proc.stdout
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
    skipped = tmp_path / "skipped"
    proc = run("dpo", overrides(tiny_dir, skipped, {**small_data, "preference_train": bad},
                                **{"data.identical_pairs": "skip", "trainer.max_steps": 1}))
    assert "1 skipped" in proc.stdout or "1 identical" in proc.stdout

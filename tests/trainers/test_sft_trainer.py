"""SFT end to end through the real entry point: exact resume, layout change, preemption, bad input, real model."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, free_port, subprocess_env

from aligner.models.fetch import fetch_model

TRAIN = REPO / "examples" / "data" / "sft_train.jsonl"
VAL = REPO / "examples" / "data" / "sft_val.jsonl"
ENTRY = REPO / "examples" / "train_sft.py"


def base_overrides(model_dir: Path, out: Path, **extra) -> list[str]:
    kw = {
        "model.path": str(model_dir), "model.arch": "null", "data.train": str(TRAIN), "data.validation": str(VAL),
        "trainer.output_dir": str(out), "trainer.global_batch_size": 4, "trainer.micro_batch_size": 2,
        "trainer.max_seq_len": 128, "trainer.max_steps": 6, "trainer.save_interval": 3,
        "trainer.val_check_interval": 3, "trainer.val_samples": 0, "optim.lr": 1e-3,
        "optim.sched.name": "constant", "logger.progress_bar": False,
    }
    kw.update(extra)
    return [f"{k}={v}" for k, v in kw.items()]


def run_sft(overrides: list[str], nproc: int = 1, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    env = subprocess_env()
    if nproc == 1:
        cmd = [sys.executable, str(ENTRY), *overrides]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(ENTRY), *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-5000:]}")
    return proc


def read_metrics(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"duplicate steps in metrics.jsonl: {steps}"
    return {r["step"]: r for r in rows}


def final_weights(out: Path, tmp: Path) -> dict[str, torch.Tensor]:
    from aligner.checkpoint import export_hf
    from aligner.models import from_pretrained

    latest = (out / "checkpoints" / "latest").read_text().strip()
    hf_dir = export_hf(out / "checkpoints" / latest, tmp / f"export-{out.name}")
    return from_pretrained(hf_dir).state_dict()


def test_resume_is_bit_exact(tiny_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_sft(base_overrides(tiny_dir, straight))
    run_sft(base_overrides(tiny_dir, resumed, **{"trainer.max_steps": 3}))
    assert (resumed / "checkpoints" / "latest").read_text().strip() == "step_3"
    proc = run_sft(base_overrides(tiny_dir, resumed))
    assert "resumed from" in proc.stdout + proc.stderr
    a, b = read_metrics(straight), read_metrics(resumed)
    assert sorted(a) == sorted(b) == [0, 1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert a[step]["train/loss"] == b[step]["train/loss"], step  # bit for bit on CPU
    assert a[6]["val/loss"] == b[6]["val/loss"]
    assert a[6]["train/loss"] < a[1]["train/loss"]
    wa, wb = final_weights(straight, tmp_path), final_weights(resumed, tmp_path)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_at_another_layout_tp2_to_tp1(tiny_dir, tmp_path):
    # TP=2 sums in another order than one process, so gradients differ by float32 rounding (~1e-7 relative).
    # AdamW moves a weight by about lr * g / (|g| + eps) per step: with the default eps (1e-8) a weight whose
    # gradient is near 0 turns that rounding into an lr-sized difference (2.7e-5 after 6 steps was seen on an
    # AVX2 CPU). eps=1e-4 bounds the sensitivity to lr / eps = 10, as in tests/parallel's layout checks.
    adam = {"optim.eps": 1e-4}
    straight, moved = tmp_path / "straight", tmp_path / "moved"
    run_sft(base_overrides(tiny_dir, straight, **adam))
    run_sft(base_overrides(tiny_dir, moved, **adam, **{"trainer.max_steps": 3, "parallel.tp": 2}), nproc=2)
    run_sft(base_overrides(tiny_dir, moved, **adam))
    a, b = read_metrics(straight), read_metrics(moved)
    for step in range(1, 7):
        assert abs(a[step]["train/loss"] - b[step]["train/loss"]) < 1e-5, step
    wa, wb = final_weights(straight, tmp_path), final_weights(moved, tmp_path)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


def test_sigterm_saves_and_exits_zero_then_resume_continues(tiny_dir, tmp_path):
    out = tmp_path / "preempted"
    keep = {"trainer.save_interval": 1000, "trainer.val_check_interval": 1000}
    overrides = base_overrides(tiny_dir, out, **keep, **{"trainer.max_steps": 200})
    env = subprocess_env()
    proc = subprocess.Popen([sys.executable, str(ENTRY), *overrides], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output[-3000:]
    latest = (out / "checkpoints" / "latest").read_text().strip()
    stopped_at = int(latest.removeprefix("step_"))
    assert 2 <= stopped_at < 200
    assert max(read_metrics(out)) == stopped_at
    run_sft(base_overrides(tiny_dir, out, **keep, **{"trainer.max_steps": stopped_at + 2}))
    steps = read_metrics(out)
    assert max(steps) == stopped_at + 2 and stopped_at + 1 in steps


def _tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def test_bad_inputs_fail_with_named_errors_and_leave_checkpoints_untouched(tiny_dir, tmp_path):
    out = tmp_path / "run"
    run_sft(base_overrides(tiny_dir, out, **{"trainer.max_steps": 2, "trainer.save_interval": 2}))
    before = _tree_digest(out / "checkpoints")

    def write(name: str, lines: list[str]) -> Path:
        p = tmp_path / name
        p.write_text("\n".join(lines) + "\n")
        return p

    good = TRAIN.read_text().splitlines()[0]
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((tiny_dir / "config.json").read_text())
    cases = {
        "broken JSON": (base_overrides(tiny_dir, out, **{"data.train": write("broken.jsonl", [good, '{"messages": [']),
                                                          "trainer.max_steps": 4}), ["broken.jsonl:2"]),
        "missing field": (base_overrides(tiny_dir, out, **{"data.train": write("missing.jsonl", [good, '{"text": "hi"}']),
                                                            "trainer.max_steps": 4}), ["missing.jsonl:2", "messages"]),
        "wrong type": (base_overrides(tiny_dir, out, **{"data.train": write("type.jsonl", [
            good, json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}]})]),
            "trainer.max_steps": 4}), ["type.jsonl:2", "content"]),
        "empty response": (base_overrides(tiny_dir, out, **{"data.train": write("empty.jsonl", [
            good, json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]})]),
            "trainer.max_steps": 4}), ["empty.jsonl:2", "empty"]),
        "unknown config key": (base_overrides(tiny_dir, out, **{"trainer.max_stepz": 4}), ["trainer.max_stepz", "max_steps"]),
        "model path without weights": (base_overrides(no_weights, out, **{"trainer.max_steps": 4}), [str(no_weights)]),
    }
    for name, (overrides, needles) in cases.items():
        proc = run_sft(overrides, check=False)
        text = proc.stdout + proc.stderr
        assert proc.returncode != 0, name
        assert "Traceback" not in text, f"{name}: traceback instead of a one-line error:\n{text[-2000:]}"
        for needle in needles:
            assert needle in text, f"{name}: '{needle}' not in:\n{text[-2000:]}"
    assert _tree_digest(out / "checkpoints") == before


@pytest.mark.slow
def test_sft_of_smollm2_lowers_validation_loss(tmp_path):
    out = tmp_path / "smol"
    run_sft([f"model.path={fetch_model('smollm2-135m-instruct')}", "model.arch=null", f"data.train={TRAIN}", f"data.validation={VAL}",
             f"trainer.output_dir={out}", "trainer.global_batch_size=8", "trainer.micro_batch_size=4",
             "trainer.max_seq_len=256", "trainer.max_steps=6", "trainer.val_check_interval=6",
             "trainer.save_interval=100", "trainer.val_samples=2", "trainer.sample_max_new_tokens=16",
             "optim.lr=5e-5", "optim.sched.name=constant", "logger.progress_bar=false"])
    m = read_metrics(out)
    assert m[6]["val/loss"] < m[0]["val/loss"] - 0.1, (m[0]["val/loss"], m[6]["val/loss"])
    assert (out / "samples").is_dir() and any((out / "samples").iterdir())
    assert (out / "config.yaml").is_file()

"""DPO and the reward model on the real SmolLM2-135M-Instruct and the shipped preference set: both learn the
set's preference (polite, helpful replies over dismissive ones) and generalise to held-out pairs in a
CPU-sized run (a few optimizer steps of 8 pairs)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, subprocess_env

DATA = REPO / "examples" / "data"


@pytest.fixture(scope="module")
def subset(tmp_path_factory) -> dict[str, Path]:
    """The first 32 training pairs and 32 held-out pairs (the full files take several CPU minutes per pass)."""
    out = tmp_path_factory.mktemp("pairs")
    files = {}
    for name in ("train", "val"):
        files[name] = out / f"{name}.jsonl"
        files[name].write_text("\n".join((DATA / f"preference_{name}.jsonl").read_text().splitlines()[:32]) + "\n")
    return files


def train(algorithm: str, out: Path, subset: dict[str, Path], **extra) -> dict[int, dict]:
    kw = {"data.train": subset["train"], "data.validation": subset["val"], "trainer.output_dir": out,
          "trainer.global_batch_size": 8, "trainer.micro_batch_size": 8, "trainer.max_steps": 4,
          "trainer.val_check_interval": 4, "trainer.save_interval": 0, "trainer.val_samples": 0,
          "logger.progress_bar": False, **extra}
    cmd = [sys.executable, str(REPO / "examples" / f"train_{algorithm}.py"), *(f"{k}={v}" for k, v in kw.items())]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def test_dpo_learns_the_preference_on_held_out_pairs(subset, tmp_path):
    m = train("dpo", tmp_path / "dpo", subset)
    # Before training the policy is the reference: every implicit reward is 0, so no pair counts as won.
    assert m[0]["val/rewards/accuracies"] < 0.2 and abs(m[0]["val/rewards/margins"]) < 1e-4
    assert m[4]["val/rewards/accuracies"] > 0.8, m[4]
    assert m[4]["val/rewards/margins"] > 0.0 and m[4]["val/preference_loss"] < m[0]["val/preference_loss"]


def test_reward_model_learns_the_preference_on_held_out_pairs(subset, tmp_path):
    m = train("rm", tmp_path / "rm", subset, **{"optim.lr": 3e-5})
    assert m[4]["val/accuracy"] > 0.8, m[4]
    assert m[4]["val/loss"] < m[0]["val/loss"] and m[4]["val/rewards/margins"] > m[0]["val/rewards/margins"]

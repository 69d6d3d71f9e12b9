"""Self-rewarding on the real SmolLM2-135M-Instruct with the shipped judge template: one iteration over a few
shipped prompts runs on this CPU, the model's own judgements become pairs, and every metric is logged.

SmolLM2-135M does not follow the 5-point rubric's output format (it writes a review and no score); opened with
``Score:`` it answers with a number on its own 0-100 scale, so the run prefills that and reads 0-100."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from helpers import REPO, subprocess_env

DATA = REPO / "examples" / "data"
METRICS = ("chosen_generated_rewards", "rejected_generated_rewards", "rewards_chosen_mean", "rewards_rejected_mean",
           "bad_samples_per_GBS", "bad_ends_per_GBS", "preference_loss", "sft_loss", "chosen_lengths",
           "rejected_lengths", "iteration")


def test_one_iteration_on_smollm2_makes_pairs_and_logs_every_metric(tmp_path):
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("\n".join((DATA / "self_rewarding_train.jsonl").read_text().splitlines()[:4]) + "\n")
    val.write_text("\n".join((DATA / "self_rewarding_val.jsonl").read_text().splitlines()[:2]) + "\n")
    out = tmp_path / "run"
    kw = {"data.train": train, "data.validation": val, "trainer.output_dir": out, "trainer.global_batch_size": 4,
          "trainer.micro_batch_size": 4, "trainer.val_check_interval": 1, "trainer.save_interval": 0,
          "trainer.val_samples": 2, "logger.progress_bar": False, "generation.compile": False,
          "generation.max_batch_size": 48, "generation.max_new_tokens": 40, "self_rewarding.max_iterations": 1,
          "self_rewarding.judge_prefill": "Score:", "self_rewarding.judge_score_high": 100,
          "self_rewarding.judge_max_new_tokens": 4, "optim.lr": 1e-6}
    cmd = [sys.executable, str(REPO / "examples" / "train_self_rewarding.py"), *(f"{k}={v}" for k, v in kw.items())]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    m = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert sorted(m) == [0, 1]  # validation before training, then one step: 4 prompts make one iteration
    for key in METRICS:
        assert math.isfinite(m[1][f"train/{key}"]), key
        assert f"val/{key}" in m[1] or key in ("iteration", "sft_loss", "preference_loss", "rewards_chosen_mean",
                                               "rewards_rejected_mean"), key
    rows = [json.loads(line) for line in (out / "pairs" / "iteration_0.jsonl").read_text().splitlines()]
    good = [r for r in rows if r["bad"] is None]
    assert len(rows) == 4 and m[1]["train/pairs"] == len(good) >= 2
    assert all(len(r["scores"]) == 4 and all(len(s) == 3 for s in r["scores"]) for r in rows)  # 4 responses x 3
    assert m[1]["train/chosen_generated_rewards"] > m[1]["train/rejected_generated_rewards"]
    assert 0.0 <= m[1]["train/bad_samples_per_GBS"] <= 0.5
    # The reference is the initial policy: DPO's loss is log 2 before the first update.
    assert abs(m[1]["train/preference_loss"] - math.log(2)) < 1e-5
    table = [json.loads(line) for line in (out / "samples" / "step_1.jsonl").read_text().splitlines()]
    assert table and set(table[0]) == {"prompt", "chosen", "rejected"}

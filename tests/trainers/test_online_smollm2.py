"""GRPO and RLOO on the real SmolLM2-135M-Instruct and the shipped arithmetic prompts, rewarded against each
record's ``solution`` column: both raise the mean reward within a CPU-sized run (8 steps of 4 prompts)."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

from helpers import REPO, subprocess_env

REWARDS = "[aligner.algorithms.rewards:accuracy,aligner.algorithms.rewards:format_reward]"
STEPS = 8


def train(algorithm: str, out: Path, **extra) -> list[dict]:
    """``examples/train_{algorithm}.py`` on the arithmetic prompts with the accuracy and format rewards (the
    answer alone, right), short completions, and a learning rate for a run of a few steps; the logged steps."""
    kw = {"trainer.output_dir": out, "trainer.max_steps": STEPS, "trainer.global_batch_size": 4,
          "trainer.save_interval": 0, "logger.progress_bar": False, "optim.lr": 2e-5,
          "generation.compile": False,  # compiling the decode step costs more than it saves in 8 short rollouts
          f"{algorithm}.reward_funcs": REWARDS, f"{algorithm}.num_sample_generations": 0, **extra}
    cmd = [sys.executable, str(REPO / "examples" / f"train_{algorithm}.py"), *(f"{k}={v}" for k, v in kw.items())]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "objective/scores" in r]


def assert_reward_rises(rows: list[dict]) -> None:
    scores = [r["objective/scores"] for r in rows]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    first, last = statistics.fmean(scores[:3]), statistics.fmean(scores[-3:])
    assert last > first + 0.1, scores
    accuracy = [r["rewards/accuracy/mean"] for r in rows]
    assert statistics.fmean(accuracy[-3:]) > statistics.fmean(accuracy[:3]), accuracy


def test_grpo_raises_the_arithmetic_reward(tmp_path):
    rows = train("grpo", tmp_path / "grpo", **{"grpo.num_generations": 8, "grpo.max_completion_length": 12,
                                                        "trainer.micro_batch_size": 16})
    assert_reward_rises(rows)
    assert all(0.0 <= r["frac_reward_zero_std"] <= 1.0 for r in rows)


def test_rloo_raises_the_arithmetic_reward(tmp_path):
    # The reference page's RLOO (leave-one-out baseline, sequence-level clipped ratio) with 4 samples per prompt,
    # one pass per rollout, temperature 1 and no KL penalty: with kl_coef 0 neither the reference nor the old
    # log-prob forward runs, which keeps 8 steps of a 135M model to a CPU minute or two.
    rows = train("rloo", tmp_path / "rloo", **{"rloo.rloo_k": 4, "rloo.response_length": 12, "rloo.kl_coef": 0.0,
                                               "rloo.num_ppo_epochs": 1, "rloo.temperature": 1.0,
                                               "trainer.micro_batch_size": 16, "optim.lr": 3e-5})
    assert_reward_rises(rows)
    assert all(r["objective/kl"] == 0.0 and r["val/ratio"] == 1.0 for r in rows)

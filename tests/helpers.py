"""Shared test helpers: tiny random models and a torchrun launcher for multi-process gloo tests."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from aligner.models import Transformer, TransformerConfig

REPO = Path(__file__).resolve().parents[1]


def tiny_config(**overrides) -> TransformerConfig:
    """A 2-layer GQA model small enough for CPU tests; every head/vocab count divides by 2 and 4."""
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rope_theta=10000.0, tie_word_embeddings=False)
    kw.update(overrides)
    return TransformerConfig(**kw)


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    """Tiny random model in float32, deterministically initialised from ``seed``."""
    model = Transformer(tiny_config(**overrides))
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    return model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RENDEZVOUS_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                   "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment minus any rendezvous variables (a child must start its own), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    return env


def run_torchrun(script: str | Path, nproc: int, *args: str, timeout: int = 300) -> str:
    """Run ``script`` under ``torchrun --nproc_per_node nproc`` on gloo; return its output, fail with it."""
    env = subprocess_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"torchrun {script} exited {proc.returncode}:\n{out[-6000:]}")
    return out


def run_entry(script: str | Path, args: list[str], nproc: int = 1, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run a training entry point (``python script args``, or under torchrun with ``nproc`` gloo processes);
    fail with the end of its output when it exits non-zero."""
    cmd = [sys.executable, str(script), *args] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), str(script), *args]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{(proc.stdout + proc.stderr)[-5000:]}"
    return proc

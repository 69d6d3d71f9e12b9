"""Every rank's random number generators, saved as ``rng/rank_<R>.pt`` and restored on resume.

Saved per rank: torch's CPU generator, the current CUDA device's generator (when CUDA is in use),
Python's ``random`` and NumPy's global generator (when NumPy is installed). The file loads with
``torch.load(weights_only=True)``: Python and NumPy states are stored as ints and tensors.

When the world size changes between save and resume, rank R restores ``rank_R.pt`` if the saved run
had a rank R; a rank the saved run did not have is seeded from a hash of the saved rank 0 state and
its own rank, so it is deterministic, differs between ranks, and never repeats rank 0's stream.
Bit-identical random streams after a resume are only promised at the same world size.
"""
from __future__ import annotations

import os
import random
import zlib
from pathlib import Path
from typing import Any

import torch

RNG_DIR = "rng"

try:
    import numpy as np
except ImportError:  # NumPy is optional; its generator is then neither saved nor restored
    np = None


def rng_file(checkpoint_dir: str | os.PathLike, rank: int) -> Path:
    """``<checkpoint_dir>/rng/rank_<rank>.pt``."""
    return Path(checkpoint_dir) / RNG_DIR / f"rank_{rank}.pt"


def capture_rng_state(world_size: int) -> dict[str, Any]:
    """This process's generator states, as plain ints and tensors."""
    version, mt_state, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "world_size": world_size,
        "torch_cpu": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(mt_state, dtype=torch.int64), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    return state


def apply_rng_state(state: dict[str, Any]) -> None:
    """Set this process's generators from :func:`capture_rng_state`'s dict."""
    torch.set_rng_state(state["torch_cpu"])
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss_next"]))
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])
    if np is not None and "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))


def save_rng_state(checkpoint_dir: str | os.PathLike, rank: int, world_size: int) -> Path:
    """Write this rank's generators to ``rng/rank_<rank>.pt`` (fsynced)."""
    path = rng_file(checkpoint_dir, rank)
    path.parent.mkdir(exist_ok=True)
    with open(path, "wb") as f:
        torch.save(capture_rng_state(world_size), f)
        f.flush()
        os.fsync(f.fileno())
    return path


def seed_all(seed: int) -> None:
    """Seed torch (CPU and CUDA), Python's ``random`` and NumPy from one integer."""
    torch.manual_seed(seed)
    random.seed(seed)
    if np is not None:
        np.random.seed(seed % 2**32)


def restore_rng_state(checkpoint_dir: str | os.PathLike, rank: int) -> str:
    """Restore this rank's generators from the checkpoint; returns how: ``restored`` | ``reseeded`` | ``absent``.

    ``absent``: the checkpoint has no RNG files (generators untouched). ``reseeded``: the saved run had
    no rank ``rank``; the generators are seeded from the saved rank 0 state and ``rank`` (module doc).
    """
    own = rng_file(checkpoint_dir, rank)
    if own.is_file():
        apply_rng_state(torch.load(own, weights_only=True))
        return "restored"
    first = rng_file(checkpoint_dir, 0)
    if not first.is_file():
        return "absent"
    base = torch.load(first, weights_only=True)["torch_cpu"]
    seed_all((zlib.crc32(base.numpy().tobytes()) + 7919 * rank) % 2**63)
    return "reseeded"

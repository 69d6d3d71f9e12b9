"""Activation checkpointing: keep only block inputs in forward, recompute the block in backward.

The block's ``forward`` is replaced on the instance (not wrapped in a new module), so parameter
names stay ``layers.3.mlp.up_proj.weight`` and checkpoints, HF export and sharded loading see the
same names with or without checkpointing. FSDP's hooks run around ``__call__``, outside the
checkpointed region, so parameters are gathered before the recompute as for a normal backward.
"""
from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint

AC_MODES = ("none", "full", "selective")


def _checkpointed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        # Non-reentrant checkpointing: works with kwargs, DTensors and inputs that need no grad.
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    run.is_activation_checkpointed = True
    return run


def apply_activation_checkpointing(model: nn.Module, mode: str = "full", every_n: int = 1) -> nn.Module:
    """Checkpoint TransformerBlocks of ``model`` in place.

    Args:
        model: a Transformer or pipeline stage (``model.layers`` keyed by the global layer index).
        mode: ``"full"`` checkpoints every block; ``"selective"`` every ``every_n``-th block (by global
            index, so pipeline stages agree on which layers are recomputed); ``"none"`` does nothing.
        every_n: the stride for ``"selective"``; 2 halves the recompute and keeps half the activations.

    Returns:
        ``model``. Applying twice is harmless (already checkpointed blocks are skipped).
    """
    if mode not in AC_MODES:
        raise ValueError(f"activation checkpointing mode '{mode}' is not one of {', '.join(AC_MODES)}")
    if every_n < 1:
        raise ValueError(f"activation checkpointing every_n={every_n} must be >= 1")
    if mode == "none":
        return model
    stride = every_n if mode == "selective" else 1
    for key, block in model.layers.items():
        if int(key) % stride or getattr(block.forward, "is_activation_checkpointed", False):
            continue
        block.forward = _checkpointed(block.forward)
    return model

"""Cutting a batch dict into micro-batches, and trimming the padding a micro-batch does not need."""
from __future__ import annotations

from typing import Any

import torch


def num_rows(batch: dict[str, Any]) -> int:
    """Number of examples in ``batch`` (the leading dim of ``tokens``)."""
    if "tokens" not in batch:
        raise KeyError(f"a batch needs 'tokens' [N, T]; this one has {sorted(batch)}")
    return int(batch["tokens"].shape[0])


def split_rows(batch: dict[str, Any], rows_per_part: int) -> list[dict[str, Any]]:
    """Consecutive parts of ``rows_per_part`` examples (the last may be shorter).

    Tensors with a leading dim of N and lists of N entries are sliced; 0-d tensors and other values go
    whole to every part.
    """
    n = num_rows(batch)
    if n == 0:
        raise ValueError("the batch has no examples (tokens has 0 rows)")
    if rows_per_part < 1:
        raise ValueError(f"rows_per_part={rows_per_part} must be >= 1 (trainer.micro_batch_size)")
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] != n:
            raise ValueError(f"batch['{key}'] has {value.shape[0]} rows but batch['tokens'] has {n}; every "
                             f"per-example tensor needs the examples along dim 0 (batch-wide values must be 0-d)")
    parts = []
    for start in range(0, n, rows_per_part):
        stop = min(n, start + rows_per_part)
        part = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                part[key] = value[start:stop]
            elif isinstance(value, (list, tuple)) and len(value) == n:
                part[key] = value[start:stop]
            else:
                part[key] = value
        parts.append(part)
    return parts


def pipeline_runs(rows: int, micro_batch_size: int, microbatches_per_run: int) -> list[tuple[int, int]]:
    """How a pipeline processes ``rows`` examples: ``[(examples in the schedule run, micro-batches in it)]``.

    A schedule run splits its examples into equal micro-batches of at most ``micro_batch_size``.
    ``microbatches_per_run=-1`` puts all of them in one run; otherwise runs hold that many micro-batches
    and the last run takes the rest. When a run's examples do not divide evenly, it uses the next larger
    micro-batch count that divides them (smaller micro-batches; no padding, no dropped examples).
    """
    per_run = rows if microbatches_per_run <= 0 else microbatches_per_run * micro_batch_size
    runs = []
    for start in range(0, rows, per_run):
        size = min(per_run, rows - start)
        n = -(-size // micro_batch_size)
        while size % n:
            n += 1
        runs.append((size, n))
    return runs


def trim_trailing_padding(mb: dict[str, Any], multiple: int = 8) -> dict[str, Any]:
    """Drop the columns after the last real token of any row (rounded up to ``multiple``) from every
    per-token tensor ``[b, T, ...]`` of a padded micro-batch.

    A causal model's outputs at earlier positions do not depend on later ones and padding carries no
    loss, so the loss and gradients are unchanged while a micro-batch of short rows cut out of a
    batch padded to its longest row costs only its own length. Packed rows (``document_ids``) and
    micro-batches without ``attention_mask`` are returned as they are.
    """
    mask = mb.get("attention_mask")
    if mask is None or mb.get("document_ids") is not None:
        return mb
    b, T = mask.shape
    real_columns = mask.bool().any(dim=0).nonzero()
    keep = int(real_columns.max()) + 1 if real_columns.numel() else 1
    keep = min(T, -(-keep // multiple) * multiple)
    if keep == T:
        return mb
    return {k: v[:, :keep] if isinstance(v, torch.Tensor) and v.dim() >= 2 and tuple(v.shape[:2]) == (b, T) else v
            for k, v in mb.items()}


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """Where each row's labels are (``labels != -100``), in order: ``[b, T] -> [b, K]``, ``K`` the most labels
    of any row (at least 1). A row with fewer is filled up with positions that have no label."""
    keep = labels != -100
    K = max(1, int(keep.sum(-1).max()))
    return torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :K]


def at_positions(mb: dict[str, Any], positions: torch.Tensor) -> dict[str, Any]:
    """``mb`` with every per-token tensor (``[b, T, ...]``) taken at ``positions [b, K]`` only: what a loss
    that reads logits at the labels only sees next to the logits of those positions."""
    b, T = mb["tokens"].shape[:2]

    def take(v: Any) -> Any:
        if not (isinstance(v, torch.Tensor) and v.dim() >= 2 and tuple(v.shape[:2]) == (b, T)):
            return v
        index = positions.reshape(b, -1, *([1] * (v.dim() - 2))).expand(-1, -1, *v.shape[2:])
        return v.gather(1, index)

    return {k: take(v) for k, v in mb.items()}


# Keys a micro-batch may hold for its rows to be laid end to end: nothing else is per row.
PACKABLE_KEYS = frozenset({"tokens", "labels", "attention_mask", "position_ids"})


def packing_pays(lengths: torch.Tensor, padded_len: int, layer_params: int, attention_width: int) -> bool:
    """Whether one padding-free row of all ``lengths`` costs a layer fewer FLOPs than ``len(lengths)`` rows
    padded to ``padded_len``: each token costs ``2 * layer_params`` in the matmuls, each query-key pair
    ``4 * attention_width`` in attention (SDPA with a mask computes every pair, masked or not). Packing removes
    the padding's matmuls but attends over the whole packed row, so it pays for short, uneven rows only."""
    b, S = lengths.numel(), int(lengths.sum())
    per_token, per_pair = 2 * layer_params, 4 * attention_width
    return S * per_token + S * S * per_pair < b * padded_len * (per_token + padded_len * per_pair)


def pack_rows(mb: dict[str, Any]) -> dict[str, Any]:
    """A padded micro-batch (keys in :data:`PACKABLE_KEYS`) as one row without padding: ``[1, S]`` tokens
    and labels, ``document_ids`` (which row each token came from) and each row's own positions. A causal
    model gives every token what it gave it in its padded row, and labels never cross rows (the last real
    token of a row has none), so a token-level loss is unchanged."""
    real = mb["attention_mask"].bool()  # [b, T]
    lengths = real.sum(-1)
    positions = mb.get("position_ids")
    if positions is None:
        positions = torch.cat([torch.arange(int(n), device=real.device) for n in lengths])
    else:
        positions = positions[real]
    documents = torch.repeat_interleave(torch.arange(real.shape[0], device=real.device), lengths)
    return {"tokens": mb["tokens"][real][None], "labels": mb["labels"][real][None],
            "document_ids": documents[None], "position_ids": positions[None]}

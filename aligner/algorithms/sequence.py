"""Per-token quantities reduced to one number per sequence: summed or averaged log-probs, last-token values."""
from __future__ import annotations

import torch


def sequence_logps(
    token_logps: torch.Tensor, labels: torch.Tensor, *, average: bool = False, ignore_index: int = -100
) -> torch.Tensor:
    """Log-probability of each row's loss tokens: ``[B, T] x [B, T] -> [B]`` (float32).

    ``token_logps[b, t]`` is the log-prob of ``labels[b, t]`` (as ``aligner.parallel.token_logprobs``
    returns it); positions where ``labels == ignore_index`` are masked out here whatever they hold.
    ``average=False`` sums over the loss tokens (DPO, KTO); ``average=True`` takes their mean (IPO,
    SimPO, ORPO and the RPO/CPO NLL term). A row without loss tokens gives 0 rather than NaN.
    """
    if token_logps.dim() != 2 or tuple(token_logps.shape) != tuple(labels.shape):
        raise ValueError(
            f"sequence_logps: token_logps {tuple(token_logps.shape)} and labels {tuple(labels.shape)} must both "
            f"be [B, T] with the same shape; pass the per-token log-probs of the (already shifted) labels"
        )
    keep = labels != ignore_index  # [B, T]
    # where, not a product: a masked position may hold -inf or NaN (an ignored label read as an id)
    summed = torch.where(keep, token_logps.float(), torch.zeros((), dtype=torch.float32, device=token_logps.device))
    summed = summed.sum(-1)  # [B]
    if not average:
        return summed
    return summed / keep.sum(-1).clamp(min=1)


def last_token_values(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The value at each row's last real token: ``[B, T] (or [B, T, 1]) x [B, T] -> [B]``.

    This is where a reward model reads its score (the whole sequence is in view there). Rows may be
    right-padded (the usual case) or left-padded; the last position whose mask is non-zero is taken.
    Raises ValueError when a row has no real token at all.
    """
    if values.dim() == 3 and values.shape[-1] == 1:
        values = values.squeeze(-1)  # a ValueHead's [B, T, 1]
    if values.dim() != 2 or tuple(values.shape) != tuple(attention_mask.shape):
        raise ValueError(
            f"last_token_values: values {tuple(values.shape)} and attention_mask {tuple(attention_mask.shape)} "
            f"must be [B, T] (values may also be [B, T, 1]) with the same B and T"
        )
    positions = torch.arange(values.shape[1], device=values.device).expand_as(values)  # [B, T]
    last = torch.where(attention_mask.bool(), positions, torch.full_like(positions, -1)).amax(-1)  # [B]
    if bool((last < 0).any()):
        empty = torch.nonzero(last < 0).flatten().tolist()
        raise ValueError(
            f"last_token_values: rows {empty} of the attention_mask have no real token; "
            f"drop empty sequences before scoring them"
        )
    return values.gather(1, last.unsqueeze(1)).squeeze(1)

"""PPO's clipped surrogate policy loss, the clipped value loss, and how per-token losses become one number.

The losses are per token (``[B, T]``, 0 where the mask is false) so that the trainer can pick the
aggregation. A trainer never averages inside a micro-batch: the model wrapper sums
:func:`aggregate_sum` over micro-batches and divides by :func:`aggregate_units` summed over the global
batch (``LossFn.num_units`` in ``aligner/interface.py``), which equals :func:`aggregate_loss` of the
whole batch for any micro-batch size or number of ranks.
"""
from __future__ import annotations

import torch

AGGREGATION_MODES = ("token_mean", "sequence_mean", "dr_grpo")


def _check_per_token(where: str, mask: torch.Tensor, **tensors: torch.Tensor) -> None:
    """Raise ValueError unless every tensor has the ``[B, T]`` shape of ``mask``."""
    if mask.dim() != 2:
        raise ValueError(f"{where}: mask has shape {tuple(mask.shape)} but must be [B, T], true on response tokens")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(mask.shape):
            raise ValueError(
                f"{where}: {name} has shape {tuple(t.shape)} but must match mask {tuple(mask.shape)}: "
                f"one value per response token"
            )


def _check_clip(where: str, **ranges: float | None) -> None:
    for name, value in ranges.items():
        if value is not None and not value >= 0:
            raise ValueError(f"{where}: {name}={value} must be >= 0 (or None where that disables clipping)")


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    cliprange: float = 0.2,
    cliprange_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss per token: ``[B, T] x 2, advantages [B] or [B, T], mask [B, T]``.

    With ``ratio = exp(logp - old_logp)`` and ``A`` the advantage (a ``[B]`` sequence advantage is
    broadcast over the row's tokens):

        loss = -min(ratio * A, clip(ratio, 1 - cliprange, 1 + cliprange_high) * A)

    ``cliprange_high`` defaults to ``cliprange`` (symmetric); a larger one is DAPO's clip-higher
    (GRPO's ``epsilon_high``). For a sequence-level ratio (RLOO) pass the summed log-probs of each
    response as ``[B, 1]`` with a ``[B, 1]`` mask of ones.

    Returns ``(loss [B, T], stats)``, both 0 where ``mask`` is false; ``stats`` holds detached
    per-token ``ratio``, ``clipfrac`` (1.0 where the clipped term was the one taken) and ``approxkl``
    (``0.5 * (logp - old_logp)^2``, TRL's estimate of KL(old || new)); aggregate them like the loss.
    Only ``logp`` carries a gradient.
    """
    _check_per_token("ppo_policy_loss", mask, logp=logp, old_logp=old_logp)
    if advantages.dim() == 1 and advantages.shape[0] == mask.shape[0]:
        advantages = advantages.unsqueeze(-1).expand(mask.shape)  # one advantage per sequence
    elif tuple(advantages.shape) != tuple(mask.shape):
        raise ValueError(
            f"ppo_policy_loss: advantages has shape {tuple(advantages.shape)} but must be [B] = "
            f"[{mask.shape[0]}] (one per sequence) or [B, T] = {list(mask.shape)} (one per token)"
        )
    _check_clip("ppo_policy_loss", cliprange=cliprange, cliprange_high=cliprange_high)
    high = cliprange if cliprange_high is None else cliprange_high
    keep = mask.bool()
    zero = torch.zeros((), dtype=torch.float32, device=logp.device)
    # where, not a product: padding may hold -inf log-probs, and exp(inf) * 0 is NaN
    log_ratio = torch.where(keep, logp.float() - old_logp.detach().float(), zero)  # [B, T]
    ratio = torch.exp(log_ratio)
    advantages = advantages.detach().float()
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + high)
    loss = torch.where(keep, torch.maximum(unclipped, clipped), zero)
    stats = {
        "ratio": torch.where(keep, ratio.detach(), zero),
        "clipfrac": (keep & (clipped > unclipped)).float().detach(),
        "approxkl": (0.5 * log_ratio.detach() ** 2),
    }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    cliprange_value: float | None = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped value loss per token: ``[B, T] x 4 -> (loss [B, T], {"clipfrac": [B, T]})``.

        loss = 0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)

    with ``V`` the critic's new values, ``V_old`` those at rollout time and ``R`` the GAE returns;
    ``cliprange_value=None`` gives the plain ``0.5 * (V - R)^2``. ``clipfrac`` is 1.0 where the clipped
    term was larger (TRL's ``val/clipfrac``). Both are 0 where ``mask`` is false; only ``values``
    carries a gradient.
    """
    _check_per_token("value_loss", mask, values=values, old_values=old_values, returns=returns)
    _check_clip("value_loss", cliprange_value=cliprange_value)
    keep = mask.bool()
    zero = torch.zeros((), dtype=torch.float32, device=values.device)
    values = values.float()
    old_values = old_values.detach().float()
    returns = returns.detach().float()
    unclipped = (values - returns) ** 2
    if cliprange_value is None:
        clipped = unclipped
    else:
        clipped_values = torch.maximum(torch.minimum(values, old_values + cliprange_value), old_values - cliprange_value)
        clipped = (clipped_values - returns) ** 2
    loss = torch.where(keep, 0.5 * torch.maximum(unclipped, clipped), zero)
    return loss, {"clipfrac": (keep & (clipped > unclipped)).float().detach()}


def _check_aggregation(where: str, mode: str, normaliser: float | None) -> None:
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"{where}: mode={mode!r} is not one of {AGGREGATION_MODES}")
    if mode == "dr_grpo" and (normaliser is None or not normaliser > 0):
        raise ValueError(
            f"{where}: mode='dr_grpo' needs a constant normaliser > 0 (the maximum response length in "
            f"tokens), got normaliser={normaliser!r}"
        )


def aggregate_sum(
    per_token: torch.Tensor, mask: torch.Tensor, mode: str, normaliser: float | None = None
) -> torch.Tensor:
    """The numerator of the ``mode`` aggregation over one micro-batch: ``[b, T] x [b, T] -> []`` (float32).

    - ``token_mean``: ``sum over unmasked tokens``
    - ``sequence_mean``: ``sum over rows of (row's token sum / row's token count)`` (an empty row adds 0)
    - ``dr_grpo``: ``sum over unmasked tokens / normaliser`` (a constant, e.g. the maximum response length)

    Divided by :func:`aggregate_units` summed over the same rows, it is :func:`aggregate_loss`.
    """
    _check_per_token("aggregate_sum", mask, per_token=per_token)
    _check_aggregation("aggregate_sum", mode, normaliser)
    keep = mask.bool()
    zero = torch.zeros((), dtype=torch.float32, device=per_token.device)
    kept = torch.where(keep, per_token.float(), zero)  # [b, T]
    if mode == "token_mean":
        return kept.sum()
    if mode == "sequence_mean":
        return (kept.sum(-1) / keep.sum(-1).clamp(min=1)).sum()
    return kept.sum() / normaliser


def aggregate_units(mask: torch.Tensor, mode: str) -> torch.Tensor:
    """The denominator of the ``mode`` aggregation over one micro-batch: ``[b, T] -> []`` (float32).

    ``token_mean``: the number of unmasked tokens; ``sequence_mean`` and ``dr_grpo``: the number of
    rows (every row counts, also one without unmasked tokens, as in TRL).
    """
    if mask.dim() != 2:
        raise ValueError(f"aggregate_units: mask has shape {tuple(mask.shape)} but must be [b, T]")
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"aggregate_units: mode={mode!r} is not one of {AGGREGATION_MODES}")
    if mode == "token_mean":
        return mask.bool().sum().float()
    return torch.tensor(float(mask.shape[0]), device=mask.device)


def aggregate_loss(
    per_token: torch.Tensor, mask: torch.Tensor, mode: str, *, normaliser: float | None = None
) -> torch.Tensor:
    """Reduce a per-token loss over a whole batch: ``[B, T] x [B, T] -> []`` (float32).

    - ``token_mean``: sum over all unmasked tokens / their number (DAPO; long responses weigh more);
    - ``sequence_mean``: mean over each row's unmasked tokens, then mean over rows (the GRPO paper);
    - ``dr_grpo``: sum over all unmasked tokens / (B * normaliser), with a constant ``normaliser``
      such as the maximum response length (Dr. GRPO: no length bias).

    Equal to ``aggregate_sum / aggregate_units`` (0 when there are no units).
    """
    total = aggregate_sum(per_token, mask, mode, normaliser)
    return total / aggregate_units(mask, mode).clamp(min=1.0)

"""Kahneman–Tversky Optimization loss on unpaired (prompt, completion, desirable?) examples."""
from __future__ import annotations

import torch

from aligner.algorithms.preference import check_beta, check_per_sequence


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor | float,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO loss per example: ``[B] x 2, desirable [B] bool, kl [] -> (losses [B], rewards [B])``.

    With the log-ratio ``h = policy - ref`` (summed log-probs of the completion) and the reference
    point ``kl``:

    - desirable examples: ``desirable_weight * (1 - sigmoid(beta (h - kl)))``
    - undesirable examples: ``undesirable_weight * (1 - sigmoid(beta (kl - h)))``

    ``kl`` is the batch estimate of KL(policy || ref) from mismatched prompt/completion pairs, reduced
    across ranks by the trainer; it is a constant here (detached) and clamped at 0 as in the KTO paper.
    ``rewards = beta * h``, detached. Losses are not reduced: the KTO paper and TRL average them over
    all examples. Float32 outputs.
    """
    check_per_sequence("kto_loss", policy_logps=policy_logps, ref_logps=ref_logps)
    check_beta("kto_loss", beta)
    if desirable.dtype != torch.bool or tuple(desirable.shape) != tuple(policy_logps.shape):
        raise ValueError(
            f"kto_loss: desirable must be a bool tensor shaped like policy_logps {tuple(policy_logps.shape)}, "
            f"got {desirable.dtype} {tuple(desirable.shape)}; pass the records' labels as a bool mask"
        )
    if desirable_weight < 0 or undesirable_weight < 0:
        raise ValueError(
            f"kto_loss: desirable_weight={desirable_weight} and undesirable_weight={undesirable_weight} "
            f"must be >= 0"
        )
    kl = torch.as_tensor(kl, dtype=torch.float32, device=policy_logps.device).detach()
    if kl.dim() != 0:
        raise ValueError(
            f"kto_loss: kl has shape {tuple(kl.shape)} but must be a scalar (0-d): one reference point "
            f"for the whole batch, already reduced across ranks"
        )
    kl = kl.clamp(min=0.0)
    logratios = policy_logps.float() - ref_logps.detach().float()  # [B]
    desirable_losses = desirable_weight * (1.0 - torch.sigmoid(beta * (logratios - kl)))  # [B]
    undesirable_losses = undesirable_weight * (1.0 - torch.sigmoid(beta * (kl - logratios)))  # [B]
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    return losses, beta * logratios.detach()

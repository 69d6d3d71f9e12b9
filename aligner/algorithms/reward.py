"""Reward-model training loss: Bradley–Terry on a chosen/rejected pair, with an optional margin."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from aligner.algorithms.preference import check_per_sequence


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Negative log-likelihood that chosen beats rejected: ``[B] x 2 (margin [B] or scalar) -> losses [B]``.

    ``losses = -logsigmoid(chosen - rejected - margin)``: with a margin (Llama 2's reward models, the
    dataset's ``margin`` column) the chosen score must exceed the rejected one by at least about
    ``margin`` before the loss gets small. ``margin=None`` is 0. Gradients flow into both rewards.
    Float32 output.
    """
    check_per_sequence("bradley_terry_loss", chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    logits = chosen_rewards.float() - rejected_rewards.float()  # [B]
    if margin is not None:
        margin = torch.as_tensor(margin, dtype=torch.float32, device=logits.device)
        if margin.dim() != 0 and tuple(margin.shape) != tuple(logits.shape):
            raise ValueError(
                f"bradley_terry_loss: margin has shape {tuple(margin.shape)} but must be a scalar or match "
                f"chosen_rewards {tuple(logits.shape)}, one margin per pair"
            )
        logits = logits - margin
    return -F.logsigmoid(logits)

"""Output heads other than the language-model head."""
from __future__ import annotations

import torch
from torch import nn

from aligner.models.transformer import Transformer


class ValueHead(nn.Linear):
    """Scalar head ``[B, T, D] -> [B, T, 1]`` for reward and critic models (a linear map with bias)."""

    def __init__(self, hidden_size: int):
        super().__init__(hidden_size, 1, bias=True)


def attach_value_head(model: Transformer, std: float | None = None) -> Transformer:
    """Replace the LM head of ``model`` by a freshly initialised ValueHead, in place.

    The initial scale ``1 / sqrt(D + 1)`` keeps the first rewards of order one, as TRL and OpenRLHF do.
    """
    head = ValueHead(model.config.hidden_size).to(device=model.norm.weight.device, dtype=model.norm.weight.dtype)
    with torch.no_grad():
        head.weight.normal_(0.0, std if std is not None else 1.0 / (model.config.hidden_size + 1) ** 0.5)
        head.bias.zero_()
    model.output = head
    return model


def has_value_head(model: nn.Module) -> bool:
    """Whether ``model`` ends in a scalar value head rather than the LM head."""
    return isinstance(getattr(model, "output", None), ValueHead)

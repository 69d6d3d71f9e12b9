"""A tokenized training example (or a packed row of several), before collation."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenizedExample:
    """Token ids and which of them the model is trained to produce, UNSHIFTED.

    ``loss_mask[t]`` is True when token ``t`` is a target (an assistant token); :func:`aligner.data.collate.collate`
    turns that into shifted labels, the one place where shifting happens. Ids are kept as int32 to halve
    the memory of a large dataset; collation makes them int64.
    """

    input_ids: torch.Tensor  # [L] int32
    loss_mask: torch.Tensor  # [L] bool
    document_ids: torch.Tensor | None = None  # [L] int32; packed rows only: which example each token belongs to

    def __len__(self) -> int:
        return self.input_ids.numel()

    @property
    def num_loss_tokens(self) -> int:
        """Tokens that carry loss (the first token of a sequence never does: nothing predicts it)."""
        return int(self.loss_mask[1:].sum())

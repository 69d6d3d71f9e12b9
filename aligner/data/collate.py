"""Turn tokenized examples into the batch dict the model wrappers consume (the issue-3 batch contract).

This is the one place where labels are shifted: ``labels[:, t]`` is the token at ``t + 1`` when that token
is a target (``loss_mask``), else -100; the last position is always -100. In packed rows a label never
crosses from one document into the next.
"""
from __future__ import annotations

import torch

from aligner.data.example import TokenizedExample

IGNORE_INDEX = -100  # label of a position without loss (torch's cross_entropy default ignore_index)


def shift_labels(tokens: torch.Tensor, loss_mask: torch.Tensor,
                 document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Labels for next-token prediction: ``labels[:, t] = tokens[:, t+1]`` where token t+1 is a target."""
    labels = torch.full_like(tokens, IGNORE_INDEX)  # [N, T]
    target = loss_mask[:, 1:]  # [N, T-1]: is the token being predicted a target?
    if document_ids is not None:
        target = target & (document_ids[:, 1:] == document_ids[:, :-1])
    labels[:, :-1] = torch.where(target, tokens[:, 1:], IGNORE_INDEX)
    return labels


def collate(examples: list[TokenizedExample], pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Batch dict of ``examples``: right-padded rows, or packed rows (all of one kind).

    Padded rows give ``tokens``, ``labels``, ``attention_mask`` (1 real, 0 pad), padded to the longest example
    rounded up to ``pad_to_multiple_of`` (the TP degree under sequence parallelism). Packed rows (examples
    with ``document_ids``) give ``tokens``, ``labels``, ``document_ids``; the model derives per-document
    positions from ``document_ids``. All int64, shape ``[N, T]``.
    """
    if not examples:
        raise ValueError("collate got no examples; a batch needs at least one")
    packed = examples[0].document_ids is not None
    if any((e.document_ids is not None) != packed for e in examples):
        raise ValueError("collate got packed rows mixed with unpacked examples; build a batch from one dataset")
    longest = max(len(e) for e in examples)
    T = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    N = len(examples)
    tokens = torch.full((N, T), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(N, T, dtype=torch.bool)
    real = torch.zeros(N, T, dtype=torch.long)
    documents = torch.zeros(N, T, dtype=torch.long) if packed else None
    for i, e in enumerate(examples):
        L = len(e)
        tokens[i, :L] = e.input_ids
        loss_mask[i, :L] = e.loss_mask
        real[i, :L] = 1
        if packed:
            documents[i, :L] = e.document_ids
            documents[i, L:] = int(e.document_ids.max()) + 1  # rounding-up padding: a document of its own
    batch = {"tokens": tokens, "labels": shift_labels(tokens, loss_mask, documents)}
    if packed:
        batch["document_ids"] = documents
    else:
        batch["attention_mask"] = real
    return batch

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


def pad_rows(rows: list[dict[str, torch.Tensor]], pads: dict[str, float | bool],
             multiple: int = 1) -> dict[str, torch.Tensor]:
    """Rows of 1-D tensors (``rows[i][key]``, all of row ``i``'s as long as its ``tokens``) right-padded into
    ``[N, T]`` tensors of their dtype filled with ``pads[key]``, plus ``attention_mask`` (int64, 1 on each row's
    tokens). ``T`` is the longest row rounded up to ``multiple``."""
    width = -(-max(len(r["tokens"]) for r in rows) // multiple) * multiple
    out = {key: torch.full((len(rows), width), pad, dtype=rows[0][key].dtype) for key, pad in pads.items()}
    out["attention_mask"] = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        length = len(row["tokens"])
        for key in pads:
            out[key][r, :length] = row[key]
        out["attention_mask"][r, :length] = 1
    return out


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
    rows = [{"tokens": e.input_ids.long(), "loss_mask": e.loss_mask,
             **({"document_ids": e.document_ids.long()} if packed else {})} for e in examples]
    padded = pad_rows(rows, {"tokens": pad_id, "loss_mask": False, **({"document_ids": 0} if packed else {})},
                      pad_to_multiple_of)
    documents = padded.get("document_ids")
    if packed:
        for i, e in enumerate(examples):
            documents[i, len(e):] = int(e.document_ids.max()) + 1  # rounding-up padding: a document of its own
    batch = {"tokens": padded["tokens"], "labels": shift_labels(padded["tokens"], padded["loss_mask"], documents)}
    if packed:
        batch["document_ids"] = documents
    else:
        batch["attention_mask"] = padded["attention_mask"]
    return batch


def shared_prefix_length(first: TokenizedExample, second: TokenizedExample) -> int:
    """Tokens two rows can share as one prefix: their common leading prompt tokens (no loss on either) less one.

    The last common prompt token stays in each branch: it is the position that predicts the branch's first
    response token, and one position can carry only one label.
    """
    n = min(len(first), len(second))
    same = (first.input_ids[:n] == second.input_ids[:n]) & ~first.loss_mask[:n] & ~second.loss_mask[:n]
    common = n if bool(same.all()) else int((~same).nonzero()[0])
    return max(common - 1, 0)


def collate_shared_prompt(pairs: list[tuple[TokenizedExample, TokenizedExample]], pad_id: int,
                          pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Batch dict of preference pairs, one row each: ``[shared prompt | chosen | rejected]``.

    Every per-token value is what the pair's two separate rows (:func:`collate` of ``[chosen, rejected]``)
    would have: the rejected branch repeats the chosen row's positions after the shared prefix, and
    ``branch_ids`` (0 prefix, 1 chosen, 2 rejected) keeps it from attending to the chosen branch
    (``Transformer.forward``). So the model sees the same inputs and the labels are the same tokens, while
    the prompt is run once per pair instead of twice. Returns ``tokens``, ``labels``, ``attention_mask``,
    ``position_ids``, ``branch_ids``: int64 ``[N, T]``, right-padded to a multiple of ``pad_to_multiple_of``.
    """
    if not pairs:
        raise ValueError("collate_shared_prompt got no pairs; a batch needs at least one")
    rows = []
    for chosen, rejected in pairs:
        shared = shared_prefix_length(chosen, rejected)
        labels = [shift_labels(e.input_ids[None].long(), e.loss_mask[None])[0] for e in (chosen, rejected)]
        nc, nr = len(chosen), len(rejected)
        rows.append({"tokens": torch.cat([chosen.input_ids.long(), rejected.input_ids[shared:].long()]),
                     "labels": torch.cat([labels[0], labels[1][shared:]]),
                     "position_ids": torch.cat([torch.arange(nc), torch.arange(shared, nr)]),
                     "branch_ids": torch.tensor([0] * shared + [1] * (nc - shared) + [2] * (nr - shared))})
    return pad_rows(rows, {"tokens": pad_id, "labels": IGNORE_INDEX, "position_ids": 0, "branch_ids": 0},
                    pad_to_multiple_of)

"""Pack tokenized examples into rows of exactly ``max_seq_len`` tokens, attention kept inside each example.

Best-fit decreasing: examples are placed longest first (ties in dataset order), each into the row whose
free space fits it most tightly, else a new row. No example is split across rows (an example longer than
``max_seq_len`` was already truncated or dropped by :mod:`aligner.data.sft`), so every loss token keeps
its whole prompt in context. Within a row, examples keep their dataset order. The result depends only
on the examples' lengths and order, so every rank and every run packs identically.

``document_ids`` number a row's examples 0, 1, ...; the padding that fills the row's end is one more
document (its own id, ``loss_mask`` False), so it attends to nothing real and nothing real attends to it.
"""
from __future__ import annotations

import bisect

import torch

from aligner.data.example import TokenizedExample


def assign_rows(lengths: list[int], max_seq_len: int) -> list[list[int]]:
    """Indices of the examples in each row (best-fit decreasing); each row's lengths sum to <= max_seq_len."""
    if lengths and max(lengths) > max_seq_len:
        raise ValueError(f"an example has {max(lengths)} tokens, more than max_seq_len={max_seq_len}; truncate or "
                         f"drop over-long examples before packing")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row index), sorted: the tightest fit is found by bisect
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # stable: ties stay in dataset order
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            rows.append([i])
            room = max_seq_len - lengths[i]
            row = len(rows) - 1
        else:
            room, row = free.pop(at)
            rows[row].append(i)
            room -= lengths[i]
        if room > 0:
            bisect.insort(free, (room, row))
    return [sorted(members) for members in rows]


def pack_examples(examples: list[TokenizedExample], max_seq_len: int, pad_id: int) -> list[TokenizedExample]:
    """Rows of exactly ``max_seq_len`` tokens, each holding whole examples plus end padding, with ``document_ids``."""
    packed = []
    for members in assign_rows([len(e) for e in examples], max_seq_len):
        used = sum(len(examples[i]) for i in members)
        pad = max_seq_len - used
        ids = [examples[i].input_ids for i in members] + [torch.full((pad,), pad_id, dtype=torch.int32)]
        mask = [examples[i].loss_mask for i in members] + [torch.zeros(pad, dtype=torch.bool)]
        docs = [torch.full((len(examples[i]),), d, dtype=torch.int32) for d, i in enumerate(members)]
        docs.append(torch.full((pad,), len(members), dtype=torch.int32))
        packed.append(TokenizedExample(torch.cat(ids), torch.cat(mask), torch.cat(docs)))
    return packed

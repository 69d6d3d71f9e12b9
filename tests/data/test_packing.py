"""Packing: whole examples in rows of exactly max_seq_len, document ids, padding as its own document."""
import torch

from aligner.data import TokenizedExample, collate, pack_examples
from aligner.data.packing import assign_rows

PAD = 0


def make_example(i, length):
    """Example i: ids 1000 * (i + 1) + position (never the pad id); loss on the second half."""
    ids = torch.arange(length, dtype=torch.int32) + 1000 * (i + 1)
    mask = torch.arange(length) >= length // 2
    return TokenizedExample(ids, mask)


def test_best_fit_decreasing_rows():
    # Longest first, each into the fullest row it fits: 9+1, 8+2, 7+3, 6+4, 5 (+5 padding).
    assert assign_rows([5, 3, 8, 2, 6, 4, 7, 1, 9], 10) == [[7, 8], [2, 3], [1, 6], [4, 5], [0]]
    assert assign_rows([10, 10, 1], 10) == [[0], [1], [2]]
    assert assign_rows([], 10) == []


def test_rows_hold_whole_examples_with_document_ids_and_padding():
    lengths = [5, 3, 8, 2, 6, 4, 7, 1, 9]
    examples = [make_example(i, n) for i, n in enumerate(lengths)]
    rows = pack_examples(examples, max_seq_len=10, pad_id=PAD)
    assert len(rows) == 5 and all(len(r) == 10 and r.input_ids.dtype == torch.int32 for r in rows)
    for row, members in zip(rows, [[7, 8], [2, 3], [1, 6], [4, 5], [0]]):
        used = sum(lengths[i] for i in members)
        pad = 10 - used
        padding = torch.full((pad,), PAD, dtype=torch.int32)
        expected_ids = torch.cat([examples[i].input_ids for i in members] + [padding])
        expected_docs = [d for d, i in enumerate(members) for _ in range(lengths[i])] + [len(members)] * pad
        assert torch.equal(row.input_ids, expected_ids)  # whole examples, in dataset order, then padding
        assert row.document_ids.tolist() == expected_docs  # the padding is a document of its own
        assert torch.equal(row.loss_mask[:used], torch.cat([examples[i].loss_mask for i in members]))
        assert not row.loss_mask[used:].any()
    again = pack_examples(examples, max_seq_len=10, pad_id=PAD)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(rows, again))  # deterministic


def test_packed_batch_labels_stay_inside_documents():
    a = TokenizedExample(torch.tensor([11, 12, 13], dtype=torch.int32), torch.tensor([False, True, True]))
    b = TokenizedExample(torch.tensor([21, 22, 23, 24], dtype=torch.int32), torch.tensor([True, False, True, True]))
    rows = pack_examples([a, b], max_seq_len=9, pad_id=PAD)
    assert len(rows) == 1
    row = rows[0]
    assert row.input_ids.tolist() == [11, 12, 13, 21, 22, 23, 24, PAD, PAD]
    assert row.document_ids.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2]
    batch = collate(rows, PAD)
    assert set(batch) == {"tokens", "labels", "document_ids"}
    # b's first token is marked as loss, but the last token of a must not predict across the boundary.
    assert batch["labels"].tolist() == [[12, 13, -100, -100, 23, 24, -100, -100, -100]]
    assert batch["document_ids"].dtype == torch.long and batch["tokens"].tolist()[0][:3] == [11, 12, 13]
    rounded = collate(rows, PAD, pad_to_multiple_of=4)
    assert rounded["tokens"].shape == (1, 12) and rounded["document_ids"][0, 9:].tolist() == [3, 3, 3]
    assert (rounded["labels"][0, 8:] == -100).all()

"""build_sft_data: cache hits give identical tensors, edits invalidate, corrupt files rebuild; splits; shipped data."""
import os
from pathlib import Path

import pytest
import torch

import aligner.data.dataset as dataset_module
from aligner.config.schema import DataConfig
from aligner.data import DataError, build_sft_data, build_sft_datasets

pytestmark = pytest.mark.slow  # needs the fetched SmolLM2 tokenizer

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"


def chat(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


RECORDS = [chat(f"What is {i} + {i}?", f"Answer: {2 * i}.") for i in range(12)]


@pytest.fixture
def count_reads(monkeypatch):
    """How many times build_sft_data read a data file."""
    calls = []
    real = dataset_module.read_records
    monkeypatch.setattr(dataset_module, "read_records", lambda path: calls.append(path) or real(path))
    return calls


def build(path, tokenizer, cache_dir, packing=False, **kw):
    return build_sft_data(path, tokenizer, max_seq_len=kw.pop("max_seq_len", 128), overlong="truncate",
                          packing=packing, cache_dir=cache_dir, empty_response="error", **kw)


@pytest.mark.parametrize("packing", [False, True])
def test_cache_hit_returns_identical_tensors_without_reading(smol_tokenizer, write_jsonl, tmp_path, count_reads,
                                                              packing):
    path = write_jsonl("train.jsonl", RECORDS)
    first = build(path, smol_tokenizer, tmp_path / "cache", packing=packing)
    assert len(count_reads) == 1 and len(list((tmp_path / "cache").glob("sft-train.jsonl-*.pt"))) == 1
    second = build(path, smol_tokenizer, tmp_path / "cache", packing=packing)
    assert len(count_reads) == 1  # served from the cache
    assert len(first) == len(second) == (6 if packing else 12)  # ~45-token chats: two per 128-token row
    for a, b in zip(first.examples, second.examples):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.loss_mask, b.loss_mask)
        assert (a.document_ids is None) == (not packing) and (b.document_ids is None) == (not packing)
        if packing:
            assert torch.equal(a.document_ids, b.document_ids)
    assert first.stats == second.stats and first.stats.n_records == 12 and first.stats.n_rows == len(first)
    batch_a, batch_b = first.batch([2, 0]), second.batch([2, 0])
    assert batch_a.keys() == batch_b.keys() and all(torch.equal(batch_a[k], batch_b[k]) for k in batch_a)
    assert ("document_ids" in batch_a) == packing and ("attention_mask" in batch_a) != packing


def test_a_changed_file_or_setting_invalidates_the_cache(smol_tokenizer, write_jsonl, tmp_path, count_reads):
    path = write_jsonl("train.jsonl", RECORDS)
    before = build(path, smol_tokenizer, tmp_path)
    build(path, smol_tokenizer, tmp_path, max_seq_len=64)  # another setting: another entry
    assert len(count_reads) == 2
    write_jsonl("train.jsonl", RECORDS[:5] + [chat("What is 100 + 100?", "Answer: 200.")] + RECORDS[6:])
    os.utime(path, ns=(1, 1))  # even with an old mtime, the key also covers the size
    after = build(path, smol_tokenizer, tmp_path)
    assert len(count_reads) == 3
    assert smol_tokenizer.decode(after.examples[5].input_ids[after.examples[5].loss_mask].tolist()) == \
        "Answer: 200.<|im_end|>"
    assert torch.equal(after.examples[4].input_ids, before.examples[4].input_ids)


def test_a_corrupt_cache_file_is_rebuilt(smol_tokenizer, write_jsonl, tmp_path, count_reads):
    path = write_jsonl("train.jsonl", RECORDS)
    good = build(path, smol_tokenizer, tmp_path / "cache")
    (cache_file,) = (tmp_path / "cache").glob("*.pt")
    cache_file.write_bytes(cache_file.read_bytes()[:100])  # a write cut short
    rebuilt = build(path, smol_tokenizer, tmp_path / "cache")
    assert len(count_reads) == 2
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(good.examples, rebuilt.examples))
    assert cache_file.stat().st_size > 100 and not list((tmp_path / "cache").glob(".*.tmp"))


def test_a_bad_record_stops_before_anything_is_written(smol_tokenizer, write_jsonl, tmp_path):
    path = write_jsonl("train.jsonl", RECORDS[:3] + ['{"messages": [}'] + RECORDS[3:])
    with pytest.raises(DataError, match=r"train.jsonl:4: invalid JSON"):
        build(path, smol_tokenizer, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
    with pytest.raises(DataError, match=r"no such file"):
        build(tmp_path / "missing.jsonl", smol_tokenizer, tmp_path / "cache")


def test_validation_split_is_seeded_and_disjoint(smol_tokenizer, write_jsonl, tmp_path):
    path = write_jsonl("train.jsonl", RECORDS)
    cfg = DataConfig(train=str(path), validation_split=0.25, cache_dir=str(tmp_path))
    train, val = build_sft_datasets(cfg, smol_tokenizer, max_seq_len=128, packing=False, seed=7)
    assert (len(train), len(val)) == (9, 3)
    ids = lambda data: {tuple(e.input_ids.tolist()) for e in data.examples}  # noqa: E731
    assert not ids(train) & ids(val) and len(ids(train) | ids(val)) == 12
    train2, val2 = build_sft_datasets(cfg, smol_tokenizer, max_seq_len=128, packing=False, seed=7)
    assert ids(val2) == ids(val)  # served from the cache
    prompts = val2.prompts(5)  # the held-out records' questions, read back from the file
    assert len(prompts) == 3 and all(len(p) == 1 and p[0]["role"] == "user" for p in prompts)
    questions = {r["messages"][0]["content"]: r for r in RECORDS}
    assert {tuple(smol_tokenizer.encode(smol_tokenizer.apply_chat_template(questions[p[0]["content"]]["messages"])
                                        .removesuffix("\n"))) for p in prompts} == ids(val)
    _, val3 = build_sft_datasets(cfg, smol_tokenizer, max_seq_len=128, packing=False, seed=8)
    assert ids(val3) != ids(val)
    with pytest.raises(DataError, match=r"both data.validation .* and data.validation_split .* are set"):
        build_sft_datasets(DataConfig(train=str(path), validation=str(path), validation_split=0.1), smol_tokenizer,
                           128, False, 7)
    with pytest.raises(DataError, match=r"data.train is not set"):
        build_sft_datasets(DataConfig(), smol_tokenizer, 128, False, 7)


def test_shipped_sft_data(smol_tokenizer, tmp_path):
    cfg = DataConfig(train=str(EXAMPLES / "sft_train.jsonl"), validation=str(EXAMPLES / "sft_val.jsonl"),
                     cache_dir=str(tmp_path))
    train, val = build_sft_datasets(cfg, smol_tokenizer, max_seq_len=256, packing=False, seed=0)
    assert (train.stats.n_records, val.stats.n_records) == (70, 16)
    assert train.stats.n_truncated == train.stats.n_dropped == val.stats.n_truncated == 0
    assert max(len(e) for e in train.examples) < 100  # short chats: fast CPU steps
    assert val.prompts(2) == [[{"role": "user", "content": "Name the capital of Italy."}],
                              [{"role": "user", "content": "Egypt's capital city is what?"}]]
    assert val.describe().startswith(f"{EXAMPLES / 'sft_val.jsonl'}: 16 records -> 16 examples (0 truncated")
    for data in (train, val):
        for e in data.examples:
            reply = smol_tokenizer.decode(e.input_ids[e.loss_mask].tolist())
            assert reply.startswith("Answer: ") and reply.endswith(".<|im_end|>")  # the pattern SFT learns

"""KTO data with the real SmolLM2 tokenizer: exact rows and labels, the fixed KL mismatch (a seeded derangement),
truncation, label counts, errors, cache hits, and the shipped KTO data."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from aligner.data import DataError, build_kto_data, build_kto_datasets, seeded_derangement

pytestmark = pytest.mark.slow  # needs the fetched SmolLM2 tokenizer

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"
RECORDS = [{"prompt": "What is 2 + 2?", "completion": "Sure! 2 + 2 = 4.", "label": True},
           {"prompt": "Hi!", "completion": "What do you want?", "label": False},
           {"prompt": "Name a colour.", "completion": "Blue is a colour.", "label": True},
           {"prompt": "What is 3 + 3?", "completion": "Figure it out yourself.", "label": False},
           {"prompt": "Good night!", "completion": "Good night! Sleep well.", "label": True}]


def build(path, tokenizer, cache_dir, max_seq_len=128, overlong="truncate", empty_response="error", seed=0):
    return build_kto_data(path, tokenizer, max_seq_len, overlong, cache_dir, empty_response, seed)


def decoded(tokenizer, batch, row):
    """(the row's real tokens decoded, its label tokens decoded)."""
    labels = batch["labels"][row]
    real = batch["tokens"][row][batch["attention_mask"][row].bool()]
    return tokenizer.decode(real.tolist()), tokenizer.decode(labels[labels != -100].tolist())


def render_prompt(tokenizer, prompt):
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)


def test_rows_and_labels_are_exact(smol_tokenizer, write_jsonl, tmp_path):
    data = build(write_jsonl("k.jsonl", RECORDS), smol_tokenizer, tmp_path)
    assert (len(data), data.n_desirable, data.n_undesirable) == (5, 3, 2)
    batch = data.batch([1, 0])
    assert set(batch) == {"tokens", "labels", "attention_mask", "example_index", "desirable"}
    assert batch["example_index"].tolist() == [1, 0] and batch["desirable"].tolist() == [False, True]
    for row, record in enumerate((RECORDS[1], RECORDS[0])):
        prompt = render_prompt(smol_tokenizer, record["prompt"])
        expected = smol_tokenizer.encode(prompt + record["completion"] + "<|im_end|>")
        n_prompt = len(smol_tokenizer.encode(prompt))
        assert batch["tokens"][row, :len(expected)].tolist() == expected
        assert (batch["labels"][row] != -100).nonzero().flatten().tolist() == list(range(n_prompt - 1,
                                                                                         len(expected) - 1))
        assert decoded(smol_tokenizer, batch, row)[1] == record["completion"] + "<|im_end|>"
    assert batch["tokens"].shape[1] % 8 == 0 and batch["tokens"].dtype == torch.long


def test_kl_rows_join_each_prompt_to_the_fixed_mismatched_completion(smol_tokenizer, write_jsonl, tmp_path):
    data = build(write_jsonl("k.jsonl", RECORDS), smol_tokenizer, tmp_path, seed=7)
    mismatch = data.mismatch.tolist()
    assert sorted(mismatch) == list(range(5)) and all(j != i for i, j in enumerate(mismatch))
    kl = data.kl_batch([0, 3, 4])
    assert kl.keys() == data.batch([0]).keys()
    assert kl["example_index"].tolist() == [0, 3, 4] and kl["desirable"].tolist() == [True, False, True]
    for row, i in enumerate([0, 3, 4]):
        other = RECORDS[mismatch[i]]["completion"]
        text, labels = decoded(smol_tokenizer, kl, row)
        assert text == render_prompt(smol_tokenizer, RECORDS[i]["prompt"]) + other + "<|im_end|>"
        assert labels == other + "<|im_end|>"
    # Fixed per dataset: the same rows at every call, and for a rebuilt dataset with the same seed.
    again = build(write_jsonl("k.jsonl", RECORDS), smol_tokenizer, tmp_path, seed=7).kl_batch([0, 3, 4])
    assert all(torch.equal(kl[k], again[k]) for k in kl)
    # The reference pre-pass: every example's row and KL row, in chunks.
    chunks = [data.kl_batch(list(range(s, min(s + 2, 5)))) for s in range(0, 5, 2)]
    assert [decoded(smol_tokenizer, c, r)[1] for c in chunks for r in range(len(c["tokens"]))] == \
        [RECORDS[j]["completion"] + "<|im_end|>" for j in mismatch]


def test_seeded_derangement_has_no_fixed_point_and_depends_on_the_seed():
    for n in range(2, 40):
        perm = seeded_derangement(n, seed=1)
        assert sorted(perm.tolist()) == list(range(n)) and (perm != torch.arange(n)).all()
        assert torch.equal(perm, seeded_derangement(n, seed=1))
    assert seeded_derangement(2, seed=5).tolist() == [1, 0]
    assert not torch.equal(seeded_derangement(30, seed=1), seeded_derangement(30, seed=2))
    with pytest.raises(ValueError, match="at least 2 elements, got 1"):
        seeded_derangement(1, seed=0)


def test_over_long_examples_and_kl_rows_fit_max_seq_len(smol_tokenizer, write_jsonl, tmp_path):
    long_completion = " ".join(["word"] * 60)
    records = [{"prompt": "Say words.", "completion": long_completion, "label": True},
               {"prompt": " ".join(["long"] * 10), "completion": "ok", "label": False},
               {"prompt": " ".join(["long"] * 80), "completion": "a", "label": True}]
    n_prompt = len(smol_tokenizer.encode(render_prompt(smol_tokenizer, "Say words.")))
    max_len = n_prompt + 20
    data = build(write_jsonl("k.jsonl", records), smol_tokenizer, tmp_path, max_seq_len=max_len)
    s = data.stats
    assert (s.n_examples, s.n_truncated, s.n_dropped_no_loss, s.n_desirable, s.n_undesirable) == (2, 1, 1, 1, 1)
    batch = data.batch([0, 1])
    assert batch["attention_mask"].sum(1).tolist()[0] == max_len
    assert decoded(smol_tokenizer, batch, 0)[1] == " ".join(["word"] * 20)
    kl = data.kl_batch([0, 1])  # n=2: each takes the other's completion
    assert data.mismatch.tolist() == [1, 0]
    assert decoded(smol_tokenizer, kl, 0)[1] == "ok<|im_end|>"
    n_long_prompt = len(smol_tokenizer.encode(render_prompt(smol_tokenizer, records[1]["prompt"])))
    assert n_long_prompt + 2 <= max_len < n_long_prompt + 20  # the example fits, its KL row would not
    assert kl["attention_mask"][1].sum() == max_len  # so the KL row is cut to max_seq_len, never dropped
    assert decoded(smol_tokenizer, kl, 1)[1] == " ".join(["word"] * (max_len - n_long_prompt))
    with pytest.raises(DataError, match=r"k.jsonl: .*2 dropped as over-long.*KTO needs at least 2 examples"):
        build(write_jsonl("k.jsonl", records), smol_tokenizer, tmp_path, max_seq_len=max_len, overlong="drop")


def test_errors_name_file_line_and_field(smol_tokenizer, write_jsonl, tmp_path):
    with pytest.raises(DataError, match=r"k.jsonl:2: field 'label': expected true or false, got int 1"):
        build(write_jsonl("k.jsonl", [RECORDS[0], dict(RECORDS[1], label=1)]), smol_tokenizer, tmp_path)
    with pytest.raises(DataError, match=r"e.jsonl:1: field 'completion': empty response"):
        build(write_jsonl("e.jsonl", [dict(RECORDS[0], completion=""), RECORDS[1]]), smol_tokenizer, tmp_path)
    skipped = build(write_jsonl("s.jsonl", [dict(RECORDS[0], completion=""), *RECORDS[1:]]), smol_tokenizer, tmp_path,
                    empty_response="skip")
    assert (skipped.stats.n_skipped_empty, len(skipped)) == (1, 4)
    assert "1 skipped with an empty completion" in skipped.describe()
    with pytest.raises(DataError, match=r"one.jsonl: .*KTO needs at least 2 examples"):
        build(write_jsonl("one.jsonl", RECORDS[:1]), smol_tokenizer, tmp_path)


def test_cache_hit_and_split_rules(smol_tokenizer, write_jsonl, tmp_path):
    path = write_jsonl("k.jsonl", [dict(RECORDS[i % 5], prompt=f"Question {i}?") for i in range(10)])
    cfg = SimpleNamespace(train=str(path), validation=None, validation_split=0.3, overlong="truncate",
                          empty_response="error", identical_pairs="error", cache_dir=str(tmp_path))
    train, val = build_kto_datasets(cfg, smol_tokenizer, 128, seed=1)
    assert (len(train), len(val)) == (7, 3) and len(list(tmp_path.glob("kto-k.jsonl-*.pt"))) == 2
    train_again, _ = build_kto_datasets(cfg, smol_tokenizer, 128, seed=1)
    for name in ("batch", "kl_batch"):
        a, b = getattr(train, name)(list(range(7))), getattr(train_again, name)(list(range(7)))
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert train.stats == train_again.stats and len(list(tmp_path.glob("kto-*.pt"))) == 2  # hits: no new entry
    prompts = [m[0]["content"] for m in train.prompts(7) + val.prompts(3)]
    assert sorted(prompts) == sorted(f"Question {i}?" for i in range(10))


def test_shipped_kto_data_has_the_recommended_label_balance(smol_tokenizer, tmp_path):
    pairs = {json.loads(line)["prompt"]: json.loads(line)
             for line in (EXAMPLES / "preference_train.jsonl").read_text().splitlines()}
    records = [json.loads(line) for line in (EXAMPLES / "kto_train.jsonl").read_text().splitlines()]
    assert len(records) == 400 and {r["prompt"] for r in records} == set(pairs)
    for r in records:  # a desirable completion is the pair's chosen reply, an undesirable one its rejected
        assert r["completion"] == pairs[r["prompt"]]["chosen" if r["label"] else "rejected"]
    cfg = SimpleNamespace(train=str(EXAMPLES / "kto_train.jsonl"), validation=str(EXAMPLES / "kto_val.jsonl"),
                          validation_split=0.0, overlong="drop", empty_response="error", identical_pairs="error",
                          cache_dir=str(tmp_path))
    train, val = build_kto_datasets(cfg, smol_tokenizer, 256, seed=0)
    assert (train.n_desirable, train.n_undesirable, val.n_desirable, val.n_undesirable) == (220, 180, 55, 45)
    assert 1 <= train.n_desirable / train.n_undesirable <= 4 / 3  # the KTO paper's recommended range at weights 1

"""Preference pairs with the real SmolLM2 tokenizer: exact tokens and labels, interleaved rows, identical / empty /
over-long pairs counted or reported, margins, cache hits, and the shipped preference data."""
import json
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import aligner.data.preference_dataset as preference_dataset_module
from aligner.data import DataError, build_preference_data, build_preference_datasets
from aligner.trainers.sft import real_tokens

pytestmark = pytest.mark.slow  # needs the fetched SmolLM2 tokenizer

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"
PAIR = {"prompt": "What is 2 + 2?", "chosen": "Sure! 2 + 2 = 4.", "rejected": "Ugh. It is 4, obviously."}
PAIRS = [PAIR,
         {"prompt": "Hi!", "chosen": "Hello! How can I help you today?", "rejected": "What do you want?"},
         {"prompt": "Name a colour.", "chosen": "Blue is a colour.", "rejected": "No."}]


def build(path, tokenizer, cache_dir, max_seq_len=128, overlong="truncate", empty_response="error",
          identical_pairs="error", **kw):
    return build_preference_data(path, tokenizer, max_seq_len, overlong, cache_dir, empty_response, identical_pairs,
                                 **kw)


def row_text(tokenizer, batch, row):
    """(the row's real tokens decoded, its label tokens decoded)."""
    real = batch["attention_mask"][row].bool()
    labels = batch["labels"][row]
    return tokenizer.decode(batch["tokens"][row][real].tolist()), tokenizer.decode(labels[labels != -100].tolist())


def test_tokens_and_shifted_labels_of_a_pair_are_exact(smol_tokenizer, write_jsonl, tmp_path):
    data = build(write_jsonl("p.jsonl", [PAIR]), smol_tokenizer, tmp_path)
    batch = data.batch([0])
    assert set(batch) == {"tokens", "labels", "attention_mask", "pair_index", "is_chosen"}  # no margin column
    prompt = smol_tokenizer.apply_chat_template([{"role": "user", "content": PAIR["prompt"]}],
                                                add_generation_prompt=True)
    n_prompt = len(smol_tokenizer.encode(prompt))
    for row, reply in ((0, PAIR["chosen"]), (1, PAIR["rejected"])):
        expected = smol_tokenizer.encode(prompt + reply + "<|im_end|>")
        L = len(expected)
        assert batch["tokens"][row, :L].tolist() == expected
        assert (batch["tokens"][row, L:] == smol_tokenizer.pad_id).all()
        assert batch["attention_mask"][row].tolist() == [1] * L + [0] * (batch["tokens"].shape[1] - L)
        # Shifted: label t is token t+1; the first target is the first reply token, predicted at n_prompt - 1.
        targets = (batch["labels"][row] != -100).nonzero().flatten().tolist()
        assert targets == list(range(n_prompt - 1, L - 1))
        assert batch["labels"][row, n_prompt - 1:L - 1].tolist() == expected[n_prompt:]
        assert row_text(smol_tokenizer, batch, row)[1] == reply + "<|im_end|>"
    assert batch["tokens"].shape[1] % 8 == 0 and batch["tokens"].shape[1] - 8 < max(batch["attention_mask"].sum(1))
    assert batch["tokens"].dtype == batch["labels"].dtype == batch["attention_mask"].dtype == torch.long
    assert torch.equal(batch["tokens"][0, :n_prompt], batch["tokens"][1, :n_prompt])  # one shared prompt
    assert batch["pair_index"].tolist() == [0, 0] and batch["is_chosen"].tolist() == [True, False]
    assert data.stats.n_pairs == len(data) == 1
    assert data.stats.n_loss_tokens == sum(len(smol_tokenizer.encode(r + "<|im_end|>"))
                                           for r in (PAIR["chosen"], PAIR["rejected"]))


def test_rows_are_interleaved_per_pair_and_chunks_give_every_row(smol_tokenizer, write_jsonl, tmp_path):
    data = build(write_jsonl("p.jsonl", PAIRS), smol_tokenizer, tmp_path)
    batch = data.batch([2, 0, 1])
    assert batch["pair_index"].tolist() == [2, 2, 0, 0, 1, 1]
    assert batch["is_chosen"].tolist() == [True, False] * 3
    for i, pair in enumerate([PAIRS[2], PAIRS[0], PAIRS[1]]):
        assert row_text(smol_tokenizer, batch, 2 * i)[1] == pair["chosen"] + "<|im_end|>"
        assert row_text(smol_tokenizer, batch, 2 * i + 1)[1] == pair["rejected"] + "<|im_end|>"
    # A micro-batch of whole pairs is a contiguous row slice: rows 2..3 are pair 0's rows.
    single = data.batch([0])
    T = single["tokens"].shape[1]
    assert torch.equal(batch["tokens"][2:4, :T], single["tokens"]) and torch.equal(batch["labels"][2:4, :T],
                                                                                    single["labels"])
    # The reference pre-pass: all rows in chunks, row 2i / 2i+1 of the whole = pair i.
    chunks = [data.batch(list(range(s, min(s + 2, len(data))))) for s in range(0, len(data), 2)]
    assert torch.cat([c["pair_index"] for c in chunks]).tolist() == [0, 0, 1, 1, 2, 2]
    assert [row_text(smol_tokenizer, c, r)[1] for c in chunks for r in range(len(c["tokens"]))] == \
        [p[k] + "<|im_end|>" for p in PAIRS for k in ("chosen", "rejected")]


def test_shared_prompt_row_holds_both_rows_of_a_pair(smol_tokenizer, write_jsonl, tmp_path):
    """[prompt | chosen | rejected]: the chosen branch is the chosen row as it was, the rejected branch restarts
    at the prompt's last token with the rejected row's positions, labels and tokens."""
    data = build(write_jsonl("p.jsonl", PAIRS), smol_tokenizer, tmp_path)
    order = [2, 0, 1]
    rows, shared = data.batch(order), data.shared_prompt_batch(order)
    assert set(shared) == {"tokens", "labels", "attention_mask", "position_ids", "branch_ids", "pair_index"}
    assert shared["pair_index"].tolist() == order and shared["tokens"].shape[1] % 8 == 0
    for i, pair in enumerate(order):
        n_prompt = len(smol_tokenizer.encode(smol_tokenizer.apply_chat_template(
            [{"role": "user", "content": PAIRS[pair]["prompt"]}], add_generation_prompt=True)))
        S = n_prompt - 1  # the prompt's last token predicts each response's first token: one copy per branch
        nc, nr = (int(rows["attention_mask"][2 * i + k].sum()) for k in (0, 1))
        L = nc + nr - S
        assert shared["attention_mask"][i].tolist() == [1] * L + [0] * (shared["tokens"].shape[1] - L)
        assert shared["branch_ids"][i, :L].tolist() == [0] * S + [1] * (nc - S) + [2] * (nr - S)
        assert shared["position_ids"][i, :L].tolist() == list(range(nc)) + list(range(S, nr))
        for part, row, start in ((slice(0, nc), 2 * i, 0), (slice(nc, L), 2 * i + 1, S)):
            n = part.stop - part.start
            assert torch.equal(shared["tokens"][i, part], rows["tokens"][row, start:start + n])
            assert torch.equal(shared["labels"][i, part], rows["labels"][row, start:start + n])
    assert int(real_tokens(shared)) == int(real_tokens(rows))  # tokens/s counts the pairs' tokens either way
    with pytest.raises(ValueError, match="got no indices"):
        data.shared_prompt_batch([])


def test_multi_turn_prompt_and_message_list_responses(smol_tokenizer, write_jsonl, tmp_path):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
              {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"}]
    chosen = [{"role": "assistant", "content": "Rome."}, {"role": "user", "content": "Thanks"},
              {"role": "assistant", "content": "You're welcome!"}]
    data = build(write_jsonl("p.jsonl", [{"prompt": prompt, "chosen": chosen, "rejected": "Milan."}]),
                 smol_tokenizer, tmp_path)
    batch = data.batch([0])
    text, _ = row_text(smol_tokenizer, batch, 0)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and "Paris.<|im_end|>" in text
    labels = batch["labels"][0]
    runs = [[]]
    for t in labels.tolist():  # contiguous runs of label tokens
        if t != -100:
            runs[-1].append(t)
        elif runs[-1]:
            runs.append([])
    # Loss on the response's two answers only; the prompt's assistant turn "Paris." carries none.
    assert [smol_tokenizer.decode(r) for r in runs if r] == ["Rome.<|im_end|>", "You're welcome!<|im_end|>"]
    assert row_text(smol_tokenizer, batch, 1)[1] == "Milan.<|im_end|>"
    assert data.prompts(1) == [prompt]


def test_margin_column_is_on_both_rows_and_zero_where_absent(smol_tokenizer, write_jsonl, tmp_path):
    records = [dict(PAIRS[0], margin=2.5), PAIRS[1], dict(PAIRS[2], margin=-1)]
    data = build(write_jsonl("p.jsonl", records), smol_tokenizer, tmp_path)
    assert data.batch([2, 1, 0])["margin"].tolist() == [-1.0, -1.0, 0.0, 0.0, 2.5, 2.5]
    assert data.batch([0])["margin"].dtype == torch.float32
    bad = write_jsonl("bad.jsonl", [PAIRS[0], dict(PAIRS[1], margin="high")])
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'margin': expected a finite number, got string 'high'"):
        build(bad, smol_tokenizer, tmp_path)


def test_identical_pairs_are_an_error_or_a_counted_skip(smol_tokenizer, write_jsonl, tmp_path):
    # The same reply as a string and as a message list renders the same: identical too.
    same = {"prompt": "Hi", "chosen": "Hello!", "rejected": [{"role": "assistant", "content": "Hello!"}]}
    path = write_jsonl("p.jsonl", [PAIRS[0], PAIRS[1], same, dict(PAIRS[2], rejected=PAIRS[2]["chosen"])])
    with pytest.raises(DataError) as error:
        build(path, smol_tokenizer, tmp_path)
    message = str(error.value)
    assert message.startswith(f"{path}:3: chosen and rejected are identical")
    assert "set data.identical_pairs=skip to skip such pairs" in message
    assert message.endswith(f"(1 more such records: {path}:4)")
    assert not list(tmp_path.glob("*.pt"))  # nothing cached on failure
    data = build(path, smol_tokenizer, tmp_path, identical_pairs="skip")
    assert (data.stats.n_records, data.stats.n_skipped_identical, data.stats.n_pairs, len(data)) == (4, 2, 2, 2)
    assert "2 skipped as identical chosen/rejected" in data.describe() and data.describe().startswith(str(path))
    assert row_text(smol_tokenizer, data.batch([1]), 0)[1] == PAIRS[1]["chosen"] + "<|im_end|>"
    assert data.prompts(5) == [[{"role": "user", "content": p["prompt"]}] for p in PAIRS[:2]]


def test_empty_responses_and_badly_shaped_responses_name_file_line_and_field(smol_tokenizer, write_jsonl, tmp_path):
    path = write_jsonl("p.jsonl", [PAIRS[0], dict(PAIRS[1], rejected="  "), PAIRS[2]])
    with pytest.raises(DataError, match=r"p.jsonl:2: field 'rejected': empty response; .*data.empty_response=skip"):
        build(path, smol_tokenizer, tmp_path)
    data = build(path, smol_tokenizer, tmp_path, empty_response="skip")
    assert (data.stats.n_records, data.stats.n_skipped_empty, len(data)) == (2, 1, 2)
    assert "1 skipped with an empty response" in data.describe()
    starts_with_user = dict(PAIRS[0], chosen=[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}])
    with pytest.raises(DataError, match=r"q.jsonl:1: field 'chosen\[0\].role': the response starts with a 'user' "
                                        r"turn; start it with the assistant's reply"):
        build(write_jsonl("q.jsonl", [starts_with_user]), smol_tokenizer, tmp_path)
    with pytest.raises(DataError, match=r"r.jsonl:1: field 'rejected': missing"):
        build(write_jsonl("r.jsonl", [{"prompt": "a", "chosen": "b"}]), smol_tokenizer, tmp_path)


def test_over_long_pairs_are_truncated_keeping_the_prompt_or_dropped(smol_tokenizer, write_jsonl, tmp_path):
    long_reply = " ".join(["word"] * 60)
    prompt_len = len(smol_tokenizer.encode(smol_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say words."}], add_generation_prompt=True)))
    long_prompt = {"prompt": " ".join(["long"] * 80), "chosen": "a", "rejected": "b"}
    path = write_jsonl("p.jsonl", [PAIRS[0], {"prompt": "Say words.", "chosen": "Fine.", "rejected": long_reply},
                                   long_prompt])
    max_len = prompt_len + 20
    data = build(path, smol_tokenizer, tmp_path, max_seq_len=max_len)
    s = data.stats
    assert (s.n_pairs, s.n_truncated, s.n_dropped_no_loss, s.n_dropped_overlong) == (2, 1, 1, 0)
    batch = data.batch([1])
    assert batch["attention_mask"][1].sum() == max_len  # cut to max_seq_len ...
    assert batch["labels"][1, prompt_len - 1:max_len - 1].ne(-100).all()  # ... after the whole prompt: 20 reply tokens
    assert row_text(smol_tokenizer, batch, 1)[1] == " ".join(["word"] * 20)
    assert row_text(smol_tokenizer, batch, 0)[1] == "Fine.<|im_end|>"  # the other row of the pair is whole
    dropped = build(path, smol_tokenizer, tmp_path, max_seq_len=max_len, overlong="drop")
    assert (dropped.stats.n_pairs, dropped.stats.n_dropped_overlong, dropped.stats.n_truncated) == (1, 2, 0)
    assert dropped.stats.n_dropped == 2 and "2 dropped as over-long" in dropped.describe()
    with pytest.raises(DataError, match=r"p.jsonl: no pair left to train on .*raise trainer.max_seq_len or set "
                                        r"data.overlong=truncate"):
        build(path, smol_tokenizer, tmp_path, max_seq_len=10, overlong="drop")


def test_cache_hit_returns_identical_tensors_without_reading(smol_tokenizer, write_jsonl, tmp_path, monkeypatch):
    reads = []
    real = preference_dataset_module.read_records
    monkeypatch.setattr(preference_dataset_module, "read_records", lambda path: reads.append(path) or real(path))
    path = write_jsonl("p.jsonl", [dict(PAIRS[0], margin=1.5)] + PAIRS[1:])
    first = build(path, smol_tokenizer, tmp_path / "cache")
    second = build(path, smol_tokenizer, tmp_path / "cache")
    assert len(reads) == 1 and len(list((tmp_path / "cache").glob("preference-p.jsonl-*.pt"))) == 1
    a, b = first.batch([0, 1, 2]), second.batch([0, 1, 2])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) and "margin" in a
    assert first.stats == second.stats and first.record_index == second.record_index == [0, 1, 2]
    build(path, smol_tokenizer, tmp_path / "cache", identical_pairs="skip")  # another setting: another entry
    assert len(reads) == 2


def test_datasets_follow_the_split_rules(smol_tokenizer, write_jsonl, tmp_path):
    path = write_jsonl("p.jsonl", [dict(PAIRS[i % 3], prompt=f"Question {i}?") for i in range(10)])
    cfg = SimpleNamespace(train=str(path), validation=None, validation_split=0.2, overlong="truncate",
                          empty_response="error", identical_pairs="error", cache_dir=str(tmp_path))
    train, val = build_preference_datasets(cfg, smol_tokenizer, 128, seed=3)
    assert (len(train), len(val)) == (8, 2)
    held_out = {m[0]["content"] for m in val.prompts(2)}
    assert held_out.isdisjoint(m[0]["content"] for m in train.prompts(8)) and len(held_out) == 2
    cfg.validation = str(path)
    with pytest.raises(DataError, match="both data.validation .* and data.validation_split"):
        build_preference_datasets(cfg, smol_tokenizer, 128, seed=3)
    cfg.validation_split, cfg.train = 0.0, None
    with pytest.raises(DataError, match="data.train is not set"):
        build_preference_datasets(cfg, smol_tokenizer, 128, seed=3)


def test_shipped_preference_data_is_what_the_generator_writes_and_fits(smol_tokenizer, tmp_path):
    sys.path.insert(0, str(EXAMPLES))
    try:
        import make_preference_data as generator
    finally:
        sys.path.remove(str(EXAMPLES))
    pairs = generator.make_pairs(random.Random(generator.SEED))
    train = [json.loads(line) for line in (EXAMPLES / "preference_train.jsonl").read_text().splitlines()]
    val = [json.loads(line) for line in (EXAMPLES / "preference_val.jsonl").read_text().splitlines()]
    assert (len(train), len(val)) == (400, 100) and train + val == pairs[:500]  # deterministic
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in val}  # held-out prompts
    cfg = SimpleNamespace(train=str(EXAMPLES / "preference_train.jsonl"),
                          validation=str(EXAMPLES / "preference_val.jsonl"), validation_split=0.0,
                          overlong="drop", empty_response="error", identical_pairs="error", cache_dir=str(tmp_path))
    train_data, val_data = build_preference_datasets(cfg, smol_tokenizer, 256, seed=0)
    assert (len(train_data), len(val_data)) == (400, 100)  # nothing dropped at 256 tokens
    for data in (train_data, val_data):
        longest_reply = max(int(row.loss_mask.sum()) for row in data.rows)
        assert longest_reply < 60

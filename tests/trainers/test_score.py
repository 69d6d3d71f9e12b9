"""`aligner score`: each record shape gets the value head's output at its conversation's last token, bad records
are reported by file:line before anything is written, and a model without a value head is refused."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_model

from aligner.cli import main as cli
from aligner.data import DataError
from aligner.models import from_pretrained
from aligner.models.fetch import fetch_model
from aligner.models.heads import attach_value_head
from aligner.models.hf import save_hf_checkpoint
from aligner.models.tokenizer import load_tokenizer
from aligner.trainers.score import score_file


def _save(model, out: Path) -> Path:
    save_hf_checkpoint(model, model.config, out, tokenizer_dir=fetch_model("smollm2-135m-instruct"))
    return out


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory) -> Path:
    model = tiny_model(seed=0, vocab_size=49152, tie_word_embeddings=True, num_hidden_layers=2)
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = 1, 2, 2
    attach_value_head(model, std=0.5)
    return _save(model, tmp_path_factory.mktemp("rm") / "model")


def direct_score(rm_dir: Path, messages: list[dict]) -> float:
    model, tok = from_pretrained(rm_dir).eval(), load_tokenizer(rm_dir)
    ids = torch.tensor([tok.encode(tok.apply_chat_template(messages))])
    with torch.no_grad():
        return float(model(ids)[0, -1, 0])


def test_every_record_shape_gets_the_last_token_value(rm_dir, tmp_path):
    records = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there!"}], "id": 1},
        {"prompt": "Name a color.", "response": "Blue."},
        {"prompt": [{"role": "user", "content": "2+2?"}], "completion": "4"},
        {"prompt": "Say thanks.", "chosen": "Thank you!", "rejected": "No."},
    ]
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert cli(["score", str(rm_dir), str(data), "--batch-size", "2"]) == 0
    out = [json.loads(line) for line in (tmp_path / "in.scored.jsonl").read_text().splitlines()]
    assert [r.get("id") for r in out] == [1, None, None, None]  # columns kept, order kept
    expect = [
        direct_score(rm_dir, records[0]["messages"]),
        direct_score(rm_dir, [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}]),
        direct_score(rm_dir, [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]),
    ]
    for got, want in zip(out[:3], expect):
        assert abs(got["score"] - want) < 1e-5  # padded batches of 2 equal one-at-a-time
    pair = [{"role": "user", "content": "Say thanks."}]
    assert abs(out[3]["score_chosen"] - direct_score(rm_dir, pair + [{"role": "assistant", "content": "Thank you!"}])) < 1e-5
    assert abs(out[3]["score_rejected"] - direct_score(rm_dir, pair + [{"role": "assistant", "content": "No."}])) < 1e-5
    assert len({round(r.get("score", 0.0), 6) for r in out[:3]}) == 3  # distinct inputs, distinct scores


def test_bad_record_names_the_line_and_writes_nothing(rm_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + json.dumps({"prompt": "a"}) + "\n")
    with pytest.raises(DataError, match=rf"{data}:2: nothing to score"):
        score_file(str(rm_dir), str(data))
    data.write_text(json.dumps({"prompt": "a", "response": "b", "score": 3}) + "\n")
    with pytest.raises(DataError, match=rf"{data}:1: column 'score' would be overwritten"):
        score_file(str(rm_dir), str(data))
    assert not (tmp_path / "bad.scored.jsonl").exists()


def test_a_language_model_is_refused(tmp_path):
    lm = tiny_model(seed=0, vocab_size=49152, tie_word_embeddings=True, num_hidden_layers=1)
    lm.config.bos_token_id, lm.config.eos_token_id, lm.config.pad_token_id = 1, 2, 2
    lm_dir = _save(lm, tmp_path / "lm")
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    with pytest.raises(ValueError, match="not a reward model"):
        score_file(str(lm_dir), str(data))

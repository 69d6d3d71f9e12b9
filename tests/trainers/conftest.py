"""Fixtures shared by the trainer tests."""
from __future__ import annotations

from pathlib import Path

import pytest
from helpers import tiny_model

from aligner.models.fetch import fetch_model
from aligner.models.hf import save_hf_checkpoint


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random model with SmolLM2's vocabulary and tokenizer (so the shipped chat data tokenizes)."""
    smol = fetch_model("smollm2-135m-instruct")
    model = tiny_model(seed=0, vocab_size=49152, tie_word_embeddings=True, num_hidden_layers=2)
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = 1, 2, 2
    out = tmp_path_factory.mktemp("tiny") / "model"
    save_hf_checkpoint(model, model.config, out, tokenizer_dir=smol)
    return out

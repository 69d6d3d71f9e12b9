"""Fixtures of the data tests: the real SmolLM2 tokenizer and a JSONL writer."""
import json

import pytest


@pytest.fixture(scope="session")
def smol_tokenizer():
    """SmolLM2-135M-Instruct's ChatTokenizer (the model is fetched once into the cache)."""
    from aligner.models.fetch import fetch_model
    from aligner.models.tokenizer import load_tokenizer

    return load_tokenizer(fetch_model("smollm2-135m-instruct"))


@pytest.fixture
def write_jsonl(tmp_path):
    """write_jsonl(name, lines) -> path; a line that is not a str is written as its JSON."""
    def write(name, lines):
        path = tmp_path / name
        path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
        return path
    return write

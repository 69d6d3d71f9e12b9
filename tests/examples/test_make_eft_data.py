"""examples/make_eft_data.py: judge-training SFT records from the shipped example, and its errors."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from aligner.data import validate_record
from aligner.judges import DEFAULT_SCORE_REGEX, load_template, parse_score, render_judge_prompt
from helpers import REPO, subprocess_env

SCRIPT = REPO / "examples" / "make_eft_data.py"
EXAMPLE = REPO / "examples" / "data" / "eft_example.jsonl"


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=subprocess_env(), capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def script_main():
    spec = importlib.util.spec_from_file_location("make_eft_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_shipped_example(tmp_path):
    out = tmp_path / "sub" / "eft.jsonl"
    proc = run_script("--input", str(EXAMPLE), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote 8 judge-training records to {out}"
    inputs = [json.loads(line) for line in EXAMPLE.read_text().splitlines()]
    outputs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(outputs) == len(inputs) == 8
    template = load_template(None, "judge")
    for i, (src, rec) in enumerate(zip(inputs, outputs)):
        validate_record(rec, f"out:{i + 1}", "sft")
        user, assistant = rec["messages"]
        assert user == {"role": "user", "content": render_judge_prompt(template, src["prompt"], src["response"])}
        assert assistant["role"] == "assistant"
        assert parse_score(assistant["content"], DEFAULT_SCORE_REGEX, 0, 5) == src["score"]
    assert outputs[0]["messages"][1]["content"] == inputs[0]["judgement"] + "\nScore: 4"
    assert outputs[3]["messages"][1]["content"] == "Score: 1"  # no rationale
    assert outputs[7]["messages"][1]["content"] == "Score: 4.5"
    # A message-list prompt: the judge sees the last user turn.
    assert "<question>\nTranslate 'thank you' into French.\n</question>" in outputs[4]["messages"][0]["content"]
    assert [p.name for p in out.parent.iterdir()] == ["eft.jsonl"]  # no temporary file left behind


def test_bad_record_stops_with_file_line_and_writes_nothing(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "q", "response": "r", "score": 3}\n{"prompt": "q", "response": "r", "score": "4"}\n')
    out = tmp_path / "out.jsonl"
    proc = run_script("--input", str(src), "--output", str(out))
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"make_eft_data: error: {src}:2: field 'score': expected a number, got string "
                                   f"'4'; write the score as a JSON number in [0, 5]")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "q", "response": "r"}', "field 'score': missing"),
    ('{"prompt": "q", "response": "r", "score": 7}', "field 'score': 7 is outside [0, 5]"),
    ('{"prompt": "q", "response": "r", "score": -1}', "field 'score': -1 is outside [0, 5]"),
    ('{"prompt": "q", "response": "r", "score": true}', "field 'score': expected a number, got bool"),
    ('{"prompt": "q", "response": "r", "score": null}', "field 'score': expected a number, got null"),
    ('{"prompt": "q", "score": 3}', "field 'response': missing"),
    ('{"prompt": "q", "response": "  ", "score": 3}', "field 'response': expected a non-empty string"),
    ('{"response": "r", "score": 3}', "field 'prompt': missing"),
    ('{"prompt": 5, "response": "r", "score": 3}', "field 'prompt': expected a string or a list of messages"),
    ('{"prompt": [{"role": "system", "content": "s"}], "response": "r", "score": 3}', "field 'prompt': the prompt"),
    ('{"prompt": "q", "response": "r", "score": 3, "judgement": 4}', "field 'judgement': expected a string"),
    ('{"prompt": "q", "response": "r", "score": 3', "invalid JSON"),
])
def test_bad_input(tmp_path, capsys, script_main, line, message):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "q", "response": "r", "score": 0}\n\n' + line + "\n")
    out = tmp_path / "out.jsonl"
    assert script_main(["--input", str(src), "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"make_eft_data: error: {src}:3: ") and message in err, err
    assert not out.exists()


def test_other_scale_and_custom_template(tmp_path, capsys, script_main):
    template = tmp_path / "judge.jinja"
    template.write_text("Q={{ prompt }} R={{ response }}")
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "q", "response": "r", "score": 8.0, "judgement": " Good. "}\n')
    out = tmp_path / "out.jsonl"
    assert script_main(["--input", str(src), "--output", str(out), "--template", str(template),
                        "--low", "1", "--high", "10"]) == 0
    assert json.loads(out.read_text()) == {"messages": [{"role": "user", "content": "Q=q R=r"},
                                                        {"role": "assistant", "content": "Good.\nScore: 8"}]}


def test_bad_template_and_missing_input(tmp_path, capsys, script_main):
    template = tmp_path / "judge.jinja"
    template.write_text("{{ prompt }}")
    out = tmp_path / "out.jsonl"
    assert script_main(["--input", str(EXAMPLE), "--output", str(out), "--template", str(template)]) == 1
    assert f"{template}: the judge template never uses response" in capsys.readouterr().err
    assert script_main(["--input", str(tmp_path / "none.jsonl"), "--output", str(out)]) == 1
    assert "none.jsonl: no such file; check --input" in capsys.readouterr().err
    assert not out.exists()

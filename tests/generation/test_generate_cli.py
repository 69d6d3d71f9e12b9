"""`aligner generate` end to end on SmolLM2: greedy output equals a plain argmax loop, lines keep the input
order and extra columns, n samples per prompt, tokens/s printed; bad records fail with file:line before the
model loads and leave no file; two data-parallel ranks write the same file as one process."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fake_tensorrt_llm
from aligner.data import DataError, prompt_messages
from aligner.generation.cli import default_output, main, prompt_token_ids
from aligner.models import from_pretrained
from aligner.models.fetch import smollm2_path
from aligner.models.tokenizer import load_tokenizer
from fake_tensorrt_llm import FakeLLM
from helpers import REPO, run_torchrun

PROMPTS = [
    {"prompt": "What is the capital of France?", "id": 0},
    {"prompt": [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name a color."}],
     "id": 1, "solution": "red"},
    {"prompt": "Say hi.", "id": 2},
    {"prompt": "Write one short word.", "id": 3, "meta": {"tags": ["a", "b"]}},
    {"prompt": "Count: 1, 2,", "id": 4},
]
MAX_NEW = 6
GREEDY = ["generation.temperature=0", f"generation.max_new_tokens={MAX_NEW}", "generation.compile=false",
          "generation.dtype=float32"]


def write_prompts(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@torch.no_grad()
def argmax_reference(model, tokenizer, prompt, eos_ids) -> list[int]:
    """Greedy tokens by full forwards, no cache: the plainest possible generation."""
    ids = tokenizer.encode(tokenizer.apply_chat_template(prompt_messages(prompt), add_generation_prompt=True))
    out: list[int] = []
    for _ in range(MAX_NEW):
        out.append(int(model(torch.tensor([ids + out]))[0, -1].argmax()))
        if out[-1] in eos_ids:
            break
    return out


@pytest.mark.slow
def test_greedy_file_matches_an_argmax_loop(tmp_path, capsys):
    prompts = write_prompts(tmp_path / "prompts.jsonl", PROMPTS)
    out = tmp_path / "out" / "gen.jsonl"
    # max_batch_size=1 with n=2: chunks of 2 prompts, so the run takes 3 generate calls.
    assert main([f"data.prompts={prompts}", f"output={out}", "generation.n=2", "generation.max_batch_size=1",
                 *GREEDY]) == 0
    lines = read_lines(out)
    assert len(lines) == 2 * len(PROMPTS) and sorted(p.name for p in out.parent.iterdir()) == ["gen.jsonl"]

    model_dir = smollm2_path()
    tokenizer = load_tokenizer(model_dir)
    model = from_pretrained(model_dir).eval()
    eos_ids = {tokenizer.eos_id, json.loads((model_dir / "config.json").read_text())["eos_token_id"]}
    total = 0
    for i, record in enumerate(PROMPTS):
        expected = argmax_reference(model, tokenizer, record["prompt"], eos_ids)
        ended = expected[-1] in eos_ids
        text = tokenizer.decode(expected[:-1] if ended else expected, skip_special_tokens=True)
        for j in range(2):
            line = lines[2 * i + j]
            assert line == {**record, "sample_index": j, "response": text,
                            "finish_reason": "eos" if ended else "length", "response_tokens": len(expected)}
            assert list(line)[:2] == ["prompt", "id"]  # the prompt first, then the record's own columns
            total += len(expected)
    printed = capsys.readouterr().out
    assert f"wrote {2 * len(PROMPTS)} samples to {out}: {total} response tokens in" in printed
    assert "tokens/s" in printed


def test_bad_records_fail_before_the_model_loads_and_write_nothing(tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", [PROMPTS[0], {"promt": "typo"}, {"prompt": ""}])
    out = tmp_path / "gen.jsonl"
    with pytest.raises(DataError) as e:
        main([f"data.prompts={prompts}", f"output={out}", "model.path=/nonexistent/model"])
    message = str(e.value)
    assert f"{prompts}:2" in message and "'prompt'" in message and f"{prompts}:3" in message
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["prompts.jsonl"]
    clash = write_prompts(tmp_path / "clash.jsonl", [{"prompt": "hi", "response": "kept?"}])
    with pytest.raises(DataError, match=r"clash.jsonl:1: column 'response' would be overwritten"):
        main([f"data.prompts={clash}", f"output={out}", "model.path=/nonexistent/model"])
    with pytest.raises(ValueError, match=r"data.prompts is not set"):
        main([f"output={out}"])
    with pytest.raises(ValueError, match=r"generation: temperature=-1.0 must be >= 0"):
        main([f"data.prompts={prompts}", "generation.temperature=-1"])
    assert not out.exists()
    assert default_output("data/p.jsonl") == Path("data/p.generations.jsonl")


@pytest.mark.slow
def test_two_data_parallel_ranks_write_what_one_process_writes(tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", PROMPTS[:3])  # shares of 2 and 1 prompts
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    args = [f"data.prompts={prompts}", "generation.max_new_tokens=4", *GREEDY[2:], "generation.temperature=0"]
    assert main([*args, f"output={one}"]) == 0
    log = run_torchrun(REPO / "aligner" / "generation" / "cli.py", 2, *args, f"output={two}", timeout=300)
    assert "(2 data-parallel shares)" in log
    assert read_lines(two) == read_lines(one) and len(read_lines(one)) == 3


def test_trtllm_backend_loads_the_checkpoint_itself_and_strips_stops(tmp_path, monkeypatch):
    fake_tensorrt_llm.install(monkeypatch)
    model_dir = smollm2_path()
    tokenizer = load_tokenizer(model_dir)
    FakeLLM.encode = staticmethod(tokenizer.encode)
    records = PROMPTS[:2]
    first, second = (tuple(ids) for ids in prompt_token_ids(records, tokenizer))
    eos = tokenizer.eos_id
    FakeLLM.script = {first: [tokenizer.encode("Paris. ###more") + [eos]], second: [tokenizer.encode("Blue") + [eos]]}
    prompts, out = write_prompts(tmp_path / "prompts.jsonl", records), tmp_path / "gen.jsonl"
    assert main([f"data.prompts={prompts}", f"output={out}", "generation.backend=trtllm", "generation.seed=1",
                 "generation.stop_strings=[\"###\"]"]) == 0
    (llm,) = FakeLLM.instances  # no torch model: TensorRT-LLM read the checkpoint directory
    assert (llm.model, llm.kwargs["load_format"], llm.tensor_parallel_size) == (str(model_dir), "auto", 1)
    assert llm.is_shutdown
    lines = read_lines(out)
    assert [(line["response"], line["finish_reason"]) for line in lines] == [("Paris. ", "stop"), ("Blue", "eos")]
    assert lines[1]["response_tokens"] == len(tokenizer.encode("Blue")) + 1 and lines[1]["solution"] == "red"

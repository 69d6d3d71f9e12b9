"""The TensorRT-LLM adapter against a fake ``tensorrt_llm`` that follows the real LLM API (fake_tensorrt_llm.py):
sampling translation, token ids in and out, finish reasons, stop strings, log-probs, n ordering, refit names and
values, memory calls, the missing-package error, and the two-rank gather/scatter."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

if __name__ == "__main__":  # torchrun runs this file as the two-rank worker: make tests/ importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fake_tensorrt_llm  # noqa: E402
from aligner.config import GenerationConfig
from aligner.generation.engine import SamplingParams
from aligner.generation.trtllm_engine import (
    SLEEP_TAGS,
    WORKER_EXTENSION,
    TrtLlmEngine,
    build_trtllm_engine,
    finish_reason_of,
    first_stop_string_end,
    sampled_logprobs,
)
from aligner.generation.trtllm_refit import weight_buckets
from aligner.models.args import config_to_hf
from aligner.models.hf import hf_to_ours_name
from fake_tensorrt_llm import CompletionOutput, FakeLLM, Logprob, LogprobMode, raw_logprob
from helpers import run_torchrun, tiny_model

VOCAB = ["<eos>", "<pad>"] + list("abcdefghijklmnopqrstuvwxyz .!?")
EOS = 0


class CharTokenizer:
    """One token per character; enough of ChatTokenizer for the engine (eos_id, pad_id, decode, source)."""

    eos_id, pad_id = EOS, 1

    def __init__(self, source: str = ""):
        self.source = source

    def decode(self, ids, skip_special_tokens=False):
        return "".join(VOCAB[i] for i in ids)

    def encode(self, text, add_special_tokens=False):
        return [VOCAB.index(c) for c in text]


def ids(text: str) -> list[int]:
    return CharTokenizer().encode(text)


@pytest.fixture
def fake(monkeypatch):
    trt = fake_tensorrt_llm.install(monkeypatch)
    FakeLLM.encode = staticmethod(ids)
    return trt


def model_dir(tmp_path: Path, layers: int = 4) -> Path:
    model = tiny_model(num_hidden_layers=layers)
    (tmp_path / "config.json").write_text(json.dumps({**config_to_hf(model.config), "eos_token_id": EOS}))
    return tmp_path


def test_missing_tensorrt_llm_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # what an uninstalled package looks like to import
    with pytest.raises(ImportError) as e:
        TrtLlmEngine(tmp_path, GenerationConfig(), CharTokenizer())
    message = str(e.value)
    assert "pip install aligner[trtllm]" in message and "container" in message
    assert "generation.backend=torch" in message


def test_pure_sampling_passes_every_knob_and_keeps_eos_as_a_stop_token(fake, tmp_path):
    p1, p2 = ids("hi"), ids("hello there")
    FakeLLM.script = {tuple(p1): [ids("ab") + [EOS] + ids("zz"), ids("cd!")], tuple(p2): [ids("xyz"), ids("q") + [EOS]]}
    engine = TrtLlmEngine(model_dir(tmp_path), GenerationConfig(), CharTokenizer())
    bang = ids("!")[0]
    out = engine.generate([p1, p2], SamplingParams(n=2, max_new_tokens=3, stop_token_ids=[bang], seed=11))

    (inputs, params, use_tqdm), = FakeLLM.instances[0].generate_calls
    assert inputs == [p1, p2] and use_tqdm is False  # token ids in, one request per prompt with n=2
    assert [p.seed for p in params] == [11, 12] and [p.n for p in params] == [2, 2]
    sp = params[0]
    assert (sp.temperature, sp.top_k, sp.top_p, sp.max_tokens, sp.end_id) == (1.0, 0, 1.0, 3, -1)
    assert sp.stop_token_ids == [EOS, bang] and sp.include_stop_str_in_output and sp.logprobs == 1
    assert sp.logprobs_mode == LogprobMode.RAW and not sp._greedy_decoding and sp.detokenize is False

    # Prompt-major rows; EOS and the stop token stay in the response with their log-probs.
    assert out.prompt_token_ids == [p1, p1, p2, p2]
    assert out.response_token_ids == [ids("ab") + [EOS], ids("cd!"), ids("xyz"), ids("q") + [EOS]]
    assert out.finish_reasons == ["eos", "stop", "length", "eos"]
    assert out.response_lengths == [3, 3, 3, 2]
    assert out.logprobs[0] == pytest.approx([raw_logprob(i) for i in range(3)])
    assert out.logprobs[3] == pytest.approx([raw_logprob(0), raw_logprob(1)])


def test_greedy_is_top_k_1_and_n_samples_are_n_requests(fake, tmp_path):
    prompt = ids("abc")
    FakeLLM.script = {tuple(prompt): [ids("de") + [EOS]]}
    engine = TrtLlmEngine(model_dir(tmp_path), GenerationConfig(), CharTokenizer())
    out = engine.generate([prompt], SamplingParams(temperature=0.0, n=3, max_new_tokens=8))
    (inputs, params, _), = FakeLLM.instances[0].generate_calls
    assert inputs == [prompt] * 3 and all(p.n == 1 and p.top_k == 1 and p.temperature is None for p in params)
    assert all(p._greedy_decoding for p in params)
    assert out.response_token_ids == [ids("de") + [EOS]] * 3 and out.finish_reasons == ["eos"] * 3


def test_the_model_configs_eos_ids_also_end_responses_as_eos(fake, tmp_path):
    end_of_turn = ids("z")[0]
    config = json.loads((model_dir(tmp_path) / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "eos_token_id": [EOS, end_of_turn]}))
    prompt = ids("a")
    FakeLLM.script = {tuple(prompt): [ids("bz") + [EOS]]}
    engine = TrtLlmEngine(tmp_path, GenerationConfig(), CharTokenizer())
    out = engine.generate([prompt], SamplingParams(max_new_tokens=5, seed=0))
    assert FakeLLM.instances[0].generate_calls[0][1][0].stop_token_ids == [EOS, end_of_turn]
    assert out.response_token_ids == [ids("bz")] and out.finish_reasons == ["eos"]


def test_temperature_asks_for_processed_logprobs(fake, tmp_path):
    prompt = ids("a")
    FakeLLM.script = {tuple(prompt): [ids("bcd")]}
    engine = TrtLlmEngine(model_dir(tmp_path), GenerationConfig(), CharTokenizer())
    out = engine.generate([prompt], SamplingParams(temperature=0.5, top_k=5, top_p=0.9, max_new_tokens=3, seed=0))
    sp = FakeLLM.instances[0].generate_calls[0][1][0]
    assert (sp.temperature, sp.top_k, sp.top_p, sp.logprobs_mode) == (0.5, 5, 0.9, LogprobMode.PROCESSED)
    assert out.logprobs[0] == pytest.approx([raw_logprob(i) / 0.5 for i in range(3)])


def test_older_release_without_logprobs_mode(monkeypatch, tmp_path):
    fake_tensorrt_llm.install(monkeypatch, modern=False)
    prompt = ids("a")
    FakeLLM.script = {tuple(prompt): [ids("bc")]}
    engine = TrtLlmEngine(model_dir(tmp_path), GenerationConfig(), CharTokenizer())
    assert engine.llm.kwargs["enable_sleep"] is True and "sleep_config" not in engine.llm.kwargs
    out = engine.generate([prompt], SamplingParams(max_new_tokens=2, seed=0))  # temperature 1: raw is right
    assert out.logprobs[0] == pytest.approx([raw_logprob(0), raw_logprob(1)])
    with pytest.raises(ValueError, match=r"generation.temperature=0.7.*logprobs_mode"):
        engine.generate([prompt], SamplingParams(temperature=0.7, max_new_tokens=2))


def test_ignore_eos_min_length_and_unseeded_draws(fake, tmp_path):
    prompt = ids("a")
    FakeLLM.script = {tuple(prompt): [[EOS, EOS, EOS]]}
    engine = TrtLlmEngine(model_dir(tmp_path), GenerationConfig(), CharTokenizer())
    out = engine.generate([prompt], SamplingParams(ignore_eos=True, max_new_tokens=3, seed=0))
    sp = FakeLLM.instances[0].generate_calls[-1][1][0]
    assert sp.stop_token_ids is None and sp.ignore_eos
    assert out.response_token_ids == [[EOS] * 3] and out.finish_reasons == ["length"]
    with pytest.raises(ValueError, match=r"min_new_tokens=2 is not supported by the TensorRT-LLM backend"):
        engine.generate([prompt], SamplingParams(min_new_tokens=2, max_new_tokens=3))
    # Unseeded calls draw a base seed from torch's RNG (TensorRT-LLM would use seed 0 every time).
    torch.manual_seed(5)
    expected = int(torch.randint(0, 2**31 - 1, ()).item())
    torch.manual_seed(5)
    engine.generate([prompt, prompt], SamplingParams(max_new_tokens=1))
    assert [p.seed for p in FakeLLM.instances[0].generate_calls[-1][1]] == [expected, expected + 1]


def test_stop_strings_are_checked_on_the_decoded_text(fake, tmp_path):
    prompt = ids("q")
    FakeLLM.script = {tuple(prompt): [ids("abc.de")]}
    engine = TrtLlmEngine(model_dir(tmp_path), GenerationConfig(), CharTokenizer())
    sampling = SamplingParams(max_new_tokens=6, stop_strings=[".d"], seed=0)
    out = engine.generate([prompt], sampling)  # TensorRT-LLM matched the string's ids itself
    assert FakeLLM.instances[0].generate_calls[-1][1][0].stop == [".d"]
    assert out.response_token_ids == [ids("abc.d")] and out.finish_reasons == ["stop"]
    # Tokenized differently from the stop string's own ids, TensorRT-LLM runs on; the text check cuts it.
    FakeLLM.encode = staticmethod(lambda text: [999])
    out = engine.generate([prompt], sampling)
    assert out.response_token_ids == [ids("abc.d")] and out.finish_reasons == ["stop"]
    assert len(out.logprobs[0]) == 5
    assert first_stop_string_end(ids("abc.de"), [".d"], CharTokenizer()) == 5
    assert first_stop_string_end(ids("abcde"), [".d"], CharTokenizer()) is None


def test_finish_reasons_and_logprob_formats():
    assert finish_reason_of(CompletionOutput(0, finish_reason="length"), [EOS]) == "length"
    assert finish_reason_of(CompletionOutput(0, finish_reason="stop", stop_reason=EOS), [EOS]) == "eos"
    assert finish_reason_of(CompletionOutput(0, finish_reason="stop", stop_reason=None), [EOS]) == "eos"
    assert finish_reason_of(CompletionOutput(0, finish_reason="stop", stop_reason=7), [EOS]) == "stop"
    assert finish_reason_of(CompletionOutput(0, finish_reason="stop", stop_reason="\n\n"), [EOS]) == "stop"
    with pytest.raises(RuntimeError, match=r"reason 'cancelled'"):
        finish_reason_of(CompletionOutput(0, finish_reason="cancelled"), [EOS])
    both = CompletionOutput(0, logprobs=[{5: Logprob(-0.5, 3), 9: Logprob(-0.1, 1)}, {6: Logprob(-2.0, 1)}])
    assert sampled_logprobs(both, [5, 6]) == [-0.5, -2.0]  # the sampled token's entry, not the top-1
    assert sampled_logprobs(CompletionOutput(0, logprobs=[-0.25, -1.5]), [5, 6]) == [-0.25, -1.5]  # old: floats
    with pytest.raises(RuntimeError, match=r"not the sampled token 6"):
        sampled_logprobs(CompletionOutput(0, logprobs=[{5: Logprob(-0.5)}, {9: Logprob(-0.1)}]), [5, 6])
    with pytest.raises(RuntimeError, match=r"returned 1 log-probs for 2 tokens"):
        sampled_logprobs(CompletionOutput(0, logprobs=[{5: Logprob(-0.5)}]), [5, 6])


@pytest.mark.parametrize("tied", [False, True])
def test_refit_sends_every_weight_under_its_hf_name(fake, tmp_path, tied):
    model = tiny_model(tie_word_embeddings=tied)
    engine = TrtLlmEngine(model_dir(tmp_path), GenerationConfig(), CharTokenizer())
    engine.update_weights(model)
    llm = FakeLLM.instances[0]
    params = dict(model.named_parameters())
    assert {uuid for uuid, _ in llm.weights} == {"GPU-fake-0"}
    names = {name for _, name in llm.weights}
    assert len(names) == len(params) == (38 if tied else 39)  # 4 layers x 9 + embeddings + norm (+ lm_head)
    assert ("lm_head.weight" in names) is (not tied) and "model.layers.3.mlp.down_proj.weight" in names
    for (_, name), tensor in llm.weights.items():
        assert tensor.dtype == torch.bfloat16  # generation.dtype auto: bfloat16 on GPUs
        assert torch.equal(tensor, params[hf_to_ours_name(name)].detach().to(torch.bfloat16))
    assert llm.rpc_calls[-1] == ("update_weights", (None,)) and llm.finalized == 1
    # After an optimizer step the next refit carries the new values.
    with torch.no_grad():
        model.norm.weight.add_(1.0)
    engine.update_weights(model)
    assert torch.equal(llm.weights[("GPU-fake-0", "model.norm.weight")], model.norm.weight.detach().bfloat16())
    assert llm.finalized == 2


def test_refit_refuses_a_pipeline_stage_and_buckets_bound_memory(fake, tmp_path):
    model = tiny_model()
    del model.layers["3"]
    engine = TrtLlmEngine(model_dir(tmp_path), GenerationConfig(), CharTokenizer())
    with pytest.raises(ValueError, match=r"3 of 4 layers.*parallel.pp=1"):
        engine.update_weights(model)
    with pytest.raises(ValueError, match=r"update_weights\(policy.model\)"):
        engine.update_weights()
    t = [(f"w{i}", torch.zeros(4, 4)) for i in range(3)] + [("big", torch.zeros(100))]  # 64 B each, then 400 B
    assert [[n for n, _ in b] for b in weight_buckets(t, 130)] == [["w0", "w1"], ["w2"], ["big"]]


class FakeMesh:
    """What build_trtllm_engine reads of a ParallelMesh: ``dims.tp`` and ``["dp"].get_local_rank()``."""

    def __init__(self, tp: int, dp_rank: int):
        self.dims = SimpleNamespace(tp=tp)
        self._dp = SimpleNamespace(get_local_rank=lambda: dp_rank)

    def __getitem__(self, name):
        assert name == "dp"
        return self._dp


def test_build_from_a_policy_loads_a_weightless_model_then_refits(fake, tmp_path):
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.json").write_text("{}")
    (tok_dir / "tokenizer_config.json").write_text('{"eos_token": "<eos>"}')
    model = tiny_model(tie_word_embeddings=True)
    policy = SimpleNamespace(model=model, config=model.config, pmesh=FakeMesh(tp=2, dp_rank=0))
    engine = build_trtllm_engine(policy, GenerationConfig(compile=False), CharTokenizer(str(tok_dir)))
    llm = FakeLLM.instances[0]
    skeleton = Path(llm.model)
    assert json.loads((skeleton / "config.json").read_text())["num_hidden_layers"] == 4
    assert (skeleton / "tokenizer.json").is_file() and (skeleton / "tokenizer_config.json").is_file()
    assert (llm.tensor_parallel_size, llm.dtype, llm.kwargs["load_format"]) == (2, "bfloat16", "dummy")
    assert llm.kwargs["orchestrator_type"] == "ray" and llm.kwargs["ray_worker_extension_cls"] == WORKER_EXTENSION
    assert llm.kwargs["max_batch_size"] == 64 and llm.kwargs["cuda_graph_config"] is None
    assert llm.kwargs["kv_cache_config"].kwargs == {"free_gpu_memory_fraction": 0.5, "enable_block_reuse": True}
    assert "sleep_config" in llm.kwargs
    assert llm.finalized == 1 and len({name for _, name in llm.weights}) == 38  # weights sent on build
    engine.offload()
    engine.onload()
    assert [c[0] for c in llm.rpc_calls[-2:]] == ["sleep", "wakeup"] and llm.rpc_calls[-1][1] == (list(SLEEP_TAGS),)
    engine.update_weights()  # defaults to the model it was built from
    assert llm.finalized == 2
    engine.close()
    assert llm.is_shutdown and not skeleton.exists()
    with pytest.raises(RuntimeError, match=r"closed"):
        engine.generate([ids("a")], SamplingParams())


def test_two_ranks_share_one_llm_on_rank_0():
    out = run_torchrun(__file__, 2, timeout=180)
    assert "rank 0 ok" in out and "rank 1 ok" in out


def _two_rank_worker() -> None:
    """Each rank generates its own prompts through rank 0's LLM and both send weights for one refit."""
    import tempfile

    from aligner.parallel import init_distributed

    class SetItem:
        def setitem(self, mapping, key, value):
            mapping[key] = value

    fake_tensorrt_llm.install(SetItem())
    FakeLLM.encode = staticmethod(ids)
    rank, world = init_distributed()
    prompts = [[ids("ab")], [ids("cd"), ids("ef")]][rank]  # rank 1 sends two prompts
    FakeLLM.script = {tuple(ids(p)): [ids(p[::-1]) + [EOS]] for p in ("ab", "cd", "ef")}
    with tempfile.TemporaryDirectory() as tmp:
        engine = TrtLlmEngine(model_dir(Path(tmp)), GenerationConfig(), CharTokenizer())
        assert (engine.llm is not None) is (rank == 0)
        out = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=4, seed=3))
        assert out.prompt_token_ids == [p for p in prompts for _ in range(2)]
        assert out.response_token_ids == [list(reversed(p)) + [EOS] for p in prompts for _ in range(2)]
        if rank == 0:
            (inputs, params, _), = FakeLLM.instances[0].generate_calls
            assert inputs == [ids("ab"), ids("cd"), ids("ef")] and [p.seed for p in params] == [3, 4, 5]
        engine.update_weights(tiny_model())
        if rank == 0:
            assert FakeLLM.instances[0].finalized == 1 and len(FakeLLM.instances[0].weights) == 39
        # Two tp ranks of one data-parallel share pass the same prompts: generated once, same rollouts.
        shared = TrtLlmEngine(model_dir(Path(tmp)), GenerationConfig(), CharTokenizer(), share_key=0)
        out = shared.generate([ids("ab"), ids("cd")], SamplingParams(max_new_tokens=4, seed=3))
        assert out.response_token_ids == [ids("ba") + [EOS], ids("dc") + [EOS]]
        if rank == 0:
            assert FakeLLM.instances[1].generate_calls[0][0] == [ids("ab"), ids("cd")]
    print(f"rank {rank} ok", flush=True)


if __name__ == "__main__":
    from aligner.parallel.process_exit import exit_after

    exit_after(_two_rank_worker)

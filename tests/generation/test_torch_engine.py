"""The built-in engine: greedy equals transformers on SmolLM2, log-probs equal the training forward,
seeded sampling independent of the batch, slots sized per call, stops and finish reasons, refill, refit,
compile."""
import pytest
import torch
from helpers import tiny_model

from aligner.config import GenerationConfig
from aligner.generation import build_engine
from aligner.generation.engine import SamplingParams
from aligner.generation.torch_engine import TorchEngine, slot_count
from aligner.models import from_pretrained
from aligner.models.fetch import smollm2_path
from aligner.models.tokenizer import load_tokenizer
from aligner.parallel import token_logprobs

QUESTIONS = [
    "What is the capital of France?", "Hi!", "Write a haiku about autumn leaves falling slowly into a river.",
    "2+2=?", "Explain gravity to a child in two sentences, using simple words.", "Name three primary colours.",
    "Translate 'good morning' into Spanish.", "What is photosynthesis? Answer briefly, in one line, please.",
    "Give me a synonym for happy.", "Who wrote Romeo and Juliet?", "List the days of the week.",
    "Why is the sky blue? Keep it short, I am in a hurry and have a train to catch in a few minutes.",
    "What is 7 times 8?", "Suggest a name for a cat.", "How many legs does a spider have?",
    "Describe the smell of rain.",
]
GREEDY_TOKENS = 24
EOS = 2


@pytest.fixture(scope="module")
def smol():
    path = smollm2_path()
    tokenizer = load_tokenizer(path)
    prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                                              add_generation_prompt=True)) for q in QUESTIONS]
    return from_pretrained(path, dtype="float32").eval(), tokenizer, prompts, path


def transformers_greedy(path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """transformers' greedy ``generate`` on left-padded prompts, each cut after its first EOS."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), EOS)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                             eos_token_id=EOS, pad_token_id=EOS)[:, width:].tolist()
    return [row[:row.index(EOS) + 1] if EOS in row else row for row in out]


@pytest.mark.slow
def test_greedy_equals_transformers_on_smollm2(smol):
    model, tokenizer, prompts, path = smol
    assert len(set(map(len, prompts))) >= 8  # the batch mixes prompt lengths
    expect = transformers_greedy(path, prompts, GREEDY_TOKENS)
    assert any(r[-1] == EOS for r in expect) and any(len(r) == GREEDY_TOKENS for r in expect)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=GREEDY_TOKENS)
    for slots in (16, 5):  # all at once; and 5 slots refilled as sequences finish
        rollouts = TorchEngine(model, tokenizer, max_batch_size=slots, dtype="float32").generate(prompts, greedy)
        assert rollouts.response_token_ids == expect, f"max_batch_size={slots}"
        assert rollouts.finish_reasons == ["eos" if r[-1] == EOS else "length" for r in expect]
        assert rollouts.prompt_token_ids == prompts


@pytest.mark.slow
def test_logprobs_equal_the_training_forward(smol):
    model, tokenizer, prompts, _ = smol
    T = 0.7
    sampling = SamplingParams(temperature=T, max_new_tokens=16, n=2, seed=11)
    rollouts = TorchEngine(model, tokenizer, max_batch_size=4, dtype="float32").generate(prompts[:6], sampling)
    worst = 0.0
    with torch.no_grad():
        for prompt, response, logps in zip(rollouts.prompt_token_ids, rollouts.response_token_ids, rollouts.logprobs):
            tokens = torch.tensor([prompt + response])
            logits = model(tokens)[:, len(prompt) - 1:-1]  # the positions that predicted the response
            train = token_logprobs(logits / T, tokens[:, len(prompt):])[0]
            worst = max(worst, (train - torch.tensor(logps)).abs().max().item())
    assert worst < 1e-4
    assert len({tuple(r) for r in rollouts.response_token_ids}) >= 9  # sampled: the 2 samples mostly differ


def greedy_reference(model, prompt, steps, banned_until=0, banned=()):
    """Plain full-forward greedy decoding (``banned`` tokens suppressed for the first ``banned_until``)."""
    tokens, out = list(prompt), []
    with torch.no_grad():
        for i in range(steps):
            logits = model(torch.tensor([tokens]))[0, -1]
            if i < banned_until:
                logits[list(banned)] = float("-inf")
            out.append(int(logits.argmax()))
            tokens.append(out[-1])
    return out


PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [3], [4, 4, 4, 4], list(range(20, 45))]


def test_eos_stop_tokens_min_length_and_finish_reasons():
    model = tiny_model().eval()
    free = greedy_reference(model, PROMPTS[0], 12)
    eos, stop = free[2], free[1]  # tokens greedy decoding reaches early
    assert eos not in free[:2] and stop != free[0]
    engine = TorchEngine(model, [eos], max_batch_size=2, dtype="float32")
    greedy = dict(temperature=0.0, max_new_tokens=12)
    out = engine.generate(PROMPTS[:1], SamplingParams(**greedy))
    assert out.response_token_ids == [free[:3]] and out.finish_reasons == ["eos"]
    out = engine.generate(PROMPTS[:1], SamplingParams(**greedy, stop_token_ids=[stop]))
    assert out.response_token_ids == [free[:2]] and out.finish_reasons == ["stop"]
    out = engine.generate(PROMPTS[:1], SamplingParams(**greedy, ignore_eos=True))
    assert out.response_token_ids == [free] and out.finish_reasons == ["length"] and out.response_lengths == [12]
    # min_new_tokens masks EOS and stop tokens until 5 tokens exist.
    masked = greedy_reference(model, PROMPTS[0], 12, banned_until=5, banned=(eos, stop))
    out = engine.generate(PROMPTS[:1], SamplingParams(**greedy, stop_token_ids=[stop], min_new_tokens=5))
    ends = [i for i, t in enumerate(masked) if t in (eos, stop) and i >= 5]
    cut = ends[0] + 1 if ends else 12
    assert out.response_token_ids == [masked[:cut]] and len(out.response_token_ids[0]) >= 5
    assert not {eos, stop} & set(out.response_token_ids[0][:5])
    assert out.finish_reasons == [("eos" if masked[cut - 1] == eos else "stop") if ends else "length"]


class CharTokenizer:
    """Token ``i`` is the letter ``chr(97 + i % 26)``: decoded text maps one-to-one onto tokens."""

    eos_id = None

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(97 + i % 26) for i in ids)


@pytest.mark.parametrize("sync_every", [1, 3])
def test_stop_strings_cut_at_the_token_that_completes_them(sync_every):
    model = tiny_model(seed=2).eval()
    tokenizer = CharTokenizer()
    engine = TorchEngine(model, tokenizer, max_batch_size=3, dtype="float32", sync_every=sync_every)
    sampling = dict(temperature=1.0, max_new_tokens=30, seed=4, ignore_eos=True)
    free = engine.generate(PROMPTS, SamplingParams(**sampling))
    texts = [tokenizer.decode(r) for r in free.response_token_ids]
    stops = [texts[0][9:12], texts[3][4:6]]  # strings that complete at known tokens of samples 0 and 3
    out = engine.generate(PROMPTS, SamplingParams(**sampling, stop_strings=stops))
    for text, full, got, why in zip(texts, free.response_token_ids, out.response_token_ids, out.finish_reasons):
        ends = [text.find(s) + len(s) for s in stops if s in text]
        if ends:
            assert (got, why) == (full[:min(ends)], "stop")
        else:
            assert (got, why) == (full, "length")
    assert out.finish_reasons[0] == out.finish_reasons[3] == "stop"
    assert len(out.response_token_ids[0]) <= 12 and len(out.response_token_ids[3]) <= 6
    with pytest.raises(ValueError, match="stop_strings need a tokenizer"):
        TorchEngine(model, [2], max_batch_size=2).generate(PROMPTS, SamplingParams(stop_strings=["x"]))


def test_seeded_samples_do_not_depend_on_batch_size_order_or_company():
    model = tiny_model(seed=1).eval()
    sampling = SamplingParams(temperature=1.0, max_new_tokens=20, n=3, seed=123, top_k=40, top_p=0.95)
    runs = [TorchEngine(model, [2], max_batch_size=b, dtype="float32").generate(PROMPTS, sampling)
            for b in (1, 4, 15, 32)]
    for run in runs[1:]:
        assert run.response_token_ids == runs[0].response_token_ids
        assert max(abs(a - b) for x, y in zip(run.logprobs, runs[0].logprobs) for a, b in zip(x, y)) < 1e-5
    # Prompt-major: sample j of prompt i is row i * n + j; samples of one prompt differ.
    assert runs[0].prompt_token_ids == [p for p in PROMPTS for _ in range(3)]
    assert all(len({tuple(r) for r in runs[0].response_token_ids[3 * i:3 * i + 3]}) == 3 for i in range(5))
    # Fewer prompts in the call (other company in the batch): the shared prompts' samples are unchanged.
    fewer = TorchEngine(model, [2], max_batch_size=4, dtype="float32").generate(PROMPTS[:2], sampling)
    assert fewer.response_token_ids == runs[0].response_token_ids[:6]
    other_seed = TorchEngine(model, [2], max_batch_size=4).generate(PROMPTS, SamplingParams(
        temperature=1.0, max_new_tokens=20, n=3, seed=124, top_k=40, top_p=0.95))
    assert other_seed.response_token_ids != runs[0].response_token_ids
    torch.manual_seed(0)  # unseeded calls draw their seed from torch's generator
    a = TorchEngine(model, [2], max_batch_size=4, dtype="float32").generate(PROMPTS, SamplingParams(max_new_tokens=8))
    torch.manual_seed(0)
    b = TorchEngine(model, [2], max_batch_size=7, dtype="float32").generate(PROMPTS, SamplingParams(max_new_tokens=8))
    assert a.response_token_ids == b.response_token_ids


def test_refill_keeps_prompt_major_order_when_short_sequences_finish_first():
    model = tiny_model().eval()
    free = [greedy_reference(model, p, 10) for p in PROMPTS]
    eos = free[1][1]  # prompt 1 ends after 2 tokens; others later or never
    engine = TorchEngine(model, [eos], max_batch_size=2, dtype="float32")
    out = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=10))
    for got, full in zip(out.response_token_ids, free):
        assert got == (full[:full.index(eos) + 1] if eos in full else full)
    assert out.response_lengths == [len(r) for r in out.response_token_ids]


def test_runs_on_the_live_weights_and_refits_a_cast_copy():
    model = tiny_model().eval()
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    live = TorchEngine(model, [2], max_batch_size=4, dtype="float32")
    cast = TorchEngine(model, [2], max_batch_size=4, dtype="bfloat16")
    assert live.generate(PROMPTS, greedy).response_token_ids == [greedy_reference(model, p, 8) for p in PROMPTS]
    before = cast.generate(PROMPTS, greedy).response_token_ids
    assert all(layer.self_attn.kv_cache is None for layer in model.layers.values())  # training sees no cache
    noise = torch.Generator().manual_seed(0)
    with torch.no_grad():  # an "optimizer step"
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=noise) * 0.05)
    assert live.generate(PROMPTS, greedy).response_token_ids == [greedy_reference(model, p, 8) for p in PROMPTS]
    assert cast.generate(PROMPTS, greedy).response_token_ids == before  # the copy is stale until refit
    cast.update_weights()
    fresh = TorchEngine(model, [2], max_batch_size=4, dtype="bfloat16").generate(PROMPTS, greedy)
    assert cast.generate(PROMPTS, greedy).response_token_ids == fresh.response_token_ids != before
    cast.offload()
    assert cast._caches is None and cast._weights is None
    cast.onload()
    assert cast.generate(PROMPTS, greedy).response_token_ids == fresh.response_token_ids
    cast.close()
    with pytest.raises(RuntimeError, match="closed"):
        cast.generate(PROMPTS, greedy)


def test_prompt_checks_and_build_engine():
    model = tiny_model().eval()
    engine = TorchEngine(model, [2], max_batch_size=2, max_seq_len=32)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1], []], SamplingParams())
    with pytest.raises(ValueError, match="exceeds the engine's max_seq_len=32"):
        engine.generate([[1] * 20], SamplingParams(max_new_tokens=13))
    with pytest.raises(ValueError, match="max_position_embeddings=256"):
        TorchEngine(model, [2]).generate([[1] * 200], SamplingParams(max_new_tokens=57))
    assert len(engine.generate([], SamplingParams())) == 0
    built = build_engine(model, GenerationConfig(max_batch_size=3, compile=False, dtype="float32"), [2])
    assert isinstance(built, TorchEngine) and built.max_batch_size == 3 and built.dtype == torch.float32
    assert built.model is model and built.eos_ids == [2]
    with pytest.raises(ValueError, match="backend='nope'"):
        build_engine(model, GenerationConfig(backend="nope"), [2])


def test_compiled_decode_step_equals_eager():
    model = tiny_model(num_hidden_layers=1, max_position_embeddings=1024).eval()
    sampling = SamplingParams(temperature=0.9, max_new_tokens=40, n=2, seed=3, min_new_tokens=3)
    eager = TorchEngine(model, [2], max_batch_size=3, dtype="float32")
    compiled = TorchEngine(model, [2], max_batch_size=3, dtype="float32", compile=True)
    for prompts in (PROMPTS, [p * 12 for p in PROMPTS]):  # the second call needs a longer cache: new graphs
        expect = eager.generate(prompts, sampling)
        got = compiled.generate(prompts, sampling)
        assert got.response_token_ids == expect.response_token_ids
        assert max(abs(a - b) for x, y in zip(got.logprobs, expect.logprobs) for a, b in zip(x, y)) < 1e-5
    assert compiled._cache_len == 512


def test_slots_are_sized_per_call_and_never_change_seeded_samples():
    # One slot per sample up to max_batch_size, rounded up to a power of two (capped at max_batch_size).
    assert [slot_count(n, 64) for n in (1, 2, 3, 5, 15, 16, 17, 64, 65, 500)] == [1, 2, 4, 8, 16, 16, 32, 64, 64, 64]
    assert [slot_count(n, 15) for n in (1, 9, 15, 40)] == [1, 15, 15, 15]
    with pytest.raises(ValueError, match="samples=0"):
        slot_count(0, 64)
    model = tiny_model(seed=1).eval()
    sampling = SamplingParams(temperature=1.0, max_new_tokens=20, n=3, seed=123)  # 15 samples
    # The config default (64: sized to 16 for this call), continuous batching in 4 slots, exactly 15 slots.
    engines = {b: TorchEngine(model, [2], max_batch_size=b, dtype="float32") for b in (64, 4, 15)}
    runs = {b: engine.generate(PROMPTS, sampling) for b, engine in engines.items()}
    assert {b: engine.slots for b, engine in engines.items()} == {64: 16, 4: 4, 15: 15}
    for b in (4, 15):
        assert runs[b].response_token_ids == runs[64].response_token_ids, b
        assert runs[b].finish_reasons == runs[64].finish_reasons, b
        worst = max(abs(x - y) for r, s in zip(runs[b].logprobs, runs[64].logprobs) for x, y in zip(r, s))
        assert worst < 1e-5, b
    # The cache follows each call's size, and is freed by offload.
    engine = engines[64]
    assert len(engine.generate(PROMPTS[:1], SamplingParams(n=2, max_new_tokens=4, seed=1))) == 2
    assert engine.slots == 2 and engine._caches["0"].k_t.shape[0] == 2
    assert len(engine.generate(PROMPTS, SamplingParams(n=20, max_new_tokens=4, seed=1))) == 100
    assert engine.slots == 64
    engine.offload()
    assert engine.slots == 0


def test_compiled_decode_step_is_traced_once_per_slot_count():
    model = tiny_model(num_hidden_layers=1).eval()
    sampling = SamplingParams(temperature=0.9, max_new_tokens=12, n=3, seed=5)
    eager = TorchEngine(model, [2], max_batch_size=64, dtype="float32")
    compiled = TorchEngine(model, [2], max_batch_size=64, dtype="float32", compile=True)
    for prompts, slots in ((PROMPTS, 16), (PROMPTS[:1], 4), (PROMPTS, 16)):  # back to a size seen before
        expect = eager.generate(prompts, sampling)
        got = compiled.generate(prompts, sampling)
        assert compiled.slots == slots
        assert got.response_token_ids == expect.response_token_ids
        assert max(abs(a - b) for x, y in zip(got.logprobs, expect.logprobs) for a, b in zip(x, y)) < 1e-5
        compiled.offload()  # as between training steps: the cache is re-made, the graphs are kept
    assert sorted(compiled._decoders) == [(4, 256), (16, 256)]

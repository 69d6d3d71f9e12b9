"""Sampling: log-probs, top-k / top-p as Hugging Face filters, counter-based draws, and the engine's
samples against the exact distributions they should come from."""
import math

import pytest
import torch
from helpers import tiny_model

from aligner.generation.engine import SamplingParams
from aligner.generation.sampling import (draw_tokens, filter_logits, logprobs_of, sample_next, sequence_keys,
                                         uniform_draws)
from aligner.generation.torch_engine import TorchEngine

transformers = pytest.importorskip("transformers")
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper  # noqa: E402


def chi_square_limit(df: int, z: float = 4.26) -> float:
    """Upper quantile of chi-square(df) at one-sided normal z (4.26: p = 1e-5), Wilson-Hilferty."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def assert_samples_follow(tokens: torch.Tensor, probs: torch.Tensor) -> None:
    """Empirical frequencies of ``tokens`` match ``probs [V]``: chi-square at p = 1e-5 over tokens with an
    expected count >= 5 (the rest pooled), and no token of probability 0 ever drawn."""
    n = tokens.numel()
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    assert counts[probs == 0].sum().item() == 0, "a token outside the allowed set was drawn"
    expected = probs.double() * n
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big & (probs > 0)].sum()[None]])
    wanted = torch.cat([expected[big], expected[~big & (probs > 0)].sum()[None]])
    keep = wanted > 0
    chi2 = (((observed - wanted) ** 2)[keep] / wanted[keep]).sum().item()
    df = int(keep.sum().item()) - 1
    assert chi2 < chi_square_limit(df), f"chi-square {chi2:.1f} over {df} dof exceeds {chi_square_limit(df):.1f}"


def test_logprobs_are_float32_log_softmax_at_temperature():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16) * 3
    tokens = torch.tensor([0, 7, 49, 3])
    for T in (0.7, 1.0, 1.3):
        expect = torch.log_softmax(logits.float() / T, -1).gather(-1, tokens[:, None])[:, 0]
        got = logprobs_of(logits, tokens, T)
        assert got.dtype == torch.float32
        assert (got - expect).abs().max().item() < 1e-5
        assert (logprobs_of(logits, tokens, torch.tensor(T)) - expect).abs().max().item() < 1e-5
    greedy = logprobs_of(logits, tokens, 0.0)
    assert (greedy - torch.log_softmax(logits.float(), -1).gather(-1, tokens[:, None])[:, 0]).abs().max() < 1e-5


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.8), (0, 0.3), (20, 0.9), (1, 1.0), (0, 1e-6)])
def test_filter_keeps_the_tokens_transformers_keeps(top_k, top_p):
    torch.manual_seed(0)
    logits = torch.randn(8, 300) * 2
    logits[0, :10] = 1.0  # ties at the k-th value are kept, as transformers does
    expect = logits.clone()
    if top_k:
        expect = TopKLogitsWarper(top_k)(None, expect)
    if top_p < 1:
        expect = TopPLogitsWarper(top_p)(None, expect)
    for p in (top_p, torch.tensor(top_p)):
        got = filter_logits(logits, top_k, p)
        assert torch.equal(torch.isinf(got), torch.isinf(expect))
        assert torch.equal(got[~torch.isinf(got)], logits[~torch.isinf(got)])
    assert (~torch.isinf(filter_logits(logits, top_k, top_p))).sum(-1).min().item() >= 1


def test_uniforms_are_reproducible_uniform_and_independent_of_the_batch():
    prompts, samples = torch.arange(2000).repeat_interleave(5), torch.arange(5).repeat(2000)
    keys = sequence_keys(1234, prompts, samples)
    assert len(set(keys.tolist())) == 10000
    steps = torch.zeros_like(keys)
    u = uniform_draws(keys, steps)
    assert u.dtype == torch.float64 and 0 < u.min().item() and u.max().item() < 1
    # Uniform: 20 equal bins, chi-square at p = 1e-5; the mean and the lag-1 correlation over steps.
    counts = torch.bincount((u * 20).long(), minlength=20).double()
    assert (((counts - 500) ** 2) / 500).sum().item() < chi_square_limit(19)
    along = uniform_draws(keys[:1].expand(10000), torch.arange(10000))
    assert abs(along.mean().item() - 0.5) < 0.015
    assert abs(torch.corrcoef(torch.stack([along[:-1], along[1:]]))[0, 1].item()) < 0.05
    # A row's numbers depend only on its own (seed, prompt, sample, step): not on which rows share the call.
    assert torch.equal(uniform_draws(keys[[7, 3]], steps[:2]), u[[7, 3]])
    assert not torch.equal(sequence_keys(1235, prompts, samples), keys)
    assert not torch.equal(uniform_draws(keys, steps + 1), u)
    assert torch.equal(sequence_keys(1234, prompts, samples), keys)
    big_seed = sequence_keys(2 ** 40 + 1234, prompts[:4], samples[:4])
    assert not torch.equal(big_seed, keys[:4])  # the high 32 bits of a seed count too


def test_draws_follow_the_distribution_and_skip_impossible_tokens():
    torch.manual_seed(0)
    logits = torch.randn(700) * 2  # not a multiple of the draw's block size
    logits[torch.randperm(700)[:300]] = float("-inf")
    probs = torch.softmax(logits, -1)
    n = 40000
    keys = sequence_keys(7, torch.arange(n), torch.zeros(n, dtype=torch.long))
    tokens = draw_tokens(logits.expand(n, -1), uniform_draws(keys, torch.zeros(n, dtype=torch.long)))
    assert_samples_follow(tokens, probs)
    one_hot = torch.full((3, 700), float("-inf"))
    one_hot[:, 611] = 0.0
    assert draw_tokens(one_hot, torch.tensor([1e-9, 0.5, 1 - 1e-9], dtype=torch.float64)).tolist() == [611] * 3


def test_sample_next_suppresses_tokens_only_in_the_given_rows():
    logits = torch.zeros(2, 10)
    logits[:, 4] = 50.0
    keys, steps = sequence_keys(0, torch.arange(2), torch.zeros(2, dtype=torch.long)), torch.zeros(2, dtype=torch.long)
    kw = dict(temperature=1.0, top_k=0, top_p=1.0, keys=keys, steps=steps)
    assert sample_next(logits, **kw).tolist() == [4, 4]
    out = sample_next(logits, **kw, suppress_ids=torch.tensor([4]), suppress_rows=torch.tensor([True, False]))
    assert out[0].item() != 4 and out[1].item() == 4
    greedy = sample_next(logits, temperature=0.0, top_k=0, top_p=1.0, keys=keys, steps=steps,
                         suppress_ids=torch.tensor([4]), suppress_rows=torch.tensor([True, False]))
    assert greedy[0].item() != 4 and greedy[1].item() == 4


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.6, 0, 1.0), (1.5, 0, 1.0), (1.0, 12, 1.0),
                                                     (0.8, 0, 0.7), (1.2, 30, 0.9)])
def test_engine_samples_from_the_softmax_restricted_by_top_k_and_top_p(temperature, top_k, top_p):
    """One prefix, 12000 single-token samples from the engine, against softmax(logits / T) filtered."""
    model = tiny_model(seed=3).eval()
    with torch.no_grad():
        model.output.weight.mul_(10.0)  # a peaked next-token distribution, so that top-k/top-p cut something
    prompt = [11, 22, 33, 44]
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[0, -1]
    probs = torch.softmax(filter_logits(logits[None] / temperature, top_k, top_p)[0], -1)
    if top_k or top_p < 1:
        assert (probs == 0).sum().item() >= 60  # the filter removes a good part of the vocabulary
    engine = TorchEngine(model, [], max_batch_size=1024, dtype="float32")
    n = 12000
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=1, n=n, seed=5)
    rollouts = engine.generate([prompt], sampling)
    tokens = torch.tensor([r[0] for r in rollouts.response_token_ids])
    assert_samples_follow(tokens, probs)
    # Log-probs are under softmax(logits / T) before filtering (the training forward's distribution).
    expect = torch.log_softmax(logits / temperature, -1)[tokens]
    assert (torch.tensor([lp[0] for lp in rollouts.logprobs]) - expect).abs().max().item() < 1e-5

"""KL estimators k1, k2, k3 on per-token log-probs: hand values, signs, gradients, and what they estimate."""
import math

import pytest
import torch

from aligner.algorithms import kl_estimate, kl_k1, kl_k2, kl_k3

LOGP = [-1.0, -2.0, -0.5]
REF_LOGP = [-1.5, -1.0, -0.5]  # logp - ref = [0.5, -1.0, 0.0]


def test_hand_values():
    logp, ref = torch.tensor(LOGP), torch.tensor(REF_LOGP)
    assert kl_k1(logp, ref).tolist() == [0.5, -1.0, 0.0]
    assert kl_k2(logp, ref).tolist() == [0.125, 0.5, 0.0]
    # exp(x) - x - 1 at x = ref - logp = -0.5, 1.0, 0.0
    expected_k3 = [math.exp(-0.5) - 0.5, math.e - 2.0, 0.0]
    torch.testing.assert_close(kl_k3(logp, ref), torch.tensor(expected_k3), atol=1e-7, rtol=1e-6)
    for kind, fn in [("k1", kl_k1), ("k2", kl_k2), ("k3", kl_k3)]:
        assert kl_estimate(logp, ref, kind).tolist() == fn(logp, ref).tolist()


def test_k2_and_k3_are_never_negative_and_k3_is_accurate_for_tiny_ratios():
    gen = torch.Generator().manual_seed(0)
    logp = torch.randn(10_000, generator=gen) * 5
    ref = logp + torch.randn(10_000, generator=gen) * torch.logspace(-8, 1, 10_000)
    assert bool((kl_k3(logp, ref) >= 0).all()) and bool((kl_k2(logp, ref) >= 0).all())
    # x^2 / 2 + x^3 / 6 at x = 1e-4; the naive exp(x) - x - 1 gives exactly 0.0 in float32 here
    tiny = kl_k3(torch.tensor([0.0]), torch.tensor([1e-4]))
    assert tiny.item() == pytest.approx(1e-8 / 2 + 1e-12 / 6, rel=1e-3)


def test_gradients_flow_to_logp_only():
    logp = torch.tensor(LOGP, requires_grad=True)
    ref = torch.tensor(REF_LOGP, requires_grad=True)
    kl_k3(logp, ref).sum().backward()
    # d/dlogp [exp(ref - logp) - (ref - logp) - 1] = 1 - exp(ref - logp)
    expected = [1 - math.exp(-0.5), 1 - math.e, 0.0]
    torch.testing.assert_close(logp.grad, torch.tensor(expected), atol=1e-6, rtol=1e-6)
    assert ref.grad is None
    logp.grad = None
    kl_k2(logp, ref).sum().backward()
    assert logp.grad.tolist() == [0.5, -1.0, 0.0]  # d/dlogp 0.5 (logp - ref)^2 = logp - ref


def test_k1_and_k3_are_unbiased_estimates_of_kl():
    # tokens sampled from the policy p; the true KL(p || q) of two categoricals is known exactly
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    true_kl = float((p * (p / q).log()).sum())  # 0.1958...
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    logp, ref = p.log()[tokens], q.log()[tokens]
    assert kl_k1(logp, ref).mean().item() == pytest.approx(true_kl, abs=5e-3)
    assert kl_k3(logp, ref).mean().item() == pytest.approx(true_kl, abs=5e-3)
    # k3 has the lower variance of the two unbiased estimators (its point)
    assert kl_k3(logp, ref).var().item() < kl_k1(logp, ref).var().item()
    # k1 is negative on tokens the reference likes more than the policy does
    assert bool((kl_k1(logp, ref) < 0).any())


def test_bfloat16_inputs_give_float32():
    out = kl_k3(torch.tensor([-1.0], dtype=torch.bfloat16), torch.tensor([-2.0], dtype=torch.bfloat16))
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(math.exp(-1.0) + 1.0 - 1.0, rel=1e-6)


def test_errors():
    with pytest.raises(ValueError, match=r"kind='k4' is not one of \('k1', 'k2', 'k3'\)"):
        kl_estimate(torch.zeros(2), torch.zeros(2), "k4")
    with pytest.raises(ValueError, match=r"kl_k3: logp \(2, 3\) and ref_logp \(2, 4\) must have the same shape"):
        kl_k3(torch.zeros(2, 3), torch.zeros(2, 4))

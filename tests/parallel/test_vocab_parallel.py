"""Vocab-parallel log-probs, entropy and cross-entropy equal the full-logits computation (values and grads)."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import run_torchrun

from aligner.parallel import cross_entropy, token_entropy, token_logprobs, token_logprobs_with_entropy

WORKER = Path(__file__).parent / "workers" / "tp_vocab_parallel.py"


def reference(x: dict) -> dict:
    """The same objective as the worker's, on the full float32 logits with plain torch ops."""
    logits = x["logits"].float().clone().requires_grad_()
    labels = x["labels"]
    logp = F.log_softmax(logits, dim=-1)
    lp = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    flat_logits, flat_labels = logits.flatten(0, 1), labels.flatten()
    ce = F.cross_entropy(flat_logits, flat_labels, ignore_index=-100, reduction="sum")
    ce_mean = F.cross_entropy(flat_logits, flat_labels, ignore_index=-100, reduction="mean")
    ((lp * x["w_lp"]).sum() + (ent * x["w_ent"]).sum() + ce + ce_mean).backward()
    return {"logprobs": lp.detach(), "entropy": ent.detach(), "ce_sum": ce.detach(), "ce_mean": ce_mean.detach(),
            "grad": logits.grad}


def logprob_grad(x: dict) -> torch.Tensor:
    """The gradient of ``sum(w_lp * log-prob)`` on the full float32 logits: what the fused function's
    log-probs must give (its entropy is detached)."""
    logits = x["logits"].float().clone().requires_grad_()
    lp = F.log_softmax(logits, dim=-1).gather(-1, x["labels"].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    (lp * x["w_lp"]).sum().backward()
    return logits.grad


@pytest.fixture(scope="module")
def tp2_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("vocab_parallel") / "results.pt"
    run_torchrun(WORKER, 2, str(out))
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("case", ["128_float32", "131_float32", "128_bfloat16"])
def test_tp2_equals_full_logits(tp2_results, case):
    got = tp2_results[case]
    want = reference(got["inputs"])
    for key in ("logprobs", "entropy", "ce_sum", "ce_mean"):
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=2e-5, msg=key)
    # The gradient has the logits' dtype: bf16 keeps ~3 significant digits and the four terms of the
    # objective are accumulated in it, so a few bf16 ulps (0.004 near 1) is its rounding, not an error.
    grad_tol = 1e-5 if got["inputs"]["logits"].dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got["grad"].float(), want["grad"], rtol=0, atol=grad_tol)


@pytest.mark.parametrize("case", ["128_float32", "131_float32", "128_bfloat16"])
def test_tp2_fused_logprobs_and_entropy_equal_full_logits(tp2_results, case):
    got = tp2_results[case]
    want = reference(got["inputs"])
    torch.testing.assert_close(got["fused_logprobs"], want["logprobs"], rtol=0, atol=2e-5)
    torch.testing.assert_close(got["fused_entropy"], want["entropy"], rtol=0, atol=2e-5)
    assert not got["fused_entropy_requires_grad"]
    grad_tol = 1e-5 if got["inputs"]["logits"].dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got["fused_grad"].float(), logprob_grad(got["inputs"]), rtol=0, atol=grad_tol)
    assert got["fused_grad"].dtype == got["inputs"]["logits"].dtype


def test_tp2_only_reduces_per_token_scalars(tp2_results):
    """No all-gather of the logits: each rank keeps its vocab slice, only [B, T] all-reduces run."""
    for case, got in tp2_results.items():
        assert got["comms"] == {"c10d.allreduce_": 12}, (case, got["comms"])  # 3 per call, 4 calls
        assert got["fused_comms"] == {"c10d.allreduce_": 4}, (case, got["fused_comms"])  # max, sum, E[x], label
    assert tp2_results["131_float32"]["local_vocab"] == 66  # uneven shards: 66 + 65


def test_plain_tensor_matches_torch():
    gen = torch.Generator().manual_seed(0)
    x = {"logits": torch.randn(2, 5, 50, generator=gen) * 4, "labels": torch.randint(0, 50, (2, 5), generator=gen),
         "w_lp": torch.randn(2, 5, generator=gen), "w_ent": torch.randn(2, 5, generator=gen)}
    x["labels"][1, 2:] = -100
    want = reference(x)
    logits = x["logits"].clone().requires_grad_()
    lp = token_logprobs(logits, x["labels"].clamp(min=0))
    ent = token_entropy(logits)
    ce = cross_entropy(logits, x["labels"])
    ce_mean = cross_entropy(logits, x["labels"], reduction="mean")
    ((lp * x["w_lp"]).sum() + (ent * x["w_ent"]).sum() + ce + ce_mean).backward()
    torch.testing.assert_close(lp, want["logprobs"], rtol=0, atol=1e-6)
    torch.testing.assert_close(ent, want["entropy"], rtol=0, atol=1e-6)
    torch.testing.assert_close(ce, want["ce_sum"], rtol=0, atol=1e-5)
    torch.testing.assert_close(ce_mean, want["ce_mean"], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits.grad, want["grad"], rtol=1e-5, atol=1e-6)
    none = cross_entropy(logits, x["labels"], reduction="none")
    assert none.shape == (2, 5) and none[1, 2:].abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_logprobs_and_entropy_match_the_separate_functions(dtype):
    """One pass gives token_logprobs' values and gradient and token_entropy's values (detached)."""
    gen = torch.Generator().manual_seed(2)
    logits = (torch.randn(3, 6, 1000, generator=gen) * 8).to(dtype)
    labels = torch.randint(0, 1000, (3, 6), generator=gen)
    w = torch.randn(3, 6, generator=gen)
    a = logits.clone().requires_grad_()
    lp, ent = token_logprobs_with_entropy(a, labels)
    (lp * w).sum().backward()
    b = logits.clone().requires_grad_()
    want_lp = token_logprobs(b, labels)
    (want_lp * w).sum().backward()
    torch.testing.assert_close(lp, want_lp, rtol=0, atol=1e-5)
    torch.testing.assert_close(ent, token_entropy(logits), rtol=0, atol=1e-5)
    assert not ent.requires_grad and a.grad.dtype == dtype
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6 if dtype == torch.float32 else 4e-3)


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 7, (2, 3), generator=gen)
    # The functions compute in float32, so compare with a float32-appropriate tolerance.
    assert torch.autograd.gradcheck(lambda t: token_logprobs(t, labels), (logits,), eps=1e-3, atol=1e-3)
    assert torch.autograd.gradcheck(token_entropy, (logits,), eps=1e-3, atol=1e-3)
    assert torch.autograd.gradcheck(lambda t: token_logprobs_with_entropy(t, labels)[0], (logits,), eps=1e-3, atol=1e-3)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"labels shape \(2, 4\) does not match logits"):
        token_logprobs(torch.randn(2, 5, 7), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction 'avg'"):
        cross_entropy(torch.randn(2, 5, 7), torch.zeros(2, 5, dtype=torch.long), reduction="avg")

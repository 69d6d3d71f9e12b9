"""Bradley–Terry reward-model loss, with and without a margin, against hand-computed values."""
import pytest
import torch

from aligner.algorithms import bradley_terry_loss

LOG2 = 0.6931471805599453


def t(*values, grad=False):
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


def test_without_margin():
    # softplus(-(2 - 1)) = log(1 + e^-1); equal rewards -> log 2; reversed by 1 -> log(1 + e)
    losses = bradley_terry_loss(t(2.0, 0.3, 1.0), t(1.0, 0.3, 2.0))
    assert losses.tolist() == pytest.approx([0.31326168751822286, LOG2, 1.3132616875182228], abs=1e-6)
    assert losses.dtype == torch.float32


def test_margin_per_pair_and_scalar():
    chosen, rejected = t(2.0, 2.0), t(1.0, 1.0)
    # gap 1: margin 1 -> log 2; margin 3 -> softplus(2) = log(1 + e^2)
    losses = bradley_terry_loss(chosen, rejected, t(1.0, 3.0))
    assert losses.tolist() == pytest.approx([LOG2, 2.1269280110429727], abs=1e-6)
    assert bradley_terry_loss(chosen, rejected, 1.0).tolist() == pytest.approx([LOG2, LOG2], abs=1e-6)
    assert bradley_terry_loss(chosen, rejected, 0.0).tolist() == bradley_terry_loss(chosen, rejected).tolist()


def test_gradients_flow_into_both_rewards_and_stay_finite():
    chosen, rejected = t(0.0, -500.0, grad=True), t(0.0, 500.0, grad=True)
    losses = bradley_terry_loss(chosen, rejected)
    losses.sum().backward()
    # d/dc softplus(r - c) = -sigmoid(r - c): -0.5 at a tie, -1 when badly wrong
    assert chosen.grad.tolist() == pytest.approx([-0.5, -1.0], abs=1e-6)
    assert rejected.grad.tolist() == pytest.approx([0.5, 1.0], abs=1e-6)
    assert losses[1].item() == pytest.approx(1000.0, rel=1e-6)


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"chosen_rewards \(2,\), rejected_rewards \(3,\)"):
        bradley_terry_loss(t(1.0, 2.0), t(1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match=r"margin has shape \(3,\).*chosen_rewards \(2,\)"):
        bradley_terry_loss(t(1.0, 2.0), t(1.0, 2.0), t(0.0, 0.0, 0.0))

"""KTO's two branches, weights and reference point against values worked out by hand (Python ``math``)."""
import pytest
import torch

from aligner.algorithms import kto_loss


def t(*values, grad=False):
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


# example 0 desirable, h = 2.5; example 1 undesirable, h = -1.5
POLICY, REF, DESIRABLE = (-7.5, -11.5), (-10.0, -10.0), torch.tensor([True, False])


def test_both_branches_at_a_positive_reference_point():
    losses, rewards = kto_loss(t(*POLICY), t(*REF), DESIRABLE, torch.tensor(0.5), beta=0.1)
    # desirable: 1 - sigmoid(0.1 (2.5 - 0.5)); undesirable: 1 - sigmoid(0.1 (0.5 + 1.5)); both 1 - sigmoid(0.2)
    assert losses.tolist() == pytest.approx([0.45016600268752205, 0.45016600268752205], abs=1e-6)
    assert rewards.tolist() == pytest.approx([0.25, -0.15], abs=1e-6)
    assert not rewards.requires_grad and losses.dtype == torch.float32


def test_weights_scale_only_their_branch():
    losses, _ = kto_loss(
        t(*POLICY), t(*REF), DESIRABLE, torch.tensor(0.5), beta=0.1, desirable_weight=1.0, undesirable_weight=1.5
    )
    assert losses.tolist() == pytest.approx([0.45016600268752205, 1.5 * 0.45016600268752205], abs=1e-6)
    losses, _ = kto_loss(
        t(*POLICY), t(*REF), DESIRABLE, 0.0, beta=0.1, desirable_weight=2.0, undesirable_weight=0.5
    )
    # kl 0: 2 (1 - sigmoid(0.25)) and 0.5 (1 - sigmoid(0.15))
    assert losses.tolist() == pytest.approx([0.8756469982284039, 0.2312850773281252], abs=1e-6)


def test_negative_kl_is_clamped_to_zero_and_kl_is_a_constant():
    kl, policy = torch.tensor(-3.0, requires_grad=True), t(*POLICY, grad=True)
    losses, _ = kto_loss(policy, t(*REF), DESIRABLE, kl, beta=0.1)
    # as kl = 0: 1 - sigmoid(0.25), 1 - sigmoid(0.15)
    assert losses.tolist() == pytest.approx([0.43782349911420193, 0.4625701546562504], abs=1e-6)
    losses.sum().backward()
    assert kl.grad is None and torch.isfinite(policy.grad).all()


def test_same_log_ratio_opposite_labels_pull_opposite_ways():
    policy = t(-5.0, -5.0, grad=True)
    losses, _ = kto_loss(policy, t(-5.5, -5.5), torch.tensor([True, False]), torch.tensor(0.0), beta=0.1)
    # h = 0.5: desirable 1 - sigmoid(0.05), undesirable 1 - sigmoid(-0.05) = sigmoid(0.05); they sum to 1
    assert losses.tolist() == pytest.approx([0.48750260351578967, 0.5124973964842103], abs=1e-6)
    losses.sum().backward()
    # d/dh: desirable -beta s(1-s), undesirable +beta s(1-s), s = sigmoid(0.05)
    s = 0.5124973964842103
    assert policy.grad.tolist() == pytest.approx([-0.1 * s * (1 - s), 0.1 * s * (1 - s)], abs=1e-7)


def test_gradients_finite_at_extreme_log_ratios():
    policy = t(-1e-6, -3000.0, grad=True)
    losses, _ = kto_loss(policy, t(-3000.0, -1e-6), torch.tensor([False, True]), torch.tensor(0.0), beta=1.0)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(policy.grad).all()
    # undesirable at h = +3000, desirable at h = -3000: both saturated on the wrong side
    assert losses.tolist() == pytest.approx([1.0, 1.0], abs=1e-6)


@pytest.mark.parametrize(
    "desirable, kl, kwargs, message",
    [
        (torch.tensor([1, 0]), 0.0, {}, "desirable must be a bool tensor"),
        (torch.tensor([True]), 0.0, {}, r"shaped like policy_logps \(2,\), got torch.bool \(1,\)"),
        (DESIRABLE, torch.zeros(2), {}, r"kl has shape \(2,\) but must be a scalar"),
        (DESIRABLE, 0.0, {"beta": -0.1}, "beta=-0.1 must be > 0"),
        (DESIRABLE, 0.0, {"undesirable_weight": -1.0}, "undesirable_weight=-1.0 must be >= 0"),
    ],
)
def test_rejects_bad_arguments(desirable, kl, kwargs, message):
    with pytest.raises(ValueError, match=message):
        kto_loss(t(*POLICY), t(*REF), desirable, kl, **kwargs)

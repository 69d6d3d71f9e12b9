"""DPO (sigmoid, IPO, hinge), CPO, SimPO and ORPO against values worked out by hand (Python ``math``)."""
import ast
import math
import subprocess
import sys

import pytest
import torch

from aligner.algorithms import cpo_loss, dpo_loss, log1mexp, orpo_loss, simpo_loss

LOG2 = 0.6931471805599453


def t(*values, grad=False):
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


# pair 0: h = (-10 + 11) - (-12 + 11.5) = 1.5; pair 1: h = (-5 + 5) - (-4 + 5) = -1
PC, PR, RC, RR = (-10.0, -5.0), (-12.0, -4.0), (-11.0, -5.0), (-11.5, -5.0)


def test_dpo_sigmoid_matches_hand_values_and_rewards():
    losses, chosen, rejected = dpo_loss(t(*PC), t(*PR), t(*RC), t(*RR), beta=0.1)
    # softplus(-0.15) = log(1 + e^-0.15), softplus(0.1) = log(1 + e^0.1)
    assert losses.tolist() == pytest.approx([0.6209570477895321, 0.744396660073571], abs=1e-6)
    assert chosen.tolist() == pytest.approx([0.1, 0.0], abs=1e-6)
    assert rejected.tolist() == pytest.approx([-0.05, 0.1], abs=1e-6)
    assert losses.dtype == torch.float32 and losses.shape == (2,)


def test_dpo_conservative_label_smoothing():
    losses, _, _ = dpo_loss(t(*PC), t(*PR), t(*RC), t(*RR), beta=0.1, label_smoothing=0.1)
    # 0.9 softplus(-z) + 0.1 softplus(z) = softplus(-z) + 0.1 z  (softplus(z) - softplus(-z) = z)
    assert losses.tolist() == pytest.approx([0.6209570477895321 + 0.015, 0.744396660073571 - 0.01], abs=1e-6)
    # eps = 0.5 makes the loss symmetric: h and -h cost the same
    flipped, _, _ = dpo_loss(t(*PR), t(*PC), t(*RR), t(*RC), beta=0.1, label_smoothing=0.5)
    half, _, _ = dpo_loss(t(*PC), t(*PR), t(*RC), t(*RR), beta=0.1, label_smoothing=0.5)
    assert torch.allclose(half, flipped)


def test_dpo_is_log2_when_policy_equals_reference():
    logps_c, logps_r = t(-17.3, -2.0, -250.0), t(-9.1, -40.0, -3.0)
    for beta in (0.1, 0.5):
        losses, chosen, rejected = dpo_loss(logps_c, logps_r, logps_c, logps_r, beta=beta)
        assert losses.tolist() == pytest.approx([LOG2] * 3, abs=1e-6)
        assert chosen.abs().max().item() == 0.0 and rejected.abs().max().item() == 0.0


def test_dpo_ipo_targets_half_inverse_beta():
    # beta = 0.1: the target margin is 1 / (2 beta) = 5
    losses, _, _ = dpo_loss(t(-1.0, -1.0), t(-6.0, -2.0), t(0.0, -1.0), t(0.0, -1.5), beta=0.1, loss_type="ipo")
    # pair 0: h = -1 - (-6) = 5 -> 0; pair 1: h = 0 - (-0.5) = 0.5 -> (0.5 - 5)^2 = 20.25
    assert losses.tolist() == pytest.approx([0.0, 20.25], abs=1e-5)
    pc = t(-1.0, grad=True)
    loss, _, _ = dpo_loss(pc, t(-6.0), t(0.0), t(0.0), beta=0.1, loss_type="ipo")
    loss.sum().backward()
    assert pc.grad.item() == pytest.approx(0.0, abs=1e-6)  # the minimum, not a push to infinity


def test_dpo_hinge_has_a_zero_region():
    # beta = 0.1: h = 1.5 -> relu(1 - 0.15) = 0.85; h = 10 -> 0 (edge); h = 25 -> 0
    pc = t(1.5, 10.0, 25.0, grad=True)
    losses, _, _ = dpo_loss(pc, t(0.0, 0.0, 0.0), t(0.0, 0.0, 0.0), t(0.0, 0.0, 0.0), beta=0.1, loss_type="hinge")
    assert losses.tolist() == pytest.approx([0.85, 0.0, 0.0], abs=1e-6)
    losses.sum().backward()
    assert pc.grad.tolist() == pytest.approx([-0.1, 0.0, 0.0], abs=1e-6)


def test_dpo_rewards_carry_no_grad_and_reference_is_constant():
    pc, pr, rc, rr = t(-3.0, grad=True), t(-4.0, grad=True), t(-3.5, grad=True), t(-3.5, grad=True)
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr)
    assert losses.requires_grad and not chosen.requires_grad and not rejected.requires_grad
    losses.sum().backward()
    assert rc.grad is None and rr.grad is None
    # d/dpc of softplus(-beta h) = -beta sigmoid(-beta h), h = 0.5 - (-0.5) = 1
    assert pc.grad.item() == pytest.approx(-0.1 / (1 + math.exp(0.1)), abs=1e-6)
    assert pr.grad.item() == pytest.approx(0.1 / (1 + math.exp(0.1)), abs=1e-6)


def test_dpo_gradients_finite_at_extreme_margins():
    pc, pr = t(-1e-6, -5000.0, grad=True), t(-5000.0, -1e-6, grad=True)
    losses, _, _ = dpo_loss(pc, pr, t(-1000.0, -1000.0), t(-1000.0, -1000.0), beta=0.5, label_smoothing=0.2)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    # pair 1: beta h = -2500: the loss is ~0.8 * 2500
    assert losses[1].item() == pytest.approx(0.8 * 2499.9999995, rel=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"loss_type": "kto_pair"}, "unknown loss_type 'kto_pair'; valid: sigmoid, ipo, hinge"),
        ({"beta": 0.0}, "beta=0.0 must be > 0"),
        ({"label_smoothing": 0.7}, "label_smoothing=0.7 must be in [0, 0.5]"),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, "only applies to loss_type='sigmoid'"),
    ],
)
def test_dpo_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        dpo_loss(t(-1.0), t(-2.0), t(-1.0), t(-2.0), **kwargs)


def test_shape_errors_name_both_shapes():
    with pytest.raises(ValueError, match=r"policy_chosen_logps \(2,\).*ref_chosen_logps \(3,\)"):
        dpo_loss(t(-1.0, -1.0), t(-1.0, -1.0), t(-1.0, -1.0, -1.0), t(-1.0, -1.0))
    with pytest.raises(ValueError, match=r"chosen_logps has shape \(2, 4\) but must be \[B\].*sequence_logps"):
        cpo_loss(torch.zeros(2, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="dtype torch.int64"):
        simpo_loss(torch.zeros(2, dtype=torch.long), torch.zeros(2))


def test_cpo_sigmoid_smoothing_hinge_ipo():
    c, r = t(-3.0, -4.0), t(-5.0, -4.0)  # h = 2, 0
    assert cpo_loss(c, r, beta=0.1).tolist() == pytest.approx([0.5981388693815918, LOG2], abs=1e-6)
    # softplus(-0.2) + 0.2 * 0.2 ; at h = 0 smoothing changes nothing
    assert cpo_loss(c, r, beta=0.1, label_smoothing=0.2).tolist() == pytest.approx(
        [0.5981388693815918 + 0.04, LOG2], abs=1e-6
    )
    assert cpo_loss(c, r, beta=0.1, loss_type="hinge").tolist() == pytest.approx([0.8, 1.0], abs=1e-6)
    assert cpo_loss(c, r, beta=0.1, loss_type="ipo").tolist() == pytest.approx([9.0, 25.0], abs=1e-5)


def test_simpo_margin_and_smoothing():
    c, r = t(-1.0, -0.5), t(-1.5, -2.0)  # c - r = 0.5, 1.5
    # beta 2, gamma 1: z = 0 -> log 2; z = 2 -> softplus(-2)
    assert simpo_loss(c, r).tolist() == pytest.approx([LOG2, 0.1269280110429725], abs=1e-6)
    # gamma 0 is DPO-like with no margin: z = 1 -> softplus(-1), z = 3 -> softplus(-3)
    assert simpo_loss(c, r, gamma=0.0).tolist() == pytest.approx([0.31326168751822286, 0.04858735157374206], abs=1e-6)
    # smoothing 0.1 at z = 2: softplus(-2) + 0.1 * 2
    assert simpo_loss(c, r, label_smoothing=0.1)[1].item() == pytest.approx(0.1269280110429725 + 0.2, abs=1e-6)
    # a larger margin demands a larger gap: loss rises with gamma
    assert simpo_loss(c, r, gamma=3.0)[1].item() > simpo_loss(c, r, gamma=1.0)[1].item()


def test_orpo_log_odds_on_known_probabilities():
    # p_c = 0.5, p_r = 0.2: odds 1 and 1/4 -> log_odds = log 4, loss = 0.1 log(1 + 1/4)
    # p_c = 0.9, p_r = 0.1: odds 9 and 1/9 -> log_odds = log 81, loss = 0.1 log(1 + 1/81)
    c, r = t(math.log(0.5), math.log(0.9)), t(math.log(0.2), math.log(0.1))
    losses, log_odds = orpo_loss(c, r, beta=0.1)
    assert log_odds.tolist() == pytest.approx([1.3862943611198906, 4.394449154672439], abs=1e-5)
    assert losses.tolist() == pytest.approx([0.02231435513142098, 0.0012270092591814402], abs=1e-6)
    assert not log_odds.requires_grad
    # swapping chosen and rejected flips the sign of the log odds
    _, swapped = orpo_loss(r, c, beta=0.1)
    assert swapped.tolist() == pytest.approx([-1.3862943611198906, -4.394449154672439], abs=1e-5)


def test_orpo_gradients_finite_at_extreme_inputs():
    c, r = t(-1e-6, -200.0, 0.0, -1e-30, grad=True), t(-200.0, -1e-6, -3.0, 0.0, grad=True)
    losses, log_odds = orpo_loss(c.float(), r.float(), beta=0.1)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(log_odds).all()
    assert torch.isfinite(c.grad).all() and torch.isfinite(r.grad).all()
    # pair 0: log_odds = -1e-6 + 200 - log(1 - e^-1e-6) + log(1 - e^-200) = 199.999999 + 13.8155 -> loss ~ 0
    assert log_odds[0].item() == pytest.approx(200.0 + 13.815511057964233, rel=1e-5)
    assert losses[0].item() == pytest.approx(0.0, abs=1e-12)
    # pair 1 mirrored: loss ~ 0.1 * 213.8155
    assert losses[1].item() == pytest.approx(0.1 * 213.815511057964233, rel=1e-5)


@pytest.mark.parametrize(
    "x, expected",
    [(-1e-6, -13.815511057964233), (-0.01, -4.610166019324897), (-0.5, -0.9327521295671886),
     (-0.7, -0.6863410028083852), (-1.0, -0.45867514538708193), (-5.0, -0.006760749449488566),
     (-30.0, -9.359180097590508e-14)],
)
def test_log1mexp_matches_math_in_float32(x, expected):
    # expected = math.log(-math.expm1(x))
    got = log1mexp(torch.tensor([x], dtype=torch.float32)).item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_algorithms_import_nothing_beyond_torch():
    # torch itself loads torch.distributed, so compare against a bare `import torch`
    code = (
        "import sys, torch; before = set(sys.modules); import aligner.algorithms; "
        "print(sorted(set(sys.modules) - before))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    added = ast.literal_eval(out)
    assert added, "aligner.algorithms was already imported?"
    outside = [m for m in added if m != "aligner" and not m.startswith("aligner.algorithms")]
    assert outside == [], f"aligner.algorithms pulled in {outside}; it must stay pure torch math"

"""PPO clipped policy loss, clipped value loss, and the loss aggregations under micro-batching."""
import math

import pytest
import torch

from aligner.algorithms import aggregate_loss, aggregate_sum, aggregate_units, ppo_policy_loss, value_loss
from aligner.algorithms.policy_loss import AGGREGATION_MODES

RATIOS = [0.5, 0.9, 1.1, 1.5]


def _policy_loss_at(ratios, advantage, **clip):
    """The loss and its gradient for one row whose tokens have the given new/old probability ratios."""
    old_logp = torch.full((1, len(ratios)), -2.0)
    logp = (old_logp + torch.tensor([ratios]).log()).requires_grad_(True)
    loss, stats = ppo_policy_loss(logp, old_logp, torch.tensor([advantage]), torch.ones(1, len(ratios)), **clip)
    loss.sum().backward()
    return loss, stats, logp.grad


def _assert_values(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, torch.tensor(expected), atol=atol, rtol=0)


def test_positive_advantage_clips_above_only():
    loss, stats, grad = _policy_loss_at(RATIOS, 1.0, cliprange=0.2)
    # -min(r, clip(r, 0.8, 1.2)): a ratio below 0.8 is not clipped (the update may raise it), 1.5 is
    _assert_values(loss, [[-0.5, -0.9, -1.1, -1.2]])
    _assert_values(stats["clipfrac"], [[0.0, 0.0, 0.0, 1.0]])
    _assert_values(grad, [[-0.5, -0.9, -1.1, 0.0]])  # d(-A r)/dlogp = -A r; 0 where clipped
    _assert_values(stats["ratio"], [RATIOS])
    _assert_values(stats["approxkl"], [[0.5 * math.log(r) ** 2 for r in RATIOS]])


def test_negative_advantage_clips_below_only():
    loss, stats, grad = _policy_loss_at(RATIOS, -1.0, cliprange=0.2)
    # -min(-r, -clip(r, 0.8, 1.2)) = max(r, clip(r)): 0.5 is held at 0.8, 1.5 is not clipped
    _assert_values(loss, [[0.8, 0.9, 1.1, 1.5]])
    _assert_values(stats["clipfrac"], [[1.0, 0.0, 0.0, 0.0]])
    _assert_values(grad, [[0.0, 0.9, 1.1, 1.5]])


def test_asymmetric_clip_higher():
    ratios = [0.5, 1.25, 1.5]
    symmetric, _, _ = _policy_loss_at(ratios, 1.0, cliprange=0.2)
    higher, stats, grad = _policy_loss_at(ratios, 1.0, cliprange=0.2, cliprange_high=0.28)
    _assert_values(symmetric, [[-0.5, -1.2, -1.2]])
    _assert_values(higher, [[-0.5, -1.25, -1.28]])  # 1.25 is inside [0.8, 1.28] now
    _assert_values(stats["clipfrac"], [[0.0, 0.0, 1.0]])
    _assert_values(grad, [[-0.5, -1.25, 0.0]])
    # the low side still clips at 1 - cliprange for a negative advantage
    low, _, _ = _policy_loss_at(ratios, -2.0, cliprange=0.2, cliprange_high=0.28)
    _assert_values(low, [[1.6, 2.5, 3.0]])


def test_on_policy_ratio_is_one_and_loss_is_minus_advantage():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.7, -0.9]])
    advantages = torch.tensor([[0.3, -0.4, 1.0], [2.0, 0.0, -1.0]])
    loss, stats = ppo_policy_loss(logp, logp.clone(), advantages, torch.ones(2, 3))
    _assert_values(loss, (-advantages).tolist())
    _assert_values(stats["ratio"], [[1.0] * 3] * 2)
    assert stats["clipfrac"].sum().item() == 0.0 and stats["approxkl"].sum().item() == 0.0


def test_sequence_advantages_broadcast_and_masked_tokens_are_zero():
    old_logp = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, -math.inf]])
    logp = torch.tensor([[-0.9, -1.3, -1.0], [-2.1, -1.9, -math.inf]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    per_sequence, stats = ppo_policy_loss(logp, old_logp, torch.tensor([1.0, -0.5]), mask)
    per_token, _ = ppo_policy_loss(logp, old_logp, torch.tensor([[1.0] * 3, [-0.5] * 3]), mask)
    assert per_sequence.tolist() == per_token.tolist()
    assert per_sequence[1, 2].item() == 0.0 and stats["ratio"][1, 2].item() == 0.0
    per_sequence.sum().backward()
    assert not torch.isnan(logp.grad).any() and logp.grad[1, 2].item() == 0.0


def test_sequence_level_ratio_as_one_column():
    # RLOO's sequence-level ratio: summed log-probs per response as [B, 1]
    old = torch.tensor([[-5.0], [-3.0]])
    new = old + torch.tensor([[math.log(1.5)], [math.log(0.9)]])
    loss, stats = ppo_policy_loss(new, old, torch.tensor([2.0, 2.0]), torch.ones(2, 1))
    _assert_values(loss, [[-2.4], [-1.8]])  # -2 * min(1.5, 1.2) and -2 * 0.9
    _assert_values(stats["clipfrac"], [[1.0], [0.0]])


def test_value_loss_clipping():
    values = torch.ones(1, 4, requires_grad=True)
    old_values = torch.tensor([[0.9, 1.5, 0.5, 1.0]])
    returns = torch.tensor([[2.0, 2.0, 1.2, 1.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    # token 0: inside the range, 0.5 * 1^2; token 1: clipped to 1.3, (0.7)^2 < 1^2 so the unclipped term wins;
    # token 2: clipped to 0.7, (0.5)^2 > (0.2)^2 so the clipped (constant) term wins; token 3 is masked
    _assert_values(loss, [[0.5, 0.5, 0.125, 0.0]])
    _assert_values(stats["clipfrac"], [[0.0, 0.0, 1.0, 0.0]])
    loss.sum().backward()
    _assert_values(values.grad, [[-1.0, -1.0, 0.0, 0.0]])  # d/dV 0.5 (V - R)^2 = V - R
    unclipped, stats = value_loss(values, old_values, returns, mask, cliprange_value=None)
    _assert_values(unclipped, [[0.5, 0.5, 0.02, 0.0]])
    assert stats["clipfrac"].sum().item() == 0.0


def test_aggregation_hand_values():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 99.0, 99.0], [7.0, 7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])  # the last row has no tokens
    assert aggregate_loss(per_token, mask, "token_mean").item() == pytest.approx(40.0 / 6.0)
    assert aggregate_loss(per_token, mask, "sequence_mean").item() == pytest.approx((2.5 + 15.0 + 0.0) / 3.0)
    assert aggregate_loss(per_token, mask, "dr_grpo", normaliser=4).item() == pytest.approx(40.0 / (3 * 4))
    assert aggregate_units(mask, "token_mean").item() == 6.0
    assert aggregate_units(mask, "sequence_mean").item() == 3.0 and aggregate_units(mask, "dr_grpo").item() == 3.0
    assert aggregate_sum(per_token, mask, "sequence_mean").item() == 17.5
    assert aggregate_loss(per_token, torch.zeros(3, 4), "token_mean").item() == 0.0


def _accumulated_step(mode, micro_batch_size, logp_init, old_logp, advantages, mask):
    """What a model wrapper does: sum each micro-batch's aggregate_sum / (units over the whole batch), backward."""
    logp = logp_init.clone().requires_grad_(True)
    rows = [slice(i, i + micro_batch_size) for i in range(0, logp.shape[0], micro_batch_size)]
    units = sum(aggregate_units(mask[r], mode) for r in rows)
    total = torch.zeros(())
    for r in rows:
        per_token, _ = ppo_policy_loss(logp[r], old_logp[r], advantages[r], mask[r], cliprange=0.2)
        part = aggregate_sum(per_token, mask[r], mode, normaliser=logp.shape[1]) / units
        part.backward()
        total += part.detach()
    return total, logp.grad


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_micro_batch_1_vs_4_same_loss_and_gradient(mode):
    gen = torch.Generator().manual_seed(0)
    lengths = [6, 1, 4, 2]  # unequal, so token_mean and sequence_mean weigh tokens differently
    mask = torch.tensor([[1] * n + [0] * (6 - n) for n in lengths])
    old_logp = -2.0 + 0.1 * torch.randn(4, 6, generator=gen)
    logp_init = old_logp + 0.3 * torch.randn(4, 6, generator=gen)  # some ratios leave [0.8, 1.2]
    advantages = torch.tensor([1.5, -2.0, 0.8, -1.2])

    whole = logp_init.clone().requires_grad_(True)
    per_token, stats = ppo_policy_loss(whole, old_logp, advantages, mask)
    assert 0 < stats["clipfrac"].sum().item() < mask.sum().item()  # both branches are exercised
    reference = aggregate_loss(per_token, mask, mode, normaliser=6)
    reference.backward()

    loss_4, grad_4 = _accumulated_step(mode, 4, logp_init, old_logp, advantages, mask)
    loss_1, grad_1 = _accumulated_step(mode, 1, logp_init, old_logp, advantages, mask)
    loss_2, grad_2 = _accumulated_step(mode, 2, logp_init, old_logp, advantages, mask)
    torch.testing.assert_close(loss_4, reference.detach(), atol=1e-6, rtol=1e-6)
    for loss, grad in [(loss_1, grad_1), (loss_2, grad_2)]:
        torch.testing.assert_close(loss, loss_4, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(grad, grad_4, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(grad_4, whole.grad, atol=1e-7, rtol=1e-6)
    assert grad_4.abs().sum().item() > 1e-2  # the comparison is not between two zeros

    if mode == "token_mean":
        # what the split into sum and units prevents: averaging per-micro-batch means weighs the short rows up
        naive = 0.0
        for i in range(4):
            row = slice(i, i + 1)
            row_loss, _ = ppo_policy_loss(logp_init[row], old_logp[row], advantages[row], mask[row])
            naive += aggregate_loss(row_loss, mask[row], mode).item() / 4
        assert abs(naive - reference.item()) > 1e-2


def test_errors():
    mask = torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"advantages has shape \(3,\) but must be \[B\] = \[2\]"):
        ppo_policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), mask)
    with pytest.raises(ValueError, match=r"old_logp has shape \(2, 4\) but must match mask \(2, 3\)"):
        ppo_policy_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2), mask)
    with pytest.raises(ValueError, match=r"cliprange=-0.1 must be >= 0"):
        ppo_policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), mask, cliprange=-0.1)
    with pytest.raises(ValueError, match=r"returns has shape \(2,\) but must match mask \(2, 3\)"):
        value_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), mask)
    with pytest.raises(ValueError, match=r"mode='dr_grpo' needs a constant normaliser > 0"):
        aggregate_loss(torch.zeros(2, 3), mask, "dr_grpo")
    with pytest.raises(ValueError, match=r"mode='mean' is not one of"):
        aggregate_units(mask, "mean")

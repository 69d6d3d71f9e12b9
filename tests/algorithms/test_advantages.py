"""Advantages for online RL: RLOO (the reference page's own test), REINFORCE, GRPO, GAE and whitening."""
import math

import pytest
import torch

from aligner.algorithms import gae, grpo_advantages, reinforce_loo_advantages, rloo_advantages, whiten


def _assert_values(actual, expected):
    torch.testing.assert_close(actual, torch.tensor(expected), atol=1e-6, rtol=0)


def test_rloo_reward():
    # The reference RLOO page's test (reference/002), as written; only the vectorised lines at the end
    # call our function instead of the page's three-line implementation.
    local_batch_size = 3
    rloo_k = 4
    rlhf_reward = torch.tensor([
        1, 2, 3,  # first rlhf reward for three prompts
        2, 3, 4,  # second rlhf reward for three prompts
        5, 6, 7,  # third rlhf reward for three prompts
        8, 9, 10,  # fourth rlhf reward for three prompts
    ]).float()  # here we have 3 prompts which have 4 completions each

    baseline = (rlhf_reward.sum(0) - rlhf_reward) / (rloo_k - 1)
    advantages = torch.zeros_like(rlhf_reward)
    for i in range(0, len(advantages), local_batch_size):
        other_response_rlhf_rewards = []
        for j in range(0, len(advantages), local_batch_size):
            if i != j:
                other_response_rlhf_rewards.append(rlhf_reward[j : j + local_batch_size])
        advantages[i : i + local_batch_size] = rlhf_reward[i : i + local_batch_size] - torch.stack(
            other_response_rlhf_rewards
        ).mean(0)
    assert (1 - (2 + 5 + 8) / 3 - advantages[0].item()) < 1e-6  # First rlhf reward for the first prompt
    assert (6 - (3 + 2 + 9) / 3 - advantages[7].item()) < 1e-6  # Third rlhf reward for the second prompt

    # Vectorized implementation
    vec_advantages = rloo_advantages(rlhf_reward, rloo_k)
    torch.testing.assert_close(vec_advantages.flatten(), advantages)


def test_rloo_hand_values():
    # k-major: [prompt0 c0, prompt1 c0, prompt0 c1, prompt1 c1]
    assert rloo_advantages(torch.tensor([1.0, 4.0, 3.0, 0.0]), 2).tolist() == [-2.0, 4.0, 2.0, -4.0]
    assert rloo_advantages(torch.tensor([1.0, 2.0, 6.0]), 3).tolist() == [-3.0, -1.5, 4.5]


def test_rloo_output_is_detached_float32():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.bfloat16, requires_grad=True)
    out = rloo_advantages(rewards, 2)
    assert out.dtype == torch.float32 and not out.requires_grad
    assert out.tolist() == [-2.0, -2.0, 2.0, 2.0]


def test_grouped_reward_errors():
    with pytest.raises(ValueError, match=r"7 rewards are not divisible by k=2"):
        rloo_advantages(torch.zeros(7), 2)
    with pytest.raises(ValueError, match=r"k=1 must be an int >= 2"):
        rloo_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match=r"10 rewards are not divisible by num_generations=4"):
        grpo_advantages(torch.zeros(10), 4)
    with pytest.raises(ValueError, match=r"rewards has shape \(2, 2\) but must be \[N\]"):
        grpo_advantages(torch.zeros(2, 2), 2)
    with pytest.raises(ValueError, match=r"scale='std' is not one of \('group', 'batch', 'none'\)"):
        grpo_advantages(torch.zeros(4), 2, scale="std")
    with pytest.raises(ValueError, match=r"valid must be a bool tensor shaped like rewards \(4,\)"):
        reinforce_loo_advantages(torch.zeros(4), 2, valid=torch.ones(4))


def test_reinforce_loo_matches_rloo_in_prompt_major_order():
    # prompt-major [p0c0, p0c1, p0c2, p1c0, p1c1, p1c2]
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, 3.0, 3.0])
    assert reinforce_loo_advantages(rewards, 3).tolist() == [-3.0, -1.5, 4.5, -3.0, 1.5, 1.5]
    random_rewards = torch.randn(5 * 4, generator=torch.Generator().manual_seed(0))  # B=5, k=4
    k_major = random_rewards.reshape(5, 4).T.reshape(-1)
    from_rloo = rloo_advantages(k_major, 4).reshape(4, 5).T.reshape(-1)
    torch.testing.assert_close(reinforce_loo_advantages(random_rewards, 4), from_rloo)


def test_reinforce_loo_invalid_completions_stay_out_of_baselines():
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, 3.0, 3.0])
    valid = torch.tensor([True, True, False, True, False, False])
    # prompt 0: valid rewards {1, 2}: baselines 2 and 1; the invalid one gets (1 + 2) / (2 - 1) = 3
    # prompt 1: a single valid completion, so no baseline and every advantage is 0
    assert reinforce_loo_advantages(rewards, 3, valid).tolist() == [-1.0, 1.0, 3.0, 0.0, 0.0, 0.0]


def test_grpo_group_scale_hand_values_and_zero_std_group():
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 0.0, 0.0, 3.0])  # 3 prompts x G=3
    # group 0: mean 2, Bessel std 1; group 1: all equal -> 0; group 2: mean 1, std sqrt(6 / 2)
    s2 = math.sqrt(3.0) + 1e-4
    expected = [-1 / 1.0001, 0.0, 1 / 1.0001, 0.0, 0.0, 0.0, -1 / s2, -1 / s2, 2 / s2]
    assert grpo_advantages(rewards, 3).tolist() == pytest.approx(expected, abs=1e-6)
    assert grpo_advantages(rewards, 3, scale="none").tolist() == [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0, -1.0, 2.0]
    # batch std of the nine rewards: mean 8/3, sum of squared deviations 34, Bessel: sqrt(34 / 8)
    sb = math.sqrt(34.0 / 8.0) + 1e-4
    expected_batch = [v / sb for v in [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0, -1.0, 2.0]]
    assert grpo_advantages(rewards, 3, scale="batch").tolist() == pytest.approx(expected_batch, abs=1e-6)


def test_grpo_all_equal_rewards_give_zero_not_nan():
    for scale in ("group", "batch", "none"):
        assert grpo_advantages(torch.full((8,), 0.7), 4, scale=scale).tolist() == [0.0] * 8


def _gae_reference(rewards, values, mask, gamma, lam):
    """TRL's loop on right-padded rows: padding zeroed, then the plain backwards recursion."""
    rewards = [[r * m for r, m in zip(row, mrow)] for row, mrow in zip(rewards, mask)]
    values = [[v * m for v, m in zip(row, mrow)] for row, mrow in zip(values, mask)]
    advantages = []
    for r_row, v_row, m_row in zip(rewards, values, mask):
        last, row = 0.0, [0.0] * len(r_row)
        for t in reversed(range(len(r_row))):
            next_value = v_row[t + 1] if t + 1 < len(r_row) else 0.0
            delta = r_row[t] + gamma * next_value - v_row[t]
            last = delta + gamma * lam * last
            row[t] = last * m_row[t]
        advantages.append(row)
    return advantages


def test_gae_hand_values():
    rewards = torch.tensor([[0.0, 1.0], [2.0, 9.0]])
    values = torch.tensor([[0.5, 0.2], [0.5, 7.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # row 0: A1 = 1 - 0.2 = 0.8; A0 = (0 + 0.2 - 0.5) + 0.95 * 0.8 = 0.46
    # row 1 ends after token 0, so V_next = 0 there: A0 = 2 - 0.5 = 1.5; token 1 is padding
    _assert_values(advantages, [[0.46, 0.8], [1.5, 0.0]])
    _assert_values(returns, [[0.96, 1.0], [2.0, 0.0]])


def test_gae_against_loop_reference_with_early_ending_rows():
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(4, 7, generator=gen)
    values = torch.randn(4, 7, generator=gen)
    lengths = [7, 3, 1, 5]  # row 1 and row 2 end early
    mask = torch.tensor([[1] * n + [0] * (7 - n) for n in lengths])
    for gamma, lam in [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0), (1.0, 0.0)]:
        advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
        expected = _gae_reference(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam)
        torch.testing.assert_close(advantages, torch.tensor(expected), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(returns, (torch.tensor(expected) + values) * mask, atol=1e-5, rtol=1e-5)
    # lam = 0: one-step TD error; lam = 1, gamma = 1: reward-to-go minus the value
    advantages, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    to_go = (rewards * mask).flip(-1).cumsum(-1).flip(-1)
    torch.testing.assert_close(advantages, (to_go - values) * mask, atol=1e-5, rtol=1e-5)


def test_gae_skips_a_gap_in_the_mask_and_ignores_nan_padding():
    rewards = torch.tensor([[1.0, float("nan"), 2.0, float("nan")]])
    values = torch.tensor([[0.3, float("nan"), 0.6, float("nan")]])
    mask = torch.tensor([[1, 0, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    dense, dense_returns = gae(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.3, 0.6]]), torch.ones(1, 2), 0.9, 0.5)
    # A1 = 2 - 0.6 = 1.4; A0 = (1 + 0.9 * 0.6 - 0.3) + 0.45 * 1.4 = 1.87
    _assert_values(dense, [[1.87, 1.4]])
    _assert_values(advantages, [[1.87, 0.0, 1.4, 0.0]])
    _assert_values(returns[:, [0, 2]], dense_returns.tolist())
    assert not torch.isnan(returns).any()


def test_gae_errors():
    with pytest.raises(ValueError, match=r"values \(2, 4\) and mask \(2, 3\) must all be \[B, T\]"):
        gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"gamma=1.5 and lam=0.95 must both lie in \[0, 1\]"):
        gae(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), gamma=1.5)


def test_whiten_hand_values():
    out = whiten(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    scale = 1 / math.sqrt(5.0 / 3.0 + 1e-8)  # Bessel variance of 1..4 is 5/3
    assert out.tolist() == pytest.approx([-1.5 * scale, -0.5 * scale, 0.5 * scale, 1.5 * scale], abs=1e-6)
    values = torch.tensor([[1.0, 3.0, 100.0], [5.0, float("nan"), 7.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # unmasked 1, 3, 5: mean 3, Bessel variance 4
    _assert_values(whiten(values, mask), [[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    _assert_values(whiten(values, mask, shift_mean=False), [[2.0, 3.0, 0.0], [4.0, 0.0, 0.0]])


def test_whiten_errors():
    with pytest.raises(ValueError, match=r"1 unmasked entries; the variance needs at least 2"):
        whiten(torch.tensor([1.0, 2.0]), torch.tensor([True, False]))
    with pytest.raises(ValueError, match=r"mask \(3,\) must have the shape of values \(2,\)"):
        whiten(torch.tensor([1.0, 2.0]), torch.ones(3))

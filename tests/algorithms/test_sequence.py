"""Per-sequence reductions: summed / averaged log-probs over loss tokens, and the last real token's value."""
import math

import pytest
import torch

from aligner.algorithms import last_token_values, sequence_logps


def test_sum_and_mean_over_loss_tokens_only():
    token_logps = torch.tensor([[-9.0, -1.0, -2.0, -3.0], [-0.5, -0.25, -7.0, -8.0]])
    labels = torch.tensor([[-100, 5, 6, 7], [3, 4, -100, -100]])
    assert sequence_logps(token_logps, labels).tolist() == [-6.0, -0.75]
    assert sequence_logps(token_logps, labels, average=True).tolist() == [-2.0, -0.375]


def test_masked_positions_may_hold_inf_or_nan():
    token_logps = torch.tensor([[-1.0, -math.inf, float("nan")]], requires_grad=True)
    labels = torch.tensor([[2, -100, -100]])
    out = sequence_logps(token_logps, labels, average=True)
    assert out.tolist() == [-1.0]
    out.sum().backward()
    assert token_logps.grad.tolist() == [[1.0, 0.0, 0.0]]


def test_row_without_loss_tokens_is_zero_not_nan():
    out = sequence_logps(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-100, -100]]), average=True)
    assert out.tolist() == [0.0]


def test_custom_ignore_index_and_float32_output():
    token_logps = torch.tensor([[-1.0, -2.0]], dtype=torch.bfloat16)
    out = sequence_logps(token_logps, torch.tensor([[0, 1]]), ignore_index=0)
    assert out.dtype == torch.float32 and out.tolist() == [-2.0]


def test_sequence_logps_shape_error():
    with pytest.raises(ValueError, match=r"token_logps \(2, 3\) and labels \(2, 4\)"):
        sequence_logps(torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.long))


def test_last_token_values_right_and_left_padding():
    values = torch.tensor([[0.1, 0.2, 0.3, 0.4], [1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 1, 1]])
    assert last_token_values(values, mask).tolist() == pytest.approx([0.2, 4.0, 8.0])
    # a ValueHead's [B, T, 1] output is accepted as is, and gradients reach only the picked positions
    head_out = values.unsqueeze(-1).clone().requires_grad_(True)
    last_token_values(head_out, mask).sum().backward()
    assert head_out.grad.squeeze(-1).tolist() == [[0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 1]]


def test_last_token_values_errors():
    with pytest.raises(ValueError, match=r"rows \[1\] of the attention_mask have no real token"):
        last_token_values(torch.zeros(2, 3), torch.tensor([[1, 0, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match=r"values \(2, 3\) and attention_mask \(2, 4\)"):
        last_token_values(torch.zeros(2, 3), torch.ones(2, 4))

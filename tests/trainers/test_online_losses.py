"""The online loop's policy-gradient loss: with ``old_from_forward`` its own detached log-probs stand in for the
old ones (same loss, gradients and metrics as passing them in), and the rollout statistics it then returns."""
import pytest
import torch

from aligner.trainers.online_losses import PolicyGradientLoss, rollout_logprob_sums, scaled_token_logprobs


def rollout_rows(seed: int = 0, vocab: int = 11) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits ``[3, 6, V]`` and a batch of 3 rows whose responses have 3, 1 and 2 tokens."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.full((3, 6), -100)
    labels[0, 2:5], labels[1, 1:2], labels[2, 3:5] = torch.tensor([4, 1, 7]), torch.tensor([9]), torch.tensor([2, 2])
    batch = {"labels": labels, "advantages": torch.randn(3, 1, generator=g).expand(3, 6).contiguous(),
             "engine_logps": torch.randn(3, 6, generator=g).clamp(max=0) * (labels != -100),
             "ref_logps": torch.randn(3, 6, generator=g).clamp(max=0) * (labels != -100)}
    return torch.randn(3, 6, vocab, generator=g), batch


def test_rollout_logprob_sums_are_per_row_statistics_summed_over_rows():
    labels = torch.tensor([[-100, 5, 5], [-100, -100, 5]])
    logps = torch.tensor([[0.0, -1.0, -2.0], [0.0, 0.0, -0.5]])
    batch = {"labels": labels, "engine_logps": torch.tensor([[0.0, -1.5, -2.0], [0.0, 0.0, -0.25]]),
             "ref_logps": torch.tensor([[0.0, -0.5, -1.0], [0.0, 0.0, -1.0]])}
    sums = {k: float(v) for k, v in rollout_logprob_sums(logps, batch).items()}
    assert sums == pytest.approx({
        "rollout_nll_sum": 3.5,  # row sums 3.0 and 0.5
        "rollout_mismatch_sum": 0.25 + 0.25,  # row means |0.5, 0| / 2 and 0.25 / 1
        "rollout_kl_sum": -1.5 + 0.5,  # row sums of log p - log p_ref
        "rollout_negative_kl_sum": 1.0,
    })
    del batch["ref_logps"]  # no reference model: no KL statistics
    assert sorted(rollout_logprob_sums(logps, batch)) == ["rollout_mismatch_sum", "rollout_nll_sum"]


@pytest.mark.parametrize("kw", [
    {"aggregation": "token_mean", "kl_beta": 0.1},
    {"aggregation": "dr_grpo", "normaliser": 4.0},
    {"sequence_level": True},
], ids=["token_mean_kl", "dr_grpo", "sequence_level"])
def test_old_from_forward_equals_passing_the_same_logprobs_in(kw):
    logits, batch = rollout_rows()
    common = dict(temperature=0.7, cliprange=0.2, **kw)
    old = scaled_token_logprobs(logits, batch["labels"], 0.7).detach()
    given = logits.clone().requires_grad_()
    loss_given, metric_given = PolicyGradientLoss(**common)(given, {**batch, "old_logps": old})
    loss_given.backward()
    own = logits.clone().requires_grad_()
    loss_own, metric_own = PolicyGradientLoss(**common, old_from_forward=True)(own, batch)
    loss_own.backward()
    assert float(loss_own) == pytest.approx(float(loss_given), abs=1e-7)
    assert torch.allclose(own.grad, given.grad, atol=1e-7) and own.grad.abs().sum() > 0
    for key, value in metric_given.items():
        assert float(metric_own[key]) == pytest.approx(float(value), abs=1e-7), key
    units = float(PolicyGradientLoss(**common).num_units(batch))
    assert float(metric_own["ratio"]) == units and float(metric_own["clipfrac"]) == 0.0  # ratio exactly 1
    expect = rollout_logprob_sums(old, batch)
    assert {k: float(v) for k, v in metric_own.items() if k.startswith("rollout_")} == {
        k: float(v) for k, v in expect.items()}
    assert float(expect["rollout_nll_sum"]) > 0


def test_old_logps_missing_is_an_error_that_says_what_to_do():
    logits, batch = rollout_rows()
    with pytest.raises(KeyError, match="old_from_forward=True"):
        PolicyGradientLoss(temperature=1.0, cliprange=0.2)(logits, batch)


@pytest.mark.parametrize("kw", [
    {"aggregation": "token_mean", "kl_beta": 0.1},
    {"aggregation": "sequence_mean"},
    {"aggregation": "dr_grpo", "normaliser": 4.0},
    {"sequence_level": True},
], ids=["token_mean_kl", "sequence_mean", "dr_grpo", "sequence_level"])
def test_logits_at_the_labels_give_the_same_loss_metrics_and_gradients(kw):
    """What PolicyModel hands a ``logits_at_labels`` loss (the response positions' logits and the batch cut to
    them) gives what the full ``[b, T, V]`` logits give."""
    from aligner.wrappers.batching import at_positions, label_positions

    logits, batch = rollout_rows(seed=3)
    batch["old_logps"] = scaled_token_logprobs(logits, batch["labels"], 0.7) + 0.05 * (batch["labels"] != -100)
    batch["tokens"] = torch.zeros(3, 6, dtype=torch.long)
    loss = PolicyGradientLoss(temperature=0.7, cliprange=0.2, **kw)
    assert loss.logits_at_labels
    full = logits.clone().requires_grad_(True)
    want_loss, want = loss(full, batch)
    want_loss.backward()
    positions = label_positions(batch["labels"])  # [3, 3]: the rows have 3, 1 and 2 labels
    cut = logits.gather(1, positions[..., None].expand(-1, -1, logits.shape[-1])).clone().requires_grad_(True)
    got_loss, got = loss(cut, {**at_positions(batch, positions), "logit_positions": positions})
    got_loss.backward()
    assert float(got_loss) == pytest.approx(float(want_loss), rel=1e-6)
    # Sums over 3 instead of 6 positions per row: float32 rounding order only.
    assert {k: float(v) for k, v in got.items()} == pytest.approx({k: float(v) for k, v in want.items()}, rel=1e-5)
    grads = torch.zeros_like(logits).scatter_(1, positions[..., None].expand_as(cut), cut.grad)
    torch.testing.assert_close(grads, full.grad, rtol=1e-5, atol=1e-7)  # and none anywhere else
    assert float(full.grad.abs().sum()) > 0


def test_token_logps_put_the_labels_log_probs_back_in_row_layout():
    from aligner.trainers.online_losses import TokenLogps
    from aligner.wrappers.batching import at_positions, label_positions

    logits, batch = rollout_rows(seed=4)
    batch["tokens"] = torch.zeros(3, 6, dtype=torch.long)
    fn = TokenLogps(0.7, width=6)
    want = scaled_token_logprobs(logits, batch["labels"], 0.7)
    assert torch.equal(fn(logits, batch), want)  # full logits (TP, PP): as they are
    positions = label_positions(batch["labels"])
    cut = logits.gather(1, positions[..., None].expand(-1, -1, logits.shape[-1]))
    got = fn(cut, {**at_positions(batch, positions), "logit_positions": positions})
    assert got.shape == (3, 6) and torch.equal(got, want)
    assert int((got != 0).sum()) == 6 and bool((got[batch["labels"] == -100] == 0).all())


def test_sequence_level_loss_on_grouped_rows_equals_one_row_per_sample():
    """RLOO / REINFORCE on rows of several samples (group_rows): per-sample sums of the log-probs give the
    loss, metrics, units and gradients of one row per sample."""
    from aligner.trainers.online_batch import group_rows, to_group_layout

    # Two prompts ([5, 6, 7] and [8, 9]) with two samples each, right-padded with 0.
    tokens = torch.tensor([[5, 6, 7, 10, 11, 0], [5, 6, 7, 12, 0, 0], [8, 9, 13, 14, 15, 0], [8, 9, 16, 0, 0, 0]])
    attention_mask = (torch.arange(6) < torch.tensor([5, 4, 5, 3])[:, None]).long()
    labels = torch.full((4, 6), -100)
    labels[0, 2:4], labels[1, 2], labels[2, 1:4], labels[3, 1] = torch.tensor([10, 11]), 12, torch.tensor([13, 14, 15]), 16
    mask = labels != -100
    g = torch.Generator().manual_seed(5)
    batch = {"tokens": tokens, "attention_mask": attention_mask, "labels": labels,
             "advantages": torch.randn(4, 1, generator=g).expand(4, 6).contiguous(),
             "engine_logps": torch.randn(4, 6, generator=g).clamp(max=0) * mask}
    logits = torch.randn(4, 6, 17, generator=g)
    batch["old_logps"] = scaled_token_logprobs(logits, labels, 0.7) + 0.3 * torch.randn(4, 6, generator=g) * mask
    grouped = group_rows(batch, [3, 3, 2, 2], k=2, pad_id=0)
    grouped.update({key: to_group_layout(batch[key], batch, grouped) for key in ("advantages", "old_logps")})
    gmask = grouped["labels"] != -100
    g_logits = torch.zeros(*grouped["labels"].shape, 17)
    g_logits[gmask] = logits[mask]  # each label sees the logits its own row gives (as the model's branches do)
    for old_from_forward in (False, True):
        loss = PolicyGradientLoss(temperature=0.7, cliprange=0.2, sequence_level=True,
                                  old_from_forward=old_from_forward, examples_per_row=2)
        rows, packed = logits.clone().requires_grad_(), g_logits.clone().requires_grad_()
        want_loss, want = loss(rows, batch)
        got_loss, got = loss(packed, {**grouped, "engine_logps": to_group_layout(batch["engine_logps"], batch, grouped)})
        want_loss.backward()
        got_loss.backward()
        assert float(loss.num_units(grouped)) == float(loss.num_units(batch)) == 4.0
        assert float(got_loss) == pytest.approx(float(want_loss), rel=1e-6) and float(want_loss) != 0.0
        assert {k: float(v) for k, v in got.items()} == pytest.approx({k: float(v) for k, v in want.items()}, rel=1e-5)
        torch.testing.assert_close(packed.grad[gmask], rows.grad[mask], rtol=1e-5, atol=1e-7)
        assert float(rows.grad.abs().sum()) > 0
        if not old_from_forward:
            assert abs(float(want["ratio"]) - 4.0) > 0.1  # old log-probs given: the ratios are not all 1

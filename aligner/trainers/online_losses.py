"""The loss the online loop hands to the model: a clipped policy-gradient loss on rollout rows.

The batch (:mod:`aligner.trainers.online_batch`) carries, aligned with ``labels``: ``old_logps`` (the
policy's log-probs at rollout time, from a no-grad forward), ``advantages`` (per token, or per sequence
broadcast), ``engine_logps`` and, when there is a reference model, ``ref_logps``. Log-probs are taken under
``softmax(logits / temperature)``, the distribution the engine sampled from, so the first epoch's ratio is 1.
With one optimizer step per rollout the loss is built with ``old_from_forward``: the training forward runs on
the weights that sampled the rollout, so its own log-probs, detached, are the old ones and the batch needs no
``old_logps`` (the loop skips that forward, as TRL does).

Metrics are sums over the loss's units; the loop averages them over the step's optimizer steps and names
them as the RLOO reference page does (``policy/approxkl_avg``, ``policy/clipfrac_avg``, ``val/ratio`` ...).
With ``old_from_forward`` the loss also returns :func:`rollout_logprob_sums` of its log-probs, the rollout
statistics the loop would otherwise compute from ``old_logps``.
"""
from __future__ import annotations

import torch

from aligner.algorithms import aggregate_sum, aggregate_units, kl_k3, ppo_policy_loss, value_loss
from aligner.parallel import token_logprobs, token_logprobs_with_entropy


def _at_temperature(logits: torch.Tensor, labels: torch.Tensor, temperature: float):
    """(``logits / temperature``, labels with -100 replaced by a valid id, where the labels are)."""
    keep = labels != -100
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    return logits, torch.where(keep, labels, torch.zeros_like(labels)), keep


def scaled_token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log softmax(logits / temperature)`` of each label, ``[N, T]``; 0 where there is no label."""
    logits, labels, keep = _at_temperature(logits, labels, temperature)
    return torch.where(keep, token_logprobs(logits, labels), 0.0)


def scaled_logprobs_and_entropy(logits: torch.Tensor, labels: torch.Tensor,
                                temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`scaled_token_logprobs` and the (detached) entropy of ``softmax(logits / temperature)`` at every
    position, ``[N, T]`` each, from one pass over the logits."""
    logits, labels, keep = _at_temperature(logits, labels, temperature)
    logp, entropy = token_logprobs_with_entropy(logits, labels)
    return torch.where(keep, logp, 0.0), entropy


class TokenLogps:
    """A no-grad ``fn`` for ``PolicyModel.forward``: each label's log-prob at ``temperature``, ``[b, width]``
    (0 where there is no label). It reads logits at the labels only (``logits_at_labels``) and puts them back
    at their ``logit_positions``, so the prompt's LM head and log-softmax are skipped."""

    logits_at_labels = True

    def __init__(self, temperature: float, width: int, examples_per_row: int = 1):
        self.temperature, self.width, self.examples_per_row = temperature, width, examples_per_row

    def __call__(self, logits: torch.Tensor, mb: dict[str, torch.Tensor]) -> torch.Tensor:
        logp = scaled_token_logprobs(logits, mb["labels"], self.temperature)
        positions = mb.get("logit_positions")
        if positions is None:  # full logits (tensor or pipeline parallel): already [b, T]
            return logp
        # Positions are distinct within a row; the fill-up ones carry label -100, so a log-prob of 0.
        return logp.new_zeros(logp.shape[0], self.width).scatter_(1, positions, logp)


def rollout_logprob_sums(logps: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Statistics of the policy's log-probs of the rollout tokens, ``logps [N, T]`` (aligned with ``labels``),
    each a sum over the rows (float64, so the loop's per-row means do not depend on how rows were split):

    - ``rollout_nll_sum``: each row's summed ``-log p`` (``objective/entropy``, the sampled-token estimate);
    - ``rollout_mismatch_sum``: each row's mean ``|log p - engine log p|`` (``rollout/logprob_mismatch``);
    - with ``ref_logps`` in the batch, ``rollout_kl_sum``: each row's summed ``log p - log p_ref`` (k1,
      ``objective/kl``) and ``rollout_negative_kl_sum``: rows where that is negative.
    """
    mask = batch["labels"] != -100
    logps = logps.detach().double() * mask
    sequences = Sequences(batch, mask)
    lengths = sequences.sums(mask.double()).clamp(min=1)
    engine = batch["engine_logps"].to(logps) * mask
    sums = {"rollout_nll_sum": -logps.sum(),
            "rollout_mismatch_sum": (sequences.sums((logps - engine).abs()) / lengths).sum()}
    if "ref_logps" in batch:
        kl = sequences.sums(logps - batch["ref_logps"].to(logps) * mask)  # [N]
        sums["rollout_kl_sum"], sums["rollout_negative_kl_sum"] = kl.sum(), (kl < 0).sum().double()
    return sums


class Sequences:
    """The sampled sequences of a ``[b, T]`` batch: one per row, or, for rows that hold several samples
    (``sequence_ids``, see ``aligner.trainers.online_batch.group_rows``), each sample's labels. ``count`` of them,
    in row order (grouped: by ``sequence_ids``)."""

    def __init__(self, batch: dict[str, torch.Tensor], mask: torch.Tensor):
        self.mask, self.which = mask, None
        if "sequence_ids" in batch:
            _, self.which = torch.unique(batch["sequence_ids"][mask], return_inverse=True)
            self.count = int(self.which.max()) + 1 if self.which.numel() else 0
        else:
            self.count = mask.shape[0]

    def sums(self, values: torch.Tensor) -> torch.Tensor:
        """``[count]``: each sequence's sum of ``values [b, T]`` (already 0 off its labels in the one-per-row
        case; only its labels are read otherwise). Differentiable."""
        if self.which is None:
            return values.sum(-1)
        return values.new_zeros(self.count).index_add_(0, self.which, values[self.mask])

    def value(self, values: torch.Tensor) -> torch.Tensor:
        """``[count]``: a per-sequence quantity broadcast over its tokens (the advantage), read back: column 0
        of a ``[b, T]`` row, or the value at a grouped sequence's labels (``[b]`` tensors are per row already)."""
        if self.which is None:
            return values[:, 0] if values.dim() == 2 else values
        return values.new_zeros(self.count).scatter_reduce_(0, self.which, values[self.mask], reduce="amax",
                                                            include_self=False)


class PolicyGradientLoss:
    """PPO's clipped objective at token level (GRPO, PPO) or sequence level (RLOO, REINFORCE).

    ``sequence_level``: the ratio is that of whole responses (summed log-probs), as the RLOO page does, and
    the loss averages over sequences. Otherwise ``aggregation`` (``token_mean`` | ``sequence_mean`` |
    ``dr_grpo``) says how per-token losses are averaged; ``normaliser`` is dr_grpo's constant.
    ``old_from_forward``: the old log-probs are this forward's own, detached (the ratio is exactly 1; valid
    only when the weights have not changed since the rollout), and the metrics include
    :func:`rollout_logprob_sums`.
    """

    logits_at_labels = True  # every term is masked by the labels: the LM head runs on the response tokens only

    def __init__(self, *, temperature: float, cliprange: float, cliprange_high: float | None = None,
                 sequence_level: bool = False, aggregation: str = "token_mean", normaliser: float | None = None,
                 kl_beta: float = 0.0, old_from_forward: bool = False, examples_per_row: int = 1):
        self.temperature, self.cliprange, self.cliprange_high = temperature, cliprange, cliprange_high
        self.examples_per_row = examples_per_row  # > 1: rows of grouped samples (online_batch.group_rows)
        self.sequence_level, self.aggregation, self.normaliser = sequence_level, aggregation, normaliser
        self.kl_beta, self.old_from_forward = kl_beta, old_from_forward

    def _mode(self) -> str:
        return "sequence_mean" if self.sequence_level else self.aggregation

    def num_units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["labels"] != -100
        if self.sequence_level:
            return torch.tensor(float(Sequences(batch, mask).count))
        return aggregate_units(mask, self._mode())

    def __call__(self, logits, batch: dict[str, torch.Tensor]):
        labels = batch["labels"]
        mask = labels != -100
        logp, entropy = scaled_logprobs_and_entropy(logits, labels, self.temperature)  # [b, T] each
        if self.old_from_forward:
            old = logp.detach()
            rollout = rollout_logprob_sums(logp, batch)
        elif "old_logps" in batch:
            old, rollout = batch["old_logps"].to(logp), {}
        else:
            raise KeyError("PolicyGradientLoss: the batch has no 'old_logps'; add the rollout policy's log-probs, "
                           "or build the loss with old_from_forward=True when the weights have not changed since "
                           "the rollout")
        if self.sequence_level:  # one unit per sampled sequence, whether rows hold one or several
            sequences = Sequences(batch, mask)
            seq_logp, seq_old = sequences.sums(logp * mask)[:, None], sequences.sums(old * mask)[:, None]
            adv = sequences.value(batch["advantages"].to(logp))[:, None]
            seq_mask = torch.ones_like(seq_logp, dtype=torch.bool)
            per, stats = ppo_policy_loss(seq_logp, seq_old, adv, seq_mask, cliprange=self.cliprange,
                                         cliprange_high=self.cliprange_high)
            loss_sum = per.sum()
            ratio, clipfrac, approxkl = stats["ratio"].sum(-1), stats["clipfrac"].sum(-1), stats["approxkl"].sum(-1)
            n_tokens = sequences.sums(mask.to(logp.dtype)).clamp(min=1)
            ent = sequences.sums(entropy * mask) / n_tokens
            metric = {"ratio": ratio.sum(), "ratio_sq": (ratio ** 2).sum(), "clipfrac": clipfrac.sum(),
                      "approxkl": approxkl.sum(), "entropy": ent.sum(), "policy_loss": per.detach().sum(), **rollout}
            return loss_sum, metric
        per, stats = ppo_policy_loss(logp, old, batch["advantages"].to(logp), mask, cliprange=self.cliprange,
                                     cliprange_high=self.cliprange_high)
        metric = {}
        if self.kl_beta > 0:
            kl = kl_k3(logp, batch["ref_logps"].to(logp)) * mask
            metric["kl"] = aggregate_sum(kl.detach(), mask, "sequence_mean" if self._mode() == "dr_grpo" else self._mode())
            per = per + self.kl_beta * kl
        loss_sum = aggregate_sum(per, mask, self._mode(), self.normaliser)
        # Metrics share the loss's units; under dr_grpo (units: rows) they are per-row means averaged over rows.
        metric_mode = "sequence_mean" if self._mode() == "dr_grpo" else self._mode()
        agg = lambda t: aggregate_sum(t.detach().float() * mask, mask, metric_mode)  # noqa: E731
        metric.update({"ratio": agg(stats["ratio"]), "ratio_sq": agg(stats["ratio"] ** 2),
                       "clipfrac": agg(stats["clipfrac"]), "approxkl": agg(stats["approxkl"]),
                       "entropy": agg(entropy), "policy_loss": loss_sum.detach(), **rollout})
        return loss_sum, metric


class ValueLoss:
    """PPO's clipped value loss on the critic's per-position values (``[b, T, 1]`` from a value head), token
    mean over the response tokens, scaled by ``vf_coef``. The batch holds ``old_values`` and ``returns``."""

    def __init__(self, *, cliprange_value: float, vf_coef: float):
        self.cliprange_value, self.vf_coef = cliprange_value, vf_coef

    def num_units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (batch["labels"] != -100).sum()

    def __call__(self, values, batch: dict[str, torch.Tensor]):
        values = values.full_tensor() if hasattr(values, "full_tensor") else values
        v = values[..., 0].float()  # [b, T]
        mask = batch["labels"] != -100
        per, stats = value_loss(v, batch["old_values"].to(v), batch["returns"].to(v), mask,
                                cliprange_value=self.cliprange_value)
        loss_sum = (per * mask).sum()
        return self.vf_coef * loss_sum, {"value_loss": loss_sum.detach(), "vf_clipfrac": (stats["clipfrac"] * mask).sum()}

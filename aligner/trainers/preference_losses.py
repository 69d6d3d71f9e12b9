"""The loss functions the preference trainer hands to the model: logits in, per-pair (or per-completion)
losses and TRL-named metrics out. The math lives in :mod:`aligner.algorithms`; this file only turns logits
into the per-sequence log-probs those functions take, and sums over the micro-batch.

Pair batches (from :mod:`aligner.data.preference_dataset`) come in one of two layouts. Shared prompt
(``data.shared_prompt``, the default for DPO, CPO, ORPO, SimPO): one row per pair, ``[prompt | chosen |
rejected]`` with ``branch_ids`` telling the responses apart. Interleaved (the reward model, self-rewarding,
``data.shared_prompt=false``): row ``2i`` is the chosen response of pair ``i``, row ``2i+1`` the rejected one,
and ``rows_per_example = 2`` keeps a pair inside one micro-batch. A validation filler pair (every dp rank must
run the same number of forwards) has no loss token at all and is left out of every sum and count.

The losses read logits only where there are labels (``logits_at_labels``): the model may hand them the
logits of those positions only, with every per-token tensor of the batch cut the same way
(:class:`aligner.interface.LossFn`).
"""
from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor

from aligner.algorithms import (
    bradley_terry_loss,
    cpo_loss,
    dpo_loss,
    kto_loss,
    last_token_values,
    orpo_loss,
    sequence_logps,
    simpo_loss,
)
from aligner.parallel import token_logprobs

REFERENCE_FREE = ("cpo", "orpo", "simpo")
NEEDS_REFERENCE = ("dpo", "kto")


def response_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each row's response tokens and how many there are: ``[N, T, V] -> ([N], [N])``.

    ``logits`` may be vocab-sharded (tensor parallelism); the full logits are never gathered.
    """
    keep = labels != -100
    token_lp = token_logprobs(logits, torch.where(keep, labels, torch.zeros_like(labels)))  # [N, T]
    return sequence_logps(token_lp, labels), keep.sum(-1)


def pair_logps(logits, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(chosen, rejected, n_chosen, n_rejected)``, each ``[b]`` for ``b`` pairs: summed response log-probs
    and response token counts, from either pair layout (see the module doc)."""
    labels = batch["labels"]
    if "branch_ids" not in batch:  # interleaved rows
        logps, n_tokens = response_logps(logits, labels)  # [2b]
        return logps[0::2], logps[1::2], n_tokens[0::2], n_tokens[1::2]
    keep = labels != -100
    token_lp = token_logprobs(logits, torch.where(keep, labels, torch.zeros_like(labels)))  # [b, T]
    out = []
    for branch in (1, 2):
        branch_labels = torch.where(batch["branch_ids"] == branch, labels, torch.full_like(labels, -100))
        out.append((sequence_logps(token_lp, branch_labels), (branch_labels != -100).sum(-1)))
    (chosen, n_chosen), (rejected, n_rejected) = out
    return chosen, rejected, n_chosen, n_rejected


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


class PairLoss:
    """DPO (sigmoid / IPO / hinge, RPO's NLL), CPO, SimPO and ORPO on chosen/rejected pairs.

    The loss of a pair is ``preference_loss + alpha * sft_loss`` where ``sft_loss`` is the chosen response's
    mean per-token NLL (the RPO paper's length-normalised NLL; ``alpha`` is ``dpo.rpo_alpha``,
    ``cpo.cpo_alpha``, ``simpo.cpo_alpha``, and 1 for ORPO). DPO reads the reference's summed log-probs from
    ``batch["ref_logps"]``: ``[b, 2]`` (chosen, rejected) with ``shared_prompt``, else ``[2b]`` per row.
    """

    logits_at_labels = True

    def __init__(self, algorithm: str, cfg: Any, shared_prompt: bool = False):
        if algorithm not in ("dpo", *REFERENCE_FREE):
            raise ValueError(f"PairLoss has no algorithm '{algorithm}'; use dpo, cpo, simpo or orpo")
        self.algorithm, self.cfg = algorithm, cfg
        self.alpha = {"dpo": getattr(cfg, "rpo_alpha", 0.0), "cpo": getattr(cfg, "cpo_alpha", 0.0),
                      "simpo": getattr(cfg, "cpo_alpha", 0.0), "orpo": 1.0}[algorithm]
        self.shared_prompt = shared_prompt
        self.rows_per_example = 1 if shared_prompt else 2

    def _chosen_labels(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.shared_prompt != ("branch_ids" in batch):
            raise ValueError(f"PairLoss(shared_prompt={self.shared_prompt}) got a batch "
                             f"{'with' if 'branch_ids' in batch else 'without'} branch_ids; build the batch with "
                             f"PreferenceData.{'shared_prompt_batch' if self.shared_prompt else 'batch'}")
        return batch["labels"] if self.shared_prompt else batch["labels"][0::2]

    def num_units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (self._chosen_labels(batch) != -100).any(-1).sum()

    def __call__(self, logits, batch: dict[str, torch.Tensor]):
        valid = (self._chosen_labels(batch) != -100).any(-1).float()  # [b]; 0 for validation fillers
        chosen, rejected, n_chosen, n_rejected = pair_logps(logits, batch)
        n_chosen, n_rejected = n_chosen.clamp(min=1), n_rejected.clamp(min=1)
        chosen_avg, rejected_avg = chosen / n_chosen, rejected / n_rejected
        c = self.cfg
        extra: dict[str, torch.Tensor] = {}
        if self.algorithm == "dpo":
            ref = batch["ref_logps"].to(chosen)
            ref_c, ref_r = (ref[:, 0], ref[:, 1]) if self.shared_prompt else (ref[0::2], ref[1::2])
            if c.loss_type == "ipo":  # IPO's target is set on length-averaged log-probs
                pc, pr, rc, rr = chosen_avg, rejected_avg, ref_c / n_chosen, ref_r / n_rejected
            else:
                pc, pr, rc, rr = chosen, rejected, ref_c, ref_r
            losses, chosen_rewards, rejected_rewards = dpo_loss(
                pc, pr, rc, rr, beta=c.beta, loss_type=c.loss_type, label_smoothing=c.label_smoothing)
            shown_c, shown_r = chosen, rejected
        elif self.algorithm == "cpo":
            # IPO's target is set on length-averaged log-probs, as in DPO.
            pc, pr = (chosen_avg, rejected_avg) if c.loss_type == "ipo" else (chosen, rejected)
            losses = cpo_loss(pc, pr, beta=c.beta, label_smoothing=c.label_smoothing, loss_type=c.loss_type)
            chosen_rewards, rejected_rewards = c.beta * pc.detach(), c.beta * pr.detach()
            shown_c, shown_r = pc, pr
        elif self.algorithm == "simpo":
            losses = simpo_loss(chosen_avg, rejected_avg, beta=c.beta, gamma=c.gamma, label_smoothing=c.label_smoothing)
            chosen_rewards, rejected_rewards = c.beta * chosen_avg.detach(), c.beta * rejected_avg.detach()
            shown_c, shown_r = chosen_avg, rejected_avg
        else:  # orpo
            losses, log_odds = orpo_loss(chosen_avg, rejected_avg, beta=c.beta)
            chosen_rewards, rejected_rewards = c.beta * chosen_avg.detach(), c.beta * rejected_avg.detach()
            shown_c, shown_r = chosen_avg, rejected_avg
            extra["log_odds_ratio"] = (log_odds.detach() * valid).sum()
        sft = -chosen_avg  # mean NLL per chosen token
        total = losses + self.alpha * sft if self.alpha else losses
        metrics = {
            "preference_loss": (losses.detach() * valid).sum(),
            "sft_loss": (sft.detach() * valid).sum(),
            "rewards/chosen": (chosen_rewards * valid).sum(),
            "rewards/rejected": (rejected_rewards * valid).sum(),
            "rewards/accuracies": ((chosen_rewards > rejected_rewards).float() * valid).sum(),
            "rewards/margins": ((chosen_rewards - rejected_rewards) * valid).sum(),
            "logps/chosen": (shown_c.detach() * valid).sum(),
            "logps/rejected": (shown_r.detach() * valid).sum(),
            **extra,
        }
        return (total * valid).sum(), metrics


class RewardLoss:
    """Bradley-Terry on the value head's output at each row's last real token (interleaved pairs).

    ``batch["margin"] [N]`` (the records' margin column, 0 when absent) is subtracted when ``use_margin``.
    """

    rows_per_example = 2

    def __init__(self, use_margin: bool = True):
        self.use_margin = use_margin

    def num_units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (batch["labels"][0::2] != -100).any(-1).sum()

    def __call__(self, values, batch: dict[str, torch.Tensor]):
        values = _full(values).squeeze(-1).float()  # [2b, T]
        rewards = last_token_values(values, batch["attention_mask"])  # [2b]
        valid = (batch["labels"][0::2] != -100).any(-1).float()
        chosen, rejected = rewards[0::2], rewards[1::2]
        margin = batch["margin"][0::2].to(chosen) if self.use_margin and "margin" in batch else None
        losses = bradley_terry_loss(chosen, rejected, margin)
        c, r = chosen.detach(), rejected.detach()
        metrics = {
            "accuracy": ((c > r).float() * valid).sum(),
            "rewards/chosen": (c * valid).sum(),
            "rewards/rejected": (r * valid).sum(),
            "rewards/margins": ((c - r) * valid).sum(),
        }
        return (losses * valid).sum(), metrics


class KTOLoss:
    """KTO on single completions with a desirable flag; the reference point ``batch["kl"]`` (0-d, detached,
    already averaged over the global batch and clamped at 0) comes from the trainer.

    Metrics are sums over the micro-batch that the trainer turns into TRL's means: ``rewards/chosen_sum``
    and ``count/chosen`` (and the rejected ones) so that ``rewards/chosen`` averages desirable rows only.
    """

    rows_per_example = 1
    logits_at_labels = True

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def num_units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (batch["labels"] != -100).any(-1).sum()

    def __call__(self, logits, batch: dict[str, torch.Tensor]):
        logps, _ = response_logps(logits, batch["labels"])
        valid = (batch["labels"] != -100).any(-1).float()
        desirable = batch["desirable"].bool()
        kl = batch["kl"].to(logps).reshape(())
        losses, rewards = kto_loss(logps, batch["ref_logps"].to(logps), desirable, kl, beta=self.cfg.beta,
                                   desirable_weight=self.cfg.desirable_weight,
                                   undesirable_weight=self.cfg.undesirable_weight)
        d, u = desirable.float() * valid, (~desirable).float() * valid
        metrics = {
            "kl": kl.detach() * valid.sum(),
            "rewards/chosen_sum": (rewards * d).sum(),
            "rewards/rejected_sum": (rewards * u).sum(),
            "logps/chosen_sum": (logps.detach() * d).sum(),
            "logps/rejected_sum": (logps.detach() * u).sum(),
            "count/chosen": d.sum(),
            "count/rejected": u.sum(),
        }
        return (losses * valid).sum(), metrics


def finish_kto_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Turn :class:`KTOLoss`'s per-unit sums into means over desirable (``chosen``) and undesirable
    (``rejected``) rows, as TRL logs them; the ``count/`` shares are dropped."""
    out = {k: v for k, v in metrics.items() if not k.startswith("count/") and not k.endswith("_sum")}
    for side in ("chosen", "rejected"):
        share = metrics.get(f"count/{side}", 0.0)
        for name in ("rewards", "logps"):
            key = f"{name}/{side}_sum"
            if key in metrics:
                out[f"{name}/{side}"] = metrics[key] / share if share > 0 else float("nan")
    if "rewards/chosen" in out and "rewards/rejected" in out:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out

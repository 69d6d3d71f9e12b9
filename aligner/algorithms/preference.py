"""Pairwise preference losses on per-sequence log-probs: DPO (sigmoid, IPO, hinge), CPO, SimPO, ORPO.

Every loss takes ``[B]`` log-probs of the chosen and rejected responses (summed or length-averaged
over the response tokens, see each docstring; ``aligner.algorithms.sequence_logps`` makes them) and
returns per-pair losses ``[B]`` in float32, not reduced: the trainer decides how to average them
across micro-batches and ranks. Rewards are detached, for logging only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

PAIR_LOSS_TYPES = ("sigmoid", "ipo", "hinge")

# A length-averaged log-prob of exactly 0 (every token certain to float32 precision) makes ORPO's odds
# infinite and its gradient NaN; reading it as -1e-7 keeps both finite and moves the loss by ~1e-7.
_ORPO_MAX_LOGP = -1e-7


def check_per_sequence(where: str, **tensors: torch.Tensor) -> None:
    """Raise ValueError unless every tensor is a floating ``[B]`` vector with the same B.

    ``where`` names the caller in the message; the keyword names are the argument names.
    """
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    for name, t in tensors.items():
        if t.dim() != 1:
            raise ValueError(
                f"{where}: {name} has shape {shapes[name]} but must be [B], one value per sequence; "
                f"reduce per-token log-probs with aligner.algorithms.sequence_logps first"
            )
        if not t.is_floating_point():
            raise ValueError(f"{where}: {name} has dtype {t.dtype}; pass floating-point log-probs")
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"{where}: the per-sequence inputs must have the same shape, got {listed}")


def check_beta(where: str, beta: float) -> None:
    """Raise ValueError unless ``beta`` is positive (it scales the reward and divides IPO's target)."""
    if not beta > 0:
        raise ValueError(f"{where}: beta={beta} must be > 0 (it is the inverse temperature of the implicit reward)")


def _check_label_smoothing(where: str, label_smoothing: float, loss_type: str) -> None:
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(
            f"{where}: label_smoothing={label_smoothing} must be in [0, 0.5]; it is the assumed probability "
            f"that a pair's preference label is flipped, and above 0.5 the loss prefers the rejected response"
        )
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(
            f"{where}: label_smoothing={label_smoothing} only applies to loss_type='sigmoid', not "
            f"'{loss_type}'; set label_smoothing to 0 or use the sigmoid loss"
        )


def smoothed_sigmoid_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """``-logsigmoid(z) * (1 - eps) - logsigmoid(-z) * eps``: the conservative loss of a pair with margin ``z``.

    With ``eps`` the probability that the label is flipped (Mitchell's conservative DPO); ``eps = 0``
    is the plain Bradley–Terry negative log-likelihood. ``[B] -> [B]``.
    """
    losses = -F.logsigmoid(logits)
    if label_smoothing:
        losses = losses * (1.0 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing
    return losses


def _pair_losses(
    where: str, margins: torch.Tensor, beta: float, loss_type: str, label_smoothing: float
) -> torch.Tensor:
    """The loss of each pair given its log-ratio margin ``h [B]`` (the shared core of DPO and CPO)."""
    if loss_type not in PAIR_LOSS_TYPES:
        raise ValueError(f"{where}: unknown loss_type '{loss_type}'; valid: {', '.join(PAIR_LOSS_TYPES)}")
    check_beta(where, beta)
    _check_label_smoothing(where, label_smoothing, loss_type)
    if loss_type == "sigmoid":
        return smoothed_sigmoid_loss(beta * margins, label_smoothing)
    if loss_type == "ipo":
        # IPO regresses the margin onto 1/(2 beta) instead of pushing it to infinity
        return (margins - 1.0 / (2.0 * beta)) ** 2
    return torch.relu(1.0 - beta * margins)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO loss per pair: ``[B] x 4 -> (losses, chosen_rewards, rejected_rewards)``, each ``[B]``.

    With ``h = (pi_c - ref_c) - (pi_r - ref_r)`` (log-ratio of chosen minus that of rejected):

    - ``sigmoid``: ``-logsigmoid(beta h) (1 - eps) - logsigmoid(-beta h) eps``, ``eps = label_smoothing``
      (conservative DPO; eps = 0 is the DPO paper's loss). Pass summed log-probs.
    - ``ipo``: ``(h - 1 / (2 beta))^2``. Pass length-averaged log-probs, as the IPO paper does.
    - ``hinge``: ``relu(1 - beta h)`` (SLiC). Pass summed log-probs.

    ``label_smoothing`` must be 0 for ipo and hinge. Rewards are ``beta * (policy - ref)``, detached.
    All outputs are float32. At initialisation (policy == reference) the sigmoid loss is ``log 2``.
    """
    check_per_sequence(
        "dpo_loss", policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
    )
    # the reference is a constant even when the caller computed it with grad enabled
    chosen_logratios = policy_chosen_logps.float() - ref_chosen_logps.detach().float()  # [B]
    rejected_logratios = policy_rejected_logps.float() - ref_rejected_logps.detach().float()  # [B]
    losses = _pair_losses("dpo_loss", chosen_logratios - rejected_logratios, beta, loss_type, label_smoothing)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def cpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> torch.Tensor:
    """Contrastive Preference Optimization's preference term per pair: ``[B] x 2 -> losses [B]``.

    DPO without a reference model, ``h = chosen - rejected``: ``sigmoid`` gives
    ``-logsigmoid(beta h) (1 - eps) - logsigmoid(-beta h) eps``; ``hinge`` ``relu(1 - beta h)``;
    ``ipo`` ``(h - 1 / (2 beta))^2`` (pass length-averaged log-probs for ipo, summed otherwise).
    The trainer adds ``cpo_alpha`` times the NLL of the chosen response. Float32 output.
    """
    check_per_sequence("cpo_loss", chosen_logps=chosen_logps, rejected_logps=rejected_logps)
    margins = chosen_logps.float() - rejected_logps.float()  # [B]
    return _pair_losses("cpo_loss", margins, beta, loss_type, label_smoothing)


def simpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 1.0,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Simple Preference Optimization loss per pair: ``[B] x 2 -> losses [B]``, reference-free.

    ``z = beta * (chosen - rejected) - gamma``; loss ``-logsigmoid(z) (1 - eps) - logsigmoid(-z) eps``.
    Pass length-averaged log-probs (SimPO's reward is ``beta / |y| * log pi(y|x)``). ``gamma`` is the
    reward margin itself, as in the SimPO paper's equation and TRL's ``simpo_gamma``; the SimPO
    reference code's ``gamma_beta_ratio`` is ``gamma / beta``. Float32 output.
    """
    check_per_sequence("simpo_loss", chosen_logps=chosen_logps, rejected_logps=rejected_logps)
    check_beta("simpo_loss", beta)
    _check_label_smoothing("simpo_loss", label_smoothing, "sigmoid")
    logits = beta * (chosen_logps.float() - rejected_logps.float()) - gamma  # [B]
    return smoothed_sigmoid_loss(logits, label_smoothing)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate over the whole range and with finite gradients.

    Uses ``log(-expm1(x))`` near 0 and ``log1p(-exp(x))`` below ``-log 2`` (Mächler's split); each
    branch only ever sees inputs on its own side, so the unused branch cannot put NaN in the gradient.
    """
    split = -0.6931471805599453  # -log 2
    near_zero = x > split
    x_near = torch.where(near_zero, x, torch.full_like(x, split))
    x_far = torch.where(near_zero, torch.full_like(x, split), x)
    return torch.where(near_zero, torch.log(-torch.expm1(x_near)), torch.log1p(-torch.exp(x_far)))


def orpo_loss(
    chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, *, beta: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Odds-Ratio Preference Optimization's odds-ratio term: ``[B] x 2 -> (losses [B], log_odds [B])``.

    With length-averaged log-probs ``c, r`` and ``odds(p) = p / (1 - p)``:
    ``log_odds = log odds(e^c) - log odds(e^r) = (c - r) - (log(1 - e^c) - log(1 - e^r))`` and
    ``losses = -beta * logsigmoid(log_odds)``; ``beta`` is ORPO's lambda. The trainer adds the NLL of
    the chosen response (weight 1). ``log_odds`` is detached, for logging. Log-probs above -1e-7 are
    read as -1e-7 so a response the model is certain of cannot make the odds infinite. Float32 output.
    """
    check_per_sequence("orpo_loss", chosen_logps=chosen_logps, rejected_logps=rejected_logps)
    check_beta("orpo_loss", beta)
    chosen = chosen_logps.float().clamp(max=_ORPO_MAX_LOGP)  # [B]
    rejected = rejected_logps.float().clamp(max=_ORPO_MAX_LOGP)  # [B]
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))  # [B]
    return -beta * F.logsigmoid(log_odds), log_odds.detach()

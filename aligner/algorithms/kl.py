"""Per-token estimators of KL(policy || reference) from the log-probs of sampled tokens (Schulman's k1, k2, k3).

The tokens were sampled from the policy, so with ``log r = ref_logp - logp`` each estimator's mean over
samples estimates KL(pi || pi_ref):

- k1 = ``logp - ref_logp``: unbiased, high variance, negative on many tokens (PPO's per-token penalty);
- k2 = ``0.5 * (logp - ref_logp)^2``: biased, low variance, never negative;
- k3 = ``exp(log r) - log r - 1``: unbiased, low variance, never negative (GRPO's KL term).
"""
from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def _log_ratio(where: str, logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """``logp - ref_logp`` in float32 after checking that the shapes agree; ``ref_logp`` is detached."""
    if tuple(logp.shape) != tuple(ref_logp.shape):
        raise ValueError(
            f"{where}: logp {tuple(logp.shape)} and ref_logp {tuple(ref_logp.shape)} must have the same shape, "
            f"one log-prob per sampled token under the policy and under the reference"
        )
    return logp.float() - ref_logp.detach().float()


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 estimator ``logp - ref_logp``: any shape (e.g. ``[B, T]``) -> same shape, float32."""
    return _log_ratio("kl_k1", logp, ref_logp)


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k2 estimator ``0.5 * (logp - ref_logp)^2``: any shape -> same shape, float32, >= 0."""
    return 0.5 * _log_ratio("kl_k2", logp, ref_logp) ** 2


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator ``exp(ref - logp) - (ref - logp) - 1``: any shape -> same shape, float32, >= 0."""
    log_r = -_log_ratio("kl_k3", logp, ref_logp)
    # expm1 keeps small log-ratios accurate: in float32, exp(x) - 1 - x keeps almost none of the digits
    # of its x^2 / 2 result once |x| < ~1e-3. The clamp only removes a last-bit negative rounding.
    return (torch.expm1(log_r) - log_r).clamp(min=0.0)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token KL estimate of the named ``kind`` (``"k1"``, ``"k2"`` or ``"k3"``): same shape as ``logp``."""
    if kind == "k1":
        return kl_k1(logp, ref_logp)
    if kind == "k2":
        return kl_k2(logp, ref_logp)
    if kind == "k3":
        return kl_k3(logp, ref_logp)
    raise ValueError(f"kl_estimate: kind={kind!r} is not one of {KL_ESTIMATORS}")

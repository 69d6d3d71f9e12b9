"""Advantages for online RL: leave-one-out (RLOO, REINFORCE), group-normalised (GRPO), GAE (PPO), whitening.

All outputs are float32 and detached from the graph: an advantage is a constant weight on the policy
gradient. Two batch layouts appear, and each function says which it takes:

- **k-major** (RLOO, as the reference RLOO page lays it out): ``rewards[j * B + i]`` is the j-th
  completion of prompt i, i.e. block j holds the j-th completion of every prompt;
- **prompt-major** (GRPO, REINFORCE): ``rewards[i * G + j]`` is the j-th completion of prompt i, i.e.
  the completions of one prompt are adjacent.
"""
from __future__ import annotations

import torch

GRPO_SCALES = ("group", "batch", "none")

# Added to the standard deviation before dividing, as TRL's GRPO does: a group whose completions all
# scored the same has std 0 and gets advantage 0 instead of NaN.
GRPO_STD_EPS = 1e-4

# Added to the variance under the square root in whiten (TRL's masked_whiten uses the same constant).
WHITEN_VAR_EPS = 1e-8


def _check_grouped_rewards(where: str, rewards: torch.Tensor, group_size: int, group_name: str) -> None:
    """Raise ValueError unless ``rewards`` is a float ``[N]`` vector split evenly into groups of >= 2."""
    if rewards.dim() != 1:
        raise ValueError(
            f"{where}: rewards has shape {tuple(rewards.shape)} but must be [N], one scalar reward per completion"
        )
    if not rewards.is_floating_point():
        raise ValueError(f"{where}: rewards has dtype {rewards.dtype}; pass floating-point rewards")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(
            f"{where}: {group_name}={group_size!r} must be an int >= 2; a leave-one-out or group baseline "
            f"needs at least two completions per prompt"
        )
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"{where}: {rewards.numel()} rewards are not divisible by {group_name}={group_size}; pass "
            f"{group_name} completions for every prompt"
        )


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """RLOO advantages with the leave-one-out baseline: ``[k * B] -> [k * B]`` (k-major layout).

    ``rewards[j * B + i]`` is the reward of the j-th completion of prompt i (the reference RLOO page's
    layout: the j-th completions of all B prompts form block j). Each completion's baseline is the mean
    reward of the other ``k - 1`` completions of its prompt:

        A[j, i] = r[j, i] - (sum_j' r[j', i] - r[j, i]) / (k - 1)
    """
    _check_grouped_rewards("rloo_advantages", rewards, k, "k")
    per_prompt = rewards.detach().float().reshape(k, -1)  # [k, B]
    baseline = (per_prompt.sum(0, keepdim=True) - per_prompt) / (k - 1)  # [k, B]
    return (per_prompt - baseline).reshape(-1)


def reinforce_loo_advantages(rewards: torch.Tensor, k: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """REINFORCE advantages with NeMo-Aligner's leave-one-out baseline: ``[B * k] -> [B * k]`` (prompt-major).

    ``rewards[i * k + j]`` is the reward of the j-th completion of prompt i (the completions of a prompt
    are adjacent, unlike :func:`rloo_advantages`). ``valid [B * k]`` (bool, default all true) marks the
    completions allowed into baselines; NeMo-Aligner passes "ended with EOS" here so that truncated
    responses do not move the baseline. With ``m`` the valid flags of one prompt's group:

        baseline_i = sum_{j != i} m_j r_j / (sum_j m_j - 1)        A_i = r_i - baseline_i

    For a valid completion this is the mean reward of the other valid ones; for an invalid one it is
    the sum of the valid rewards over ``(number valid - 1)``, exactly as NeMo-Aligner computes it. A
    group with at most one valid completion has no baseline and all its advantages are 0
    (NeMo-Aligner sets the baseline to the reward there). With every completion valid this equals RLOO's advantage in prompt-major order.
    The rewards are expected to already hold any KL penalty (NeMo-Aligner subtracts
    ``initial_policy_kl_penalty * mean-token KL`` before taking the baseline).
    """
    _check_grouped_rewards("reinforce_loo_advantages", rewards, k, "k")
    groups = rewards.detach().float().reshape(-1, k)  # [B, k]
    if valid is None:
        weights = torch.ones_like(groups)
    else:
        if valid.dtype != torch.bool or tuple(valid.shape) != tuple(rewards.shape):
            raise ValueError(
                f"reinforce_loo_advantages: valid must be a bool tensor shaped like rewards {tuple(rewards.shape)}, "
                f"got {valid.dtype} {tuple(valid.shape)}; pass e.g. the rollouts' ended-with-EOS flags"
            )
        weights = valid.reshape(-1, k).float()  # [B, k]
    weighted = groups * weights  # [B, k]; an invalid completion's reward never enters a baseline
    num_valid = weights.sum(-1, keepdim=True)  # [B, 1]
    has_baseline = num_valid > 1
    baseline = (weighted.sum(-1, keepdim=True) - weighted) / torch.where(has_baseline, num_valid - 1, 1.0)
    baseline = torch.where(has_baseline, baseline, groups)  # [B, k]
    return (groups - baseline).reshape(-1)


def grpo_advantages(rewards: torch.Tensor, num_generations: int, scale: str = "group") -> torch.Tensor:
    """GRPO group-relative advantages: ``[B * G] -> [B * G]`` (prompt-major, ``G = num_generations``).

    ``rewards[i * G + j]`` is the reward of the j-th completion of prompt i. Every reward has its
    group's mean subtracted, then is divided according to ``scale``:

    - ``"group"``: ``(r - group mean) / (group std + 1e-4)``, std with Bessel's correction (GRPO);
    - ``"batch"``: ``(r - group mean) / (std of all rewards given + 1e-4)``; pass the rewards of the
      whole global batch when the batch is split across ranks;
    - ``"none"``: ``r - group mean`` only (Dr. GRPO: no per-question difficulty bias).

    A group whose rewards are all equal gets advantage 0 in every mode.
    """
    _check_grouped_rewards("grpo_advantages", rewards, num_generations, "num_generations")
    if scale not in GRPO_SCALES:
        raise ValueError(f"grpo_advantages: scale={scale!r} is not one of {GRPO_SCALES}")
    flat = rewards.detach().float()  # [B * G]
    groups = flat.reshape(-1, num_generations)  # [B, G]
    centred = groups - groups.mean(-1, keepdim=True)  # [B, G]
    if scale == "group":
        centred = centred / (groups.std(-1, keepdim=True) + GRPO_STD_EPS)
    elif scale == "batch":
        centred = centred / (flat.std() + GRPO_STD_EPS)
    return centred.reshape(-1)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens: ``[B, T] x 3 -> (advantages, returns) [B, T]``.

    ``rewards[b, t]`` is the reward received after token t (PPO: ``-kl_coef * KL`` per token plus the
    score at the last token), ``values[b, t]`` the critic's value of the state before token t, and
    ``mask[b, t]`` is true on response tokens. Going backwards over the unmasked tokens of a row:

        delta_t = r_t + gamma * V_next - V_t        A_t = delta_t + gamma * lam * A_next

    where ``next`` is the row's next unmasked token; after the last unmasked token ``V_next = A_next = 0``
    (the episode ends). Masked positions are skipped, so a gap in the mask (e.g. tool output in the
    middle of a response) joins the tokens on either side; with right padding this is TRL's PPO loop.
    ``returns = advantages + values``, the critic's regression target. Both outputs are 0 at masked
    positions and hold no NaN even where rewards or values do.
    """
    if rewards.dim() != 2 or tuple(rewards.shape) != tuple(values.shape) or tuple(rewards.shape) != tuple(mask.shape):
        raise ValueError(
            f"gae: rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and mask {tuple(mask.shape)} "
            f"must all be [B, T] with the same shape (values squeezed from a value head's [B, T, 1])"
        )
    if not 0.0 <= gamma <= 1.0 or not 0.0 <= lam <= 1.0:
        raise ValueError(f"gae: gamma={gamma} and lam={lam} must both lie in [0, 1]")
    rewards = rewards.detach().float()
    values = values.detach().float()
    keep = mask.bool()
    zero = torch.zeros((), dtype=torch.float32, device=rewards.device)
    advantages = torch.zeros_like(rewards)  # [B, T]
    next_value = torch.zeros_like(rewards[:, 0])  # [B]
    next_advantage = torch.zeros_like(rewards[:, 0])  # [B]
    for t in range(rewards.shape[1] - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        here = keep[:, t]
        advantages[:, t] = torch.where(here, advantage, zero)
        # a masked position passes the carried value and advantage through unchanged
        next_value = torch.where(here, values[:, t], next_value)
        next_advantage = torch.where(here, advantage, next_advantage)
    values = torch.where(keep, values, zero)
    return advantages, advantages + values


def whiten(values: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True) -> torch.Tensor:
    """Normalise to zero mean and unit variance over the masked entries: any shape -> same shape (float32).

    ``(x - mean) / sqrt(var + 1e-8)`` with the mean and the Bessel-corrected variance taken over the
    entries where ``mask`` is true (all entries when ``mask`` is None), as TRL's ``masked_whiten``.
    ``shift_mean=False`` adds the mean back (rescale only; PPO's ``whiten_rewards``). Masked entries
    come out 0. The statistics are those of the tensor given: whiten the gathered global batch for
    statistics that do not depend on the number of ranks.
    """
    values = values.detach().float()
    if mask is None:
        keep = torch.ones_like(values, dtype=torch.bool)
    else:
        if tuple(mask.shape) != tuple(values.shape):
            raise ValueError(
                f"whiten: mask {tuple(mask.shape)} must have the shape of values {tuple(values.shape)}"
            )
        keep = mask.bool()
    count = int(keep.sum())
    if count < 2:
        raise ValueError(
            f"whiten: {count} unmasked entries; the variance needs at least 2 (check the mask, or do not "
            f"whiten a batch this small)"
        )
    zero = torch.zeros((), dtype=torch.float32, device=values.device)
    kept = torch.where(keep, values, zero)
    mean = kept.sum() / count
    var = torch.where(keep, (values - mean) ** 2, zero).sum() / (count - 1)
    whitened = (values - mean) * torch.rsqrt(var + WHITEN_VAR_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(keep, whitened, zero)

"""Pure math of self-rewarding and meta-rewarding training (arXiv 2401.10020, 2407.19594).

Self-rewarding: the policy samples ``n`` responses per prompt, judges each of them ``m`` times with the
judge template, and trains DPO on (best, worst). Here: the per-response score statistics
(:func:`score_stats`), the pair choice with its bad-sample rules and length control (:func:`choose_pair`,
:func:`length_control_at`), and the judges' disagreement (:func:`disagreement`).

Meta-rewarding: the policy also compares its own judgements of one response pairwise with the meta-judge
template, and trains DPO on (best judgement, worst judgement) by an Elo fit of those comparisons
(:func:`comparison_pairs`, :func:`wins_from_comparisons`, :func:`elo_ratings`, :func:`meta_judge_pair`).

No models, no I/O, no torch.distributed: the trainer (``aligner/trainers/self_rewarding.py``) calls these.
See docs/judges.md for the rules in words.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

BAD_REASONS = ("unparsed", "too_few_valid", "all_equal", "identical")
# Means (and ratings) closer than this are equal: judge scores are small numbers, so float noise in a mean
# such as (0.1 + 0.2) / 2 must not make a tie look like a preference.
_TIE = 1e-9


@dataclass
class PairChoice:
    """The (chosen, rejected) response indices for one prompt, or why there is no usable pair.

    ``bad`` is None for a good pair; otherwise one of :data:`BAD_REASONS` and both indices are None:
    ``unparsed`` (no response has a valid score), ``too_few_valid`` (exactly one has), ``all_equal`` (the
    valid mean scores are all equal), ``identical`` (chosen and rejected are the same response or have the
    same text after ``strip()``).
    """

    chosen: int | None
    rejected: int | None
    bad: str | None


def _valid(scores: Sequence[float | None]) -> list[float]:
    return [float(s) for s in scores if s is not None and math.isfinite(s)]


def _mean_var(values: list[float]) -> tuple[float, float]:
    """Mean and population variance of a non-empty list."""
    mean = math.fsum(values) / len(values)
    return mean, math.fsum((v - mean) ** 2 for v in values) / len(values)


def score_stats(scores: Sequence[Sequence[float | None]]) -> tuple[list[float | None], list[float | None]]:
    """Per response, the mean and population variance of its valid judge scores.

    ``scores[i][k]`` is judge sample ``k``'s score of response ``i`` (None: unparsed). Returns
    ``(means, variances)``, each of length ``len(scores)``; both are None for a response with no valid score.
    """
    means: list[float | None] = []
    variances: list[float | None] = []
    for response_scores in scores:
        valid = _valid(response_scores)
        mean, var = _mean_var(valid) if valid else (None, None)
        means.append(mean)
        variances.append(var)
    return means, variances


def disagreement(scores_of_one_response: Sequence[float | None]) -> float:
    """How much the judge samples disagree on one response: population variance of its valid scores (0.0 below 2)."""
    valid = _valid(scores_of_one_response)
    return _mean_var(valid)[1] if len(valid) >= 2 else 0.0


def _check_length_control(value: float, where: str = "length_control") -> float:
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{where} is {value}; it must be in [0, 1) (0 = no length control: plain best vs worst)")
    return value


def choose_pair(means: Sequence[float | None], variances: Sequence[float | None], lengths: Sequence[int],
                texts: Sequence[str], length_control: float = 0.0) -> PairChoice:
    """Pick the DPO pair among one prompt's responses from their mean judge scores.

    Args:
        means, variances: per response, from :func:`score_stats` (None: no valid score; left out).
        lengths: per response, its length in tokens.
        texts: per response, its text (for the ``identical`` check).
        length_control: ``rho`` in [0, 1). With ``S_max``/``S_min`` the highest/lowest valid mean, the top band
            is ``mean >= S_max - rho * (S_max - S_min)`` and the bottom band ``mean <= S_min + rho * (S_max - S_min)``.
            Chosen is the shortest response of the top band, rejected the longest of the bottom band (ties: lower
            variance, then lower index). With ``rho = 0`` the bands are the top- and bottom-scored responses and
            length is not looked at (ties: lower variance, then lower index).

    Returns:
        A :class:`PairChoice`; see its docstring for the bad reasons.
    """
    rho = _check_length_control(length_control)
    n = len(means)
    if not len(variances) == len(lengths) == len(texts) == n:
        raise ValueError(f"choose_pair: {n} means, {len(variances)} variances, {len(lengths)} lengths and "
                         f"{len(texts)} texts; pass one of each per response")
    valid = [i for i in range(n) if means[i] is not None and math.isfinite(means[i])]
    if not valid:
        return PairChoice(None, None, "unparsed")
    if len(valid) == 1:
        return PairChoice(None, None, "too_few_valid")
    top = max(means[i] for i in valid)
    bottom = min(means[i] for i in valid)
    spread = top - bottom
    if spread <= _TIE:
        return PairChoice(None, None, "all_equal")

    def variance(i: int) -> float:
        return math.inf if variances[i] is None else variances[i]

    top_band = [i for i in valid if means[i] >= top - rho * spread - _TIE]
    bottom_band = [i for i in valid if means[i] <= bottom + rho * spread + _TIE]
    if rho == 0.0:
        chosen = min(top_band, key=lambda i: (variance(i), i))
        rejected = min(bottom_band, key=lambda i: (variance(i), i))
    else:
        chosen = min(top_band, key=lambda i: (lengths[i], variance(i), i))
        rejected = min(bottom_band, key=lambda i: (-lengths[i], variance(i), i))
    # The bands overlap from rho = 0.5 on, so one middle response can be both.
    if chosen == rejected or texts[chosen].strip() == texts[rejected].strip():
        return PairChoice(None, None, "identical")
    return PairChoice(chosen, rejected, None)


def length_control_at(length_control: float | Sequence[float], iteration: int) -> float:
    """The length-control ``rho`` of ``iteration`` (0-based): a number is every iteration's; a list gives one per
    iteration and its last entry repeats past its end."""
    if iteration < 0:
        raise ValueError(f"iteration is {iteration}; iterations count from 0")
    if isinstance(length_control, (int, float)):
        return _check_length_control(length_control)
    values = list(length_control)
    if not values:
        raise ValueError("length_control is an empty list; give a number or one value per iteration, e.g. [0, 0, 0.1]")
    index = min(iteration, len(values) - 1)
    return _check_length_control(values[index], f"length_control[{index}]")


def elo_ratings(wins: torch.Tensor, *, prior: float = 0.5, iterations: int = 200) -> torch.Tensor:
    """Elo-scale Bradley-Terry ratings from pairwise results: ``[n, n] -> [n]`` float64.

    ``wins[i, j]`` is how often player ``i`` beat player ``j`` (the diagonal is ignored). Every pair that played
    at least once gets ``prior`` virtual wins in each direction, so a side that always won still has a finite
    rating (``prior = 0`` is the plain maximum-likelihood fit, infinite in that case). Strengths ``p`` are fitted
    by the minorise-maximise iteration ``p_i <- W_i / sum_j N_ij / (p_i + p_j)`` (``W_i``: wins of ``i``,
    ``N_ij``: games between ``i`` and ``j``) for at most ``iterations`` steps; the rating is ``400 * log10(p)``.
    Ratings are only comparable within a group of players connected by games, so each such group is centred
    to mean 0; a player that never played gets 0.
    """
    if wins.dim() != 2 or wins.shape[0] != wins.shape[1]:
        raise ValueError(f"wins has shape {list(wins.shape)}; expected a square [n, n] matrix of win counts")
    if prior < 0 or iterations < 1:
        raise ValueError(f"prior={prior}, iterations={iterations}; use prior >= 0 and iterations >= 1")
    w = wins.detach().to(device="cpu", dtype=torch.float64).clone()
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError("wins holds a negative or non-finite count; wins[i, j] counts how often i beat j")
    n = w.shape[0]
    w.fill_diagonal_(0.0)
    played = (w + w.T) > 0  # [n, n]
    w = w + prior * played
    games = w + w.T  # [n, n] N_ij
    won = w.sum(dim=1)  # [n] W_i
    active = played.any(dim=1)  # [n]
    strength = torch.ones(n, dtype=torch.float64)
    for _ in range(iterations):
        denom = (games / (strength[:, None] + strength[None, :])).sum(dim=1)
        new = torch.where(active, won / denom.clamp_min(1e-300), strength)
        # MM is scale-free; fixing the total keeps the numbers in range.
        new = torch.where(active, new * active.sum() / new[active].sum(), new)
        converged = torch.allclose(new, strength, rtol=1e-12, atol=0.0)
        strength = new
        if converged:
            break
    ratings = 400.0 * torch.log10(strength)
    for group in _connected_groups(played):
        ratings[group] -= ratings[group].mean()
    ratings[~active] = 0.0
    return ratings


def _connected_groups(played: torch.Tensor) -> list[list[int]]:
    """The groups of players linked by games (``played`` is a symmetric ``[n, n]`` bool matrix)."""
    n = played.shape[0]
    seen = [False] * n
    groups = []
    for start in range(n):
        if seen[start]:
            continue
        seen[start] = True
        group, frontier = [start], [start]
        while frontier:
            for j in played[frontier.pop()].nonzero().flatten().tolist():
                if not seen[j]:
                    seen[j] = True
                    group.append(j)
                    frontier.append(j)
        groups.append(sorted(group))
    return groups


def meta_judge_pair(ratings: torch.Tensor | Sequence[float]) -> tuple[int, int] | None:
    """``(best, worst)`` judgement indices by rating (ties: lower index), or None when all ratings are equal
    within 1e-9 (nothing to prefer)."""
    values = [float(r) for r in (ratings.tolist() if isinstance(ratings, torch.Tensor) else ratings)]
    if len(values) < 2 or max(values) - min(values) <= _TIE:
        return None
    best = max(range(len(values)), key=lambda i: (values[i], -i))
    worst = min(range(len(values)), key=lambda i: (values[i], i))
    return best, worst


def comparison_pairs(n: int) -> list[tuple[int, int]]:
    """Every ordered pair ``(a, b)``, ``a != b``, of ``n`` judgements for the meta-judge to compare.

    Both orders of each pair are asked, so a preference for the first (or second) position cancels out;
    the order is fixed: ``(0, 1), (1, 0), (0, 2), (2, 0), ..., (n-2, n-1), (n-1, n-2)``.
    """
    if n < 0:
        raise ValueError(f"n is {n}; the number of judgements cannot be negative")
    pairs = []
    for a in range(n):
        for b in range(a + 1, n):
            pairs += [(a, b), (b, a)]
    return pairs


def wins_from_comparisons(n: int, pairs: Sequence[tuple[int, int]], winners: Sequence[int | None]) -> torch.Tensor:
    """The ``[n, n]`` float64 win matrix for :func:`elo_ratings` from parsed meta-judge verdicts.

    ``winners[k]`` is the verdict on ``pairs[k] = (a, b)`` (``a`` shown as judgement A): 0 means ``a`` won,
    1 means ``b`` won, None (unparsed) is skipped.
    """
    if len(pairs) != len(winners):
        raise ValueError(f"{len(pairs)} pairs but {len(winners)} winners; pass one verdict per pair")
    wins = torch.zeros(n, n, dtype=torch.float64)
    for k, ((a, b), winner) in enumerate(zip(pairs, winners)):
        if not (0 <= a < n and 0 <= b < n and a != b):
            raise ValueError(f"pairs[{k}] is ({a}, {b}); use two different judgement indices in [0, {n})")
        if winner is None:
            continue
        if winner == 0:
            wins[a, b] += 1.0
        elif winner == 1:
            wins[b, a] += 1.0
        else:
            raise ValueError(f"winners[{k}] is {winner!r}; use 0 (first of the pair won), 1 (second) or None")
    return wins

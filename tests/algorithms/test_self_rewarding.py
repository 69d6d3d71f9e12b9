"""Self-rewarding pair choice and meta-rewarding Elo, on hand-worked examples."""
from __future__ import annotations

import math

import pytest
import torch

from aligner.algorithms import (
    BAD_REASONS, PairChoice, choose_pair, comparison_pairs, disagreement, elo_ratings, length_control_at,
    meta_judge_pair, score_stats, wins_from_comparisons,
)

TEXTS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]


def test_score_stats():
    means, variances = score_stats([[4, 5, None], [None, None], [2], [], [1, 2, 3, 6]])
    assert means == [4.5, None, 2.0, None, 3.0]
    assert variances == [0.25, None, 0.0, None, 3.5]  # (4 + 1 + 0 + 9) / 4


def test_disagreement():
    assert disagreement([4, 5, None, 3]) == pytest.approx(2 / 3)
    assert disagreement([4]) == 0.0
    assert disagreement([None, None]) == 0.0
    assert disagreement([]) == 0.0


def test_best_vs_worst_ties_by_variance():
    means = [3, 5, 1, 5, 1]
    variances = [0.0, 0.5, 0.2, 0.25, 0.1]
    lengths = [10, 10, 10, 10, 10]
    assert choose_pair(means, variances, lengths, TEXTS[:5]) == PairChoice(3, 4, None)


def test_best_vs_worst_ties_by_index_and_ignores_length():
    means = [5, 5, 1, 1]
    assert choose_pair(means, [0, 0, 0, 0], [100, 10, 5, 50], TEXTS[:4]) == PairChoice(0, 2, None)


def test_unscored_responses_are_left_out():
    assert choose_pair([None, 4, 2, None], [None, 0, 0, None], [1, 1, 1, 1], TEXTS[:4]) == PairChoice(1, 2, None)


def test_length_control_bands():
    # S_max = 5, S_min = 1, rho = 0.1: top band >= 4.6 -> {0, 1}; bottom band <= 1.4 -> {3, 4}.
    means = [5, 4.6, 4, 1.2, 1, 3]
    lengths = [50, 20, 5, 30, 10, 8]
    variances = [0.0] * 6
    assert choose_pair(means, variances, lengths, TEXTS, length_control=0.1) == PairChoice(1, 3, None)
    # rho = 0: plain best vs worst, regardless of length.
    assert choose_pair(means, variances, lengths, TEXTS, length_control=0.0) == PairChoice(0, 4, None)
    # rho = 0.3: top >= 3.8 -> {0, 1, 2}, shortest is 2; bottom <= 2.2 -> {3, 4}, longest is 3.
    assert choose_pair(means, variances, lengths, TEXTS, length_control=0.3) == PairChoice(2, 3, None)


def test_length_control_ties_by_variance_then_index():
    means = [5, 4.8, 5, 1, 1.1, 1]
    lengths = [20, 20, 20, 40, 40, 40]
    variances = [0.3, 0.1, 0.1, 0.2, 0.4, 0.2]
    # top band (>= 4.6): 0, 1, 2 all length 20 -> lowest variance 0.1: 1 and 2 -> lower index 1.
    # bottom band (<= 1.4): 3, 4, 5 all length 40 -> lowest variance 0.2: 3 and 5 -> lower index 3.
    assert choose_pair(means, variances, lengths, TEXTS, length_control=0.1) == PairChoice(1, 3, None)


def test_bad_reasons():
    assert BAD_REASONS == ("unparsed", "too_few_valid", "all_equal", "identical")
    one = dict(variances=[0, 0, 0], lengths=[1, 2, 3], texts=TEXTS[:3])
    assert choose_pair([None, None, None], **one) == PairChoice(None, None, "unparsed")
    assert choose_pair([None, 3, None], **one) == PairChoice(None, None, "too_few_valid")
    assert choose_pair([4, None, 4], **one) == PairChoice(None, None, "all_equal")
    assert choose_pair([0.15, (0.1 + 0.2) / 2, 0.15], **one).bad == "all_equal"  # float noise is a tie
    texts = ["Paris.", "London.", "  Paris.\n"]
    assert choose_pair([5, 3, 1], [0, 0, 0], [1, 1, 1], texts) == PairChoice(None, None, "identical")


def test_overlapping_bands_pick_one_response_twice():
    # rho = 0.5: top >= 3 -> {0, 1}, bottom <= 3 -> {1, 2}; response 1 is the shortest of the top band and
    # the longest of the bottom band.
    assert choose_pair([5, 3, 1], [0, 0, 0], [10, 5, 3], TEXTS[:3], length_control=0.5) == \
        PairChoice(None, None, "identical")


def test_choose_pair_checks_arguments():
    with pytest.raises(ValueError, match=r"length_control is 1.0; it must be in \[0, 1\)"):
        choose_pair([1, 2], [0, 0], [1, 1], TEXTS[:2], length_control=1.0)
    with pytest.raises(ValueError, match="must be in"):
        choose_pair([1, 2], [0, 0], [1, 1], TEXTS[:2], length_control=-0.1)
    with pytest.raises(ValueError, match="2 means, 2 variances, 3 lengths"):
        choose_pair([1, 2], [0, 0], [1, 1, 1], TEXTS[:2])


def test_length_control_at():
    assert length_control_at(0.1, 0) == 0.1 and length_control_at(0.1, 7) == 0.1
    schedule = [0, 0, 0.1]
    assert [length_control_at(schedule, i) for i in range(5)] == [0.0, 0.0, 0.1, 0.1, 0.1]
    assert length_control_at((0.2,), 3) == 0.2
    with pytest.raises(ValueError, match="empty list"):
        length_control_at([], 0)
    with pytest.raises(ValueError, match=r"length_control\[1\] is 1.0"):
        length_control_at([0, 1.0], 4)
    with pytest.raises(ValueError, match="iterations count from 0"):
        length_control_at(0.1, -1)


def test_elo_two_players_is_the_win_ratio():
    ratings = elo_ratings(torch.tensor([[0.0, 3.0], [1.0, 0.0]]), prior=0.0)
    half = 200 * math.log10(3)  # 400 * log10(3 / 1), split around 0
    assert ratings.dtype == torch.float64 and ratings.shape == (2,)
    assert ratings.tolist() == pytest.approx([half, -half], abs=1e-9)
    # The prior adds 0.5 virtual wins each way: 3.5 : 1.5.
    with_prior = elo_ratings(torch.tensor([[0.0, 3.0], [1.0, 0.0]]))
    assert with_prior.tolist() == pytest.approx([200 * math.log10(7 / 3), -200 * math.log10(7 / 3)], abs=1e-9)


def test_elo_three_players_exact_bradley_terry():
    # Results exactly proportional to strengths 4 : 2 : 1, so the fit recovers them:
    # 0 vs 1: 2-1, 1 vs 2: 2-1, 0 vs 2: 4-1.
    wins = torch.tensor([[0.0, 2.0, 4.0], [1.0, 0.0, 2.0], [1.0, 1.0, 0.0]])
    step = 400 * math.log10(2)
    assert elo_ratings(wins, prior=0.0).tolist() == pytest.approx([step, 0.0, -step], abs=1e-6)


def test_elo_ordering_and_sweep_stays_finite():
    ratings = elo_ratings(torch.tensor([[0.0, 3.0, 5.0], [1.0, 0.0, 4.0], [0.0, 1.0, 0.0]]))
    assert ratings[0] > ratings[1] > ratings[2]
    assert float(ratings.sum()) == pytest.approx(0.0, abs=1e-9)
    sweep = torch.tensor([[0.0, 2.0, 2.0], [0.0, 0.0, 2.0], [0.0, 0.0, 0.0]])  # 0 beat all, 2 lost all
    ratings = elo_ratings(sweep)
    assert torch.isfinite(ratings).all() and ratings[0] > ratings[1] > ratings[2]
    # Two players, 2-0 with prior 0.5: 2.5 : 0.5.
    assert elo_ratings(torch.tensor([[0.0, 2.0], [0.0, 0.0]]))[0].item() == pytest.approx(200 * math.log10(5))


def test_elo_players_that_never_played_and_separate_groups():
    assert elo_ratings(torch.zeros(3, 3)).tolist() == [0.0, 0.0, 0.0]
    wins = torch.zeros(5, 5)
    wins[0, 1] = 3.0
    wins[1, 0] = 1.0
    wins[3, 4] = 4.0
    wins[4, 3] = 1.0
    wins[2, 2] = 9.0  # the diagonal is ignored
    a, b = 200 * math.log10(3), 200 * math.log10(4)
    assert elo_ratings(wins, prior=0.0).tolist() == pytest.approx([a, -a, 0.0, b, -b], abs=1e-9)


def test_elo_checks_input():
    with pytest.raises(ValueError, match="square"):
        elo_ratings(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="negative or non-finite"):
        elo_ratings(torch.tensor([[0.0, -1.0], [1.0, 0.0]]))


def test_meta_judge_pair():
    assert meta_judge_pair([10.0, -5.0, 10.0, -5.0]) == (0, 1)
    assert meta_judge_pair(torch.tensor([-3.0, 7.0, 1.0], dtype=torch.float64)) == (1, 0)
    assert meta_judge_pair([0.0, 0.0, 0.0]) is None
    assert meta_judge_pair([1e-10, 0.0]) is None
    assert meta_judge_pair([4.0]) is None


def test_comparison_pairs():
    assert comparison_pairs(3) == [(0, 1), (1, 0), (0, 2), (2, 0), (1, 2), (2, 1)]
    assert comparison_pairs(1) == [] and comparison_pairs(0) == []
    assert len(comparison_pairs(5)) == 20 and len(set(comparison_pairs(5))) == 20


def test_wins_from_comparisons():
    pairs = comparison_pairs(3)
    wins = wins_from_comparisons(3, pairs, [0, 1, 0, None, 1, 0])
    # (0,1): 0 won; (1,0): second (0) won; (0,2): 0 won; (2,0): skipped; (1,2): 2 won; (2,1): 2 won.
    assert wins.dtype == torch.float64
    assert wins.tolist() == [[0.0, 2.0, 1.0], [0.0, 0.0, 0.0], [0.0, 2.0, 0.0]]
    with pytest.raises(ValueError, match=r"winners\[0\] is 2"):
        wins_from_comparisons(3, pairs, [2, 0, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="6 pairs but 2 winners"):
        wins_from_comparisons(3, pairs, [0, 1])
    with pytest.raises(ValueError, match=r"pairs\[0\] is \(0, 3\)"):
        wins_from_comparisons(3, [(0, 3)], [0])


def test_position_bias_cancels():
    # A meta-judge that always answers "A" wins every pair once each way: no judgement is preferred.
    pairs = comparison_pairs(4)
    ratings = elo_ratings(wins_from_comparisons(4, pairs, [0] * len(pairs)))
    assert ratings.abs().max().item() < 1e-9
    assert meta_judge_pair(ratings) is None

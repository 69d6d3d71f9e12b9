"""Score and winner parsing: last match wins, range filter, and no exception on any text."""
from __future__ import annotations

import math
import random
import re

import pytest

from aligner.judges import DEFAULT_SCORE_REGEX, DEFAULT_WINNER_REGEX, parse_score, parse_winner

# A scripted fake judge: what small models actually write, and the score each must parse to (range [0, 5]).
FAKE_JUDGE_OUTPUTS = [
    ("", None),
    ("The response is relevant and helpful.", None),
    ("Score:", None),
    ("Score: <points>", None),
    ("Score: four", None),
    ("Score: 7", None),  # out of range
    ("Score: 5.0001", None),
    ("Score: -1", None),  # no sign in the pattern
    ("Score: 0", 0.0),
    ("Score: 5", 5.0),
    ("Score: 3.5", 3.5),
    ("Score: 3.5.2", 3.5),  # the pattern stops after one decimal part
    ("score=2", 2.0),
    ("SCORE : 4", 4.0),
    ("Points: 1", 1.0),
    ("It earns 4 points.\nScore: 3", 3.0),
    ("Score: 2\nOn reflection the answer is better.\nScore: 4", 4.0),  # two scores: the last one counts
    ("Score: 4\nScore: 9", None),  # the last one is out of range; no fallback to an earlier one
    ("Score: 9\nScore: 1", 1.0),
    ("**Score: 4**", 4.0),
    ("Score:\n\n2", 2.0),
    ("Score: \u0663", None),  # an Arabic-Indic digit is not [0-9]
    ("Score: \uff14", None),  # fullwidth 4
    ("\U0001f916 Bewertung \u2014 Score: 4 \U0001f389", 4.0),
    ("\ud800\x00\ufffd Score: 2 \udfff", 2.0),  # lone surrogates and NUL
    ("Score: " + "9" * 5000, None),  # huge number
    ("Score: 1" + "0" * 400, None),  # 1e400 overflows to inf
    ("x" * 1_000_000 + "Score: 2", 2.0),
    ("Score: 3 " + "blah " * 200_000, 3.0),
    ("Score: " * 50_000, None),
]


@pytest.mark.parametrize("text, expected", FAKE_JUDGE_OUTPUTS, ids=range(len(FAKE_JUDGE_OUTPUTS)))
def test_fake_judge_outputs(text, expected):
    assert parse_score(text, DEFAULT_SCORE_REGEX, 0, 5) == expected


def test_huge_number_is_not_finite_even_with_an_open_range():
    assert parse_score("Score: " + "9" * 400, DEFAULT_SCORE_REGEX, 0, math.inf) is None
    assert parse_score("Score: " + "9" * 300, DEFAULT_SCORE_REGEX, 0, math.inf) == pytest.approx(1e300)


def test_range_bounds_are_inclusive():
    assert parse_score("Score: 1", DEFAULT_SCORE_REGEX, 1, 10) == 1.0
    assert parse_score("Score: 10", DEFAULT_SCORE_REGEX, 1, 10) == 10.0
    assert parse_score("Score: 0", DEFAULT_SCORE_REGEX, 1, 10) is None


def test_custom_and_compiled_patterns():
    signed = re.compile(r"Rating:\s*(-?\d+)")
    assert parse_score("Rating: -2 ... Rating: -1", signed, -3, 3) == -1.0
    assert parse_score("Rating: 5", signed.pattern, -3, 3) is None
    assert parse_score("Grade: nan", r"Grade: (\w+)", -1e9, 1e9) is None  # float('nan') parses; not finite
    assert parse_score("Grade: inf", r"Grade: (\w+)", -1e9, math.inf) is None
    assert parse_score("Grade: five", r"Grade: (\w+)", 0, 5) is None
    with pytest.raises(ValueError, match="no capture group"):
        parse_score("Score: 3", r"Score: \d", 0, 5)


def test_non_string_is_none():
    assert parse_score(None, DEFAULT_SCORE_REGEX, 0, 5) is None  # type: ignore[arg-type]
    assert parse_winner(b"Winner: Judgement A", DEFAULT_WINNER_REGEX) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("text, expected", [
    ("Winner: Judgement A", 0),
    ("winner: judgment b", 1),
    ("WINNER = JUDGEMENT B", 1),
    ("**Winner: Judgement B**", 1),
    ("Winner: Judgement A\nOn second thought...\nWinner: Judgement B", 1),
    ("Winner: Judgement B\nWinner: Judgement A.", 0),
    ("Winner: Judgement C", None),
    ("Winner: Judgement AB", None),
    ("Winner: A", None),
    ("The winner is Judgement A", None),
    ("", None),
    ("Winner: Judgement " + "\u00c4" * 100_000, None),
    ("\U0001f3c6 winner:judgementa", 0),
])
def test_parse_winner(text, expected):
    assert parse_winner(text, DEFAULT_WINNER_REGEX) == expected


def test_random_garbage_never_raises():
    rng = random.Random(0)
    alphabet = "Score: Winner: Judgement AB points=0123456789.-\n\t \u00e9\u4e2d\U0001f600\ud800"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 80)))
        score = parse_score(text, DEFAULT_SCORE_REGEX, 0, 5)
        assert score is None or 0 <= score <= 5
        assert parse_winner(text, DEFAULT_WINNER_REGEX) in (None, 0, 1)

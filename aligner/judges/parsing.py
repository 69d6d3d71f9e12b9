"""Read a judge's score and a meta-judge's winner out of generated text.

Both parsers take the *last* match of their pattern, since the templates ask for the verdict at the end
and a judge often quotes the rubric ("... adds 1 point ...") before it. Neither raises on any text: a
verdict that is missing, malformed or out of range is ``None``, and the trainer counts it as unparsed.
"""
from __future__ import annotations

import math
import re

# "Score: 4", "score = 3.5", "Points: 2"; group 1 is the number (no sign, so "Score: -1" does not match).
DEFAULT_SCORE_REGEX = r"(?i)(?:score|points)\s*[:=]\s*([0-9]+(?:\.[0-9]+)?)"
# "Winner: Judgement A", "winner: judgment b"; group 1 is A or B.
DEFAULT_WINNER_REGEX = r"(?i)winner\s*[:=]\s*judge?ment\s*([ab])\b"


def _compile(pattern: str | re.Pattern) -> re.Pattern:
    compiled = re.compile(pattern) if isinstance(pattern, str) else pattern
    if compiled.groups < 1:
        raise ValueError(f"pattern {compiled.pattern!r} has no capture group; put the value to read in "
                         f"parentheses, e.g. {DEFAULT_SCORE_REGEX!r}")
    return compiled


def _last_group(text: str, pattern: str | re.Pattern) -> str | None:
    """Group 1 of the last match of ``pattern`` in ``text``; None when there is none or ``text`` is not a string."""
    compiled = _compile(pattern)
    if not isinstance(text, str):
        return None
    last = None
    for match in compiled.finditer(text):
        last = match
    return None if last is None else last.group(1)


def parse_score(text: str, pattern: str | re.Pattern, low: float, high: float) -> float | None:
    """The score in group 1 of the last ``pattern`` match in ``text``, or None.

    None when nothing matches, the group is not a finite number, or it lies outside ``[low, high]``.
    Never raises on ``text`` (a pattern without a capture group is a ValueError).
    """
    group = _last_group(text, pattern)
    if group is None:
        return None
    try:
        score = float(group)
    except (ValueError, OverflowError):
        return None
    if not math.isfinite(score) or not low <= score <= high:
        return None
    return score


def parse_winner(text: str, pattern: str | re.Pattern) -> int | None:
    """0 when the last ``pattern`` match names judgement A, 1 for B, None otherwise; never raises on ``text``."""
    group = _last_group(text, pattern)
    return None if group is None else {"A": 0, "B": 1}.get(group.strip().upper())

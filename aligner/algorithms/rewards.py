"""Built-in rule rewards for verifiable tasks: pure functions with the reward-function contract.

Referenced from a config by import path (``grpo.reward_funcs=[aligner.algorithms.rewards:accuracy]``) and
called once per batch as ``fn(prompts, completions, **columns) -> list[float | None]``, where ``columns``
holds each extra column of the prompt records, aligned with the batch (``solution=[...]``). ``None``
means "not applicable to this sample" and is left out of the weighted sum
(``aligner/trainers/reward_functions.py``). A completion is a string or a message list (its last
message's ``content`` is scored).

- :func:`accuracy`: 1.0 when the last number in the completion equals the ``solution`` column.
- :func:`format_reward`: 1.0 when the completion is the answer alone (a number, an optional trailing
  period), which is what the shipped arithmetic prompts ask for ("Answer with just the number.").
"""
from __future__ import annotations

import math
import re
from typing import Any, Sequence

# A number as people write it: an optional minus sign (ASCII or U+2212) that does not belong to a word or a
# subtraction ("5-3" is 5 and 3), digits with optional thousands commas ("1,234"), an optional decimal part.
# A sentence's full stop is not a decimal point: "is 5." reads 5 because a decimal part needs digits.
_NUMBER = re.compile(r"(?:(?<![\w)\]])[-\u2212])?(?<![\d.])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d])")
# The completion is exactly one number: optional sign, digits (thousands commas allowed), an optional
# decimal part, an optional full stop, and surrounding whitespace.
_ANSWER_ONLY = re.compile(r"\s*[-\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?\.?\s*")
_TOLERANCE = 1e-9  # relative; "0.1 + 0.2" style float noise in a solution column is not a wrong answer


def completion_text(completion: str | Sequence[dict[str, Any]]) -> str:
    """The text of a completion: a string as is, a message list's last ``content``."""
    if isinstance(completion, str):
        return completion
    if not completion:
        return ""
    return str(completion[-1].get("content", ""))


def parse_number(text: str) -> float | None:
    """``text`` as one number (``"-1,234.5"``, ``"42."``, ``" 7 "``), or None when it is not exactly a number."""
    if not _ANSWER_ONLY.fullmatch(text):
        return None
    return float(text.strip().rstrip(".").replace(",", "").replace("\u2212", "-"))


def last_number(text: str) -> float | None:
    """The last number written in ``text``, or None when it has none.

    ``"3 + 4 = 7."`` -> 7.0; ``"It is -12."`` -> -12.0; ``"1,250 apples"`` -> 1250.0; ``"5-3"`` -> 3.0
    (a minus between digits is subtraction, not a sign).
    """
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    return float(matches[-1].replace(",", "").replace("\u2212", "-"))


def numbers_equal(a: float, b: float) -> bool:
    """Whether two parsed numbers are the same answer (exact for integers, relative 1e-9 otherwise)."""
    return math.isclose(a, b, rel_tol=_TOLERANCE, abs_tol=0.0)


def accuracy(prompts: Sequence[Any], completions: Sequence[Any], solution: Sequence[Any],
             **columns: Any) -> list[float | None]:
    """1.0 where the last number in the completion equals ``solution`` numerically, else 0.0: ``N -> [N]``.

    ``solution`` is the records' column: a number or a string holding one (``"42"``, ``"-3"``, ``"1,000"``).
    A record whose solution is null gets None (not applicable); one that is not a number is an error
    naming the index, since a reward that silently scores 0 would hide a broken data set.
    """
    if len(solution) != len(completions):
        raise ValueError(f"accuracy: {len(completions)} completions but {len(solution)} solutions; "
                         f"pass the 'solution' column aligned with the completions")
    rewards: list[float | None] = []
    for index, (completion, answer) in enumerate(zip(completions, solution)):
        if answer is None:
            rewards.append(None)
            continue
        expected = float(answer) if isinstance(answer, (int, float)) and not isinstance(answer, bool) \
            else parse_number(str(answer))
        if expected is None:
            raise ValueError(f"accuracy: solution {answer!r} at index {index} is not a number; write the "
                             f"'solution' column as a number or a numeric string such as \"42\"")
        found = last_number(completion_text(completion))
        rewards.append(1.0 if found is not None and numbers_equal(found, expected) else 0.0)
    return rewards


def format_reward(prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
    """1.0 where the completion is the answer alone, else 0.0: ``N -> [N]``.

    "The answer alone" is one number with optional thousands commas and an optional full stop, surrounded
    by nothing but whitespace: ``"42"``, ``"-7."``, ``"1,024"`` pass; ``"3 + 4 = 7"`` and ``"The answer is 7"``
    do not. It checks the form only (pair it with :func:`accuracy`), and it is what the shipped arithmetic
    prompts ask for ("Answer with just the number.").
    """
    return [1.0 if parse_number(completion_text(c)) is not None else 0.0 for c in completions]

"""An example reward-function module: copy it, edit it, and name its functions in a GRPO / RLOO config.

    python examples/train_grpo.py \\
        'grpo.reward_funcs=[aligner.algorithms.rewards:accuracy,examples/rewards.py:brevity]' \\
        'grpo.reward_weights=[1.0,0.2]'

The contract (the same as TRL's ``GRPOTrainer``): a function gets the batch's prompts and completions and,
as keyword arguments, every extra column of the prompt records as a list aligned with the batch, and
returns one float per completion, or None where the reward does not apply to that sample. A prompt is
what the record holds (a string, or a message list); a completion is the generated text. Name the
columns you read as parameters and take the rest with ``**columns``: a column your function requires
but the data lacks is reported when the job starts, before a model loads.
"""
from __future__ import annotations

from typing import Any

from aligner.algorithms.rewards import completion_text, parse_number

BREVITY_WORDS = 16  # a reply this long or longer earns no brevity reward


def brevity(prompts: list[Any], completions: list[Any], **columns: Any) -> list[float]:
    """1.0 for an empty reply, falling linearly to 0.0 at ``BREVITY_WORDS`` words: nudges towards short answers.

    Give it a small weight next to a correctness reward, or the policy learns to say nothing.
    """
    return [max(0.0, 1.0 - len(completion_text(c).split()) / BREVITY_WORDS) for c in completions]


def exact_answer(prompts: list[Any], completions: list[Any], solution: list[Any], **columns: Any) -> list[float | None]:
    """1.0 when the whole reply is the solution ("42" or "42."), 0.0 otherwise, None where the record has no solution.

    Stricter than ``aligner.algorithms.rewards:accuracy`` (which reads the last number of any reply):
    an example of a function that reads a column and of returning None for "not applicable".
    """
    rewards: list[float | None] = []
    for completion, answer in zip(completions, solution):
        if answer is None:
            rewards.append(None)
            continue
        found = parse_number(completion_text(completion))
        rewards.append(1.0 if found is not None and found == parse_number(str(answer)) else 0.0)
    return rewards

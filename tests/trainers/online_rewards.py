"""Reward functions the online-trainer tests load by file path (``tests/trainers/online_rewards.py:digits``)."""


def digits(prompts, completions, **columns):
    """The share of a completion's characters that are digits: something a random tiny model varies in."""
    return [sum(c.isdigit() for c in text) / max(1, len(text)) for text in completions]


def length(prompts, completions, **columns):
    """A completion's length in characters over 100: varies a lot between a random tiny model's samples, so
    advantages are non-zero and every step moves the weights."""
    return [len(text) / 100.0 for text in completions]


def matches_solution(prompts, completions, solution=None, **columns):
    """1.0 when the completion contains the record's solution, else 0.0."""
    return [float(str(s) in text) for text, s in zip(completions, solution)]

"""``aligner train self_rewarding`` with a scripted judge, for tiny random models whose judgements are noise.

The judgement text the model wrote still decides the score, deterministically (so two runs, or two parallel
layouts, that generate the same text get the same score), but through a rule instead of a regex:
``len(text) % 6`` on the 0-5 scale, and the meta-judge's winner is ``len(text) % 2``.

    python tests/trainers/self_rewarding_scripted_judge.py [overrides]     # also under torchrun
"""
import sys

from aligner.parallel.process_exit import exit_after
from aligner.trainers import judging, self_rewarding


def scripted_score(text, pattern, low, high):
    score = float(len(text) % 6)
    return score if low <= score <= high else None


def scripted_winner(text, pattern):
    return len(text) % 2


if __name__ == "__main__":
    judging.parse_score = scripted_score
    judging.parse_winner = scripted_winner
    exit_after(self_rewarding.main, sys.argv[1:])  # as the real entry points end (see process_exit.py)

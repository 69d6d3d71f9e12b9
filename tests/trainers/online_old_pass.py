"""``aligner train <algorithm> [overrides]`` with the no-grad forward for the old log-probs always run, as it is
when a rollout gets more than one optimizer step: the reference the one-step shortcut is tested against
(``tests/trainers/test_online_trainer.py``).

    python tests/trainers/online_old_pass.py grpo [overrides]
"""
import sys

from aligner.cli import run
from aligner.trainers import online

if __name__ == "__main__":
    online.old_from_training_forward = lambda settings: False
    run(["train", *sys.argv[1:]])

"""REINFORCE with a leave-one-out baseline (NeMo-Aligner's variant). Same as `aligner train reinforce`; works under torchrun and srun.

    python examples/train_reinforce.py                                  # conf/reinforce.yaml: SmolLM2 on the shipped arithmetic set
    torchrun --nproc_per_node 2 examples/train_reinforce.py parallel.tp=2
    python examples/train_reinforce.py data.train=prompts.jsonl reinforce.reward_funcs='[my_rewards:score]'
"""
import sys

from aligner.cli import run

if __name__ == "__main__":
    run(["train", "reinforce", *sys.argv[1:]])

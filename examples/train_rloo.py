"""RLOO (leave-one-out baseline over rloo.rloo_k samples, KL folded into the reward). Same as `aligner train rloo`; works under torchrun and srun.

    python examples/train_rloo.py                                  # conf/rloo.yaml: SmolLM2 on the shipped arithmetic set
    torchrun --nproc_per_node 2 examples/train_rloo.py parallel.tp=2
    python examples/train_rloo.py data.train=prompts.jsonl rloo.reward_funcs='[my_rewards:score]'
"""
import sys

from aligner.cli import run

if __name__ == "__main__":
    run(["train", "rloo", *sys.argv[1:]])

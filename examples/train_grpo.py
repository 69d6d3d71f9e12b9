"""GRPO (group-normalised advantages, clipped token loss; grpo.beta>0 adds a k3 KL term). Same as `aligner train grpo`; works under torchrun and srun.

    python examples/train_grpo.py                                  # conf/grpo.yaml: SmolLM2 on the shipped arithmetic set
    torchrun --nproc_per_node 2 examples/train_grpo.py parallel.tp=2
    python examples/train_grpo.py data.train=prompts.jsonl grpo.reward_funcs='[my_rewards:score]'
"""
import sys

from aligner.cli import run

if __name__ == "__main__":
    run(["train", "grpo", *sys.argv[1:]])

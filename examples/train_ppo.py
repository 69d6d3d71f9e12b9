"""PPO with policy, reference, reward and critic (value) models in one job. Same as `aligner train ppo`;
works under torchrun and srun.

    python examples/train_ppo.py model.path=SFT_DIR ppo.reward_model.path=RM_DIR data.train=prompts.jsonl
    torchrun --nproc_per_node 2 examples/train_ppo.py parallel.tp=2 ...
"""
import sys

from aligner.cli import run

if __name__ == "__main__":
    run(["train", "ppo", *sys.argv[1:]])

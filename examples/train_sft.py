"""Supervised fine-tuning. Same as `aligner train sft`; works under torchrun and srun.

    python examples/train_sft.py model.path=smollm2-135m-instruct data.train=examples/data/sft_train.jsonl
    torchrun --nproc_per_node 2 examples/train_sft.py parallel.dp_shard=2 ...
    python examples/train_sft.py my_config.yaml trainer.max_steps=100
"""
import sys

from aligner.cli import run

if __name__ == "__main__":
    run(["train", "sft", *sys.argv[1:]])

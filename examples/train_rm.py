"""Reward model (value head, Bradley-Terry). Same as `aligner train rm`; works under torchrun and srun.

    python examples/train_rm.py                                  # conf/rm.yaml: SmolLM2 on the shipped data
    torchrun --nproc_per_node 2 examples/train_rm.py parallel.tp=2
    python examples/train_rm.py model.path=DIR model.arch=null data.train=F.jsonl data.validation=V.jsonl
"""
import sys

from aligner.cli import run

if __name__ == "__main__":
    run(["train", "rm", *sys.argv[1:]])

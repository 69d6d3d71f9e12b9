"""KTO. Same as `aligner train kto`; works under torchrun and srun.

    python examples/train_kto.py                                  # conf/kto.yaml: SmolLM2 on the shipped data
    torchrun --nproc_per_node 2 examples/train_kto.py parallel.tp=2
    python examples/train_kto.py model.path=DIR model.arch=null data.train=F.jsonl data.validation=V.jsonl
"""
import sys

from aligner.cli import run

if __name__ == "__main__":
    run(["train", "kto", *sys.argv[1:]])

"""SimPO. Same as `aligner train simpo`; works under torchrun and srun.

    python examples/train_simpo.py                                  # conf/simpo.yaml: SmolLM2 on the shipped data
    torchrun --nproc_per_node 2 examples/train_simpo.py parallel.tp=2
    python examples/train_simpo.py model.path=DIR model.arch=null data.train=F.jsonl data.validation=V.jsonl
"""
import sys

from aligner.cli import run

if __name__ == "__main__":
    run(["train", "simpo", *sys.argv[1:]])

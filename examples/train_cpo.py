"""CPO. Same as `aligner train cpo`; works under torchrun and srun.

    python examples/train_cpo.py                                  # conf/cpo.yaml: SmolLM2 on the shipped data
    torchrun --nproc_per_node 2 examples/train_cpo.py parallel.tp=2
    python examples/train_cpo.py model.path=DIR model.arch=null data.train=F.jsonl data.validation=V.jsonl
"""
import sys

from aligner.cli import run

if __name__ == "__main__":
    run(["train", "cpo", *sys.argv[1:]])

"""DPO (dpo.loss_type=sigmoid|ipo|hinge, dpo.rpo_alpha). Same as `aligner train dpo`; works under torchrun and srun.

    python examples/train_dpo.py                                  # conf/dpo.yaml: SmolLM2 on the shipped data
    torchrun --nproc_per_node 2 examples/train_dpo.py parallel.tp=2
    python examples/train_dpo.py model.path=DIR model.arch=null data.train=F.jsonl data.validation=V.jsonl
"""
import sys

from aligner.cli import run

if __name__ == "__main__":
    run(["train", "dpo", *sys.argv[1:]])

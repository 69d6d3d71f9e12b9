"""Self-rewarding / meta-rewarding DPO with the model as its own judge. Same as `aligner train self_rewarding`;
works under torchrun and srun.

    python examples/train_self_rewarding.py                                  # conf/self_rewarding.yaml: SmolLM2
    python examples/train_self_rewarding.py self_rewarding.use_meta_judge=true self_rewarding.meta_judge_pcnt=0.125
    torchrun --nproc_per_node 2 examples/train_self_rewarding.py parallel.tp=2
    python examples/train_self_rewarding.py self_rewarding.judge_template=my_judge.jinja
"""
import sys

from aligner.cli import run

if __name__ == "__main__":
    run(["train", "self_rewarding", *sys.argv[1:]])

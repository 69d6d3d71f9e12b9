"""Sample responses to a prompts file. Same as `aligner generate`; works under torchrun and srun.

    python examples/generate.py data.prompts=prompts.jsonl output=out.jsonl generation.temperature=0
    python examples/generate.py model.path=/path/to/hf_dir data.prompts=p.jsonl generation.n=4 generation.seed=1
    torchrun --nproc_per_node 2 examples/generate.py data.prompts=p.jsonl parallel.tp=2
"""
import sys

from aligner.cli import run

if __name__ == "__main__":
    run(["generate", *sys.argv[1:]])

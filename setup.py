"""aligner: Megatron-style alignment of large language models in plain PyTorch."""
from setuptools import find_packages, setup

setup(
    name="aligner",
    version="0.1.0",
    description="Align LLMs (SFT, RM, DPO family, KTO, PPO, RLOO, GRPO, self-rewarding) with TP/PP/FSDP in plain PyTorch",
    packages=find_packages(include=["aligner", "aligner.*"]),
    # The judge prompt templates are data files inside aligner.judges (no MANIFEST.in: list them here).
    package_data={"aligner.judges": ["templates/*.jinja"]},
    python_requires=">=3.10",
    # torch is pinned in the Makefile (CPU wheel here, the container's build on GPUs); >= keeps either.
    install_requires=[
        "torch>=2.6",
        "numpy",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "gguf>=0.10",
        "hydra-core>=1.3",
        "omegaconf>=2.3",
        "jinja2>=3.1",
        "tqdm",
        "pyyaml",
    ],
    extras_require={
        # transformers is only the reference the tests and benchmarks compare against.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "transformers>=4.46", "accelerate", "psutil", "pyarrow", "datasets",
                 "tensorboard", "wandb"],
        "data": ["pyarrow", "datasets"],
        "wandb": ["wandb"],
        "tensorboard": ["tensorboard"],
        "trtllm": ["tensorrt_llm"],
        # bench/sft_step.py and bench/dpo_step.py measure against TRL's trainers (the version RESULTS.md used).
        "bench": ["trl==1.16.0", "transformers>=4.46", "accelerate", "datasets"],
    },
    entry_points={"console_scripts": ["aligner=aligner.cli:run"]},
    include_package_data=True,
)

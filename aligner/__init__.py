"""aligner: Megatron-style alignment of large language models in plain PyTorch."""

__version__ = "0.1.0"

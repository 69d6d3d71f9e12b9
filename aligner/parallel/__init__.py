"""Parallelism applied from outside the model: the mesh, TP/FSDP/AC plans, vocab-parallel losses, sharded loading."""
from aligner.parallel.activation_checkpoint import apply_activation_checkpointing
from aligner.parallel.fsdp import apply_fsdp
from aligner.parallel.loading import build_parallel_model, load_checkpoint_shards, seeded_init_
from aligner.parallel.mesh import ParallelDims, ParallelMesh, build_mesh, init_distributed
from aligner.parallel.parallelize import parallelize_model
from aligner.parallel.tensor_parallel import apply_tensor_parallel
from aligner.parallel.vocab_parallel import (cross_entropy, token_entropy, token_logprobs,
                                            token_logprobs_with_entropy)

__all__ = [
    "ParallelDims", "ParallelMesh", "apply_activation_checkpointing", "apply_fsdp", "apply_tensor_parallel",
    "build_mesh", "build_parallel_model", "cross_entropy", "init_distributed", "load_checkpoint_shards",
    "parallelize_model", "seeded_init_", "token_entropy", "token_logprobs",
    "token_logprobs_with_entropy",
]

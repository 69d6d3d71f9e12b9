"""The one entry point that turns a Transformer (or a pipeline stage of it) into its parallel form."""
from __future__ import annotations

import torch
from torch import nn

from aligner.parallel.activation_checkpoint import apply_activation_checkpointing
from aligner.parallel.fsdp import apply_fsdp
from aligner.parallel.mesh import ParallelMesh
from aligner.parallel.tensor_parallel import apply_tensor_parallel

MIXED_PRECISION = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parallelize_model(
    model: nn.Module,
    pmesh: ParallelMesh,
    *,
    activation_checkpointing: str = "none",
    ac_every_n: int = 2,
    mixed_precision: str = "float32",
    compile: bool = False,
    sequence_parallel: bool = True,
    loss_parallel: bool = True,
    reshard_after_forward: bool | None = None,
    cpu_offload: bool = False,
) -> nn.Module:
    """Apply TP, activation checkpointing, compile and FSDP to ``model`` in place, in that order.

    Works on meta-device models (build on ``meta``, parallelize, then ``to_empty`` and load) and on
    pipeline stages whose ``tok_embeddings``/``norm``/``output`` are None and whose ``layers`` hold a
    subset of the layers. Mesh dims of size 1 are skipped.

    Args:
        model: the Transformer or stage.
        pmesh: from :func:`aligner.parallel.build_mesh`.
        activation_checkpointing: ``none`` | ``full`` | ``selective`` (every ``ac_every_n``-th block).
        mixed_precision: compute dtype; ``bfloat16`` computes in bf16 over float32 master weights and
            reduces gradients in float32. It is carried by FSDP's policy, so with no data parallelism
            FSDP is still applied over the size-1 ``dp_shard`` mesh (its collectives are no-ops).
        compile: ``torch.compile`` each block (in place, names unchanged).
        sequence_parallel, loss_parallel: see :func:`aligner.parallel.tensor_parallel.apply_tensor_parallel`.
        reshard_after_forward: FSDP's choice; default True without pipeline parallelism and False with
            it (a stage runs several micro-batch forwards before their backwards).
        cpu_offload: FSDP CPU offload of parameters, gradients and optimizer state.

    Returns:
        ``model``.
    """
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision '{mixed_precision}' is not one of {', '.join(MIXED_PRECISION)}")
    dims = pmesh.dims
    # 1. Tensor parallel first: it replaces parameters by tp-sharded DTensors, which FSDP then shards
    #    further over dp (FSDP2 composes with TP only in this order: it shards the tp-local tensors).
    if dims.tp > 1:
        apply_tensor_parallel(model, pmesh["tp"], sequence_parallel=sequence_parallel, loss_parallel=loss_parallel)
    # 2. Activation checkpointing wraps the TP-annotated block forward, so the recompute replays the
    #    same collectives; it must sit inside FSDP's hooks so gathered parameters exist when it runs.
    apply_activation_checkpointing(model, activation_checkpointing, ac_every_n)
    # 3. Compile per block after AC (the checkpoint region is traced as part of the block) and before
    #    FSDP, whose hooks stay outside the compiled region.
    if compile:
        for block in model.layers.values():
            block.compile()
    # 4. FSDP last: it shards whatever parameters the steps above left, 2-D when TP already sharded them.
    # float32 means "compute in the parameters' own dtype" (a bf16 reference model stays bf16).
    compute_dtype = None if mixed_precision == "float32" else MIXED_PRECISION[mixed_precision]
    if dims.dp_shard > 1 or dims.dp_replicate > 1 or compute_dtype is not None:
        if reshard_after_forward is None:
            reshard_after_forward = dims.pp == 1
        apply_fsdp(model, pmesh.fsdp, param_dtype=compute_dtype, reduce_dtype=torch.float32,
                   reshard_after_forward=reshard_after_forward, cpu_offload=cpu_offload)
    return model

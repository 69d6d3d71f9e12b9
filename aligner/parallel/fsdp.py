"""Data parallelism through FSDP2 ``fully_shard``: ZeRO-3 sharding, HSDP, replication, mixed precision.

One mesh covers the three data-parallel layouts:

* 1-D ``dp_shard`` mesh: parameters, gradients and optimizer state sharded over all ranks (FSDP).
* 2-D ``(dp_replicate, dp_shard)`` mesh: sharded inside a group, replicated across groups (HSDP);
  gradients are reduce-scattered inside the group, then all-reduced across groups.
* 2-D with ``dp_shard=1``: plain replication (DDP-like). The same ``fully_shard`` call handles it, a
  shard group of one holds the whole tensor, so replication, HSDP and FSDP share one code path,
  one parameter type (DTensor) and one checkpoint format; this also runs on gloo, which torch's
  separate ``replicate`` API is not tested against.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard


def apply_fsdp(
    model: nn.Module,
    fsdp_mesh: DeviceMesh,
    *,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
) -> nn.Module:
    """Wrap each TransformerBlock, then the root, with ``fully_shard`` over ``fsdp_mesh``, in place.

    Args:
        model: a Transformer (or pipeline stage), possibly already tensor-parallel: its DTensor
            parameters on the ``tp`` mesh become 2-D (dp x tp) DTensors.
        fsdp_mesh: ``ParallelMesh.fsdp``: 1-D ``dp_shard`` (FSDP) or 2-D ``(dp_replicate, dp_shard)``.
        param_dtype: compute dtype of the all-gathered parameters (bfloat16 for mixed precision;
            None keeps the parameters' own dtype).
        reduce_dtype: gradient reduction dtype (float32: sums of many bf16 gradients lose bits).
        reshard_after_forward: free gathered blocks after forward (ZeRO-3) or keep them until backward
            (ZeRO-2-like: more memory, one all-gather fewer; pipeline schedules want False because a
            stage runs forward for several micro-batches before their backwards).
        cpu_offload: keep sharded parameters, gradients and optimizer state in CPU memory.

    The root group holds the embeddings, final norm and LM head: a tied embedding and head share one
    parameter, and splitting them into separate groups would untie them. The root is kept gathered
    after forward because backward starts with it.
    """
    # The sharded parameters keep their own dtype (float32 master weights for the optimizer); only
    # the all-gathered copy used for compute is cast. bf16 compute with float32 reduction works on
    # nccl and on gloo alike (torch 2.13's gloo even sums bf16), so CPU runs need no fallback.
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    # Pinned host memory needs CUDA; on a CPU-only job offloading is a no-op anyway.
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    for block in model.layers.values():
        fully_shard(block, mesh=fsdp_mesh, mp_policy=mp, offload_policy=offload,
                    reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=fsdp_mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=False)
    return model

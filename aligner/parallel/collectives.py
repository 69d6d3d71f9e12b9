"""The few cross-rank agreements the training loop needs, so trainers never call torch.distributed."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank (e.g. a preemption signal seen by one)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def sum_over(values: torch.Tensor | float, mesh: DeviceMesh | None = None) -> torch.Tensor:
    """Sum ``values`` over the ranks of ``mesh`` (all ranks when None); float64 on CPU, same on every rank."""
    t = torch.as_tensor(values, dtype=torch.float64).clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        group = mesh.get_group() if mesh is not None else None
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def gather_objects(obj: Any, mesh: DeviceMesh | None = None) -> list[Any]:
    """Every rank's picklable ``obj`` over the ranks of ``mesh`` (all ranks when None), in rank order."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    group = mesh.get_group() if mesh is not None else None
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out

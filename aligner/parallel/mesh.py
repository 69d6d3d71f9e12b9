"""Process-group start-up and the one DeviceMesh with named dims ``pp, dp_replicate, dp_shard, tp``.

Works the same under ``torchrun`` (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT), under
Slurm's ``srun`` (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID/SLURM_JOB_NODELIST) and as a plain single
process. ``nccl`` on GPUs, ``gloo`` on CPU.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass
class ParallelDims:
    """Sizes of the four parallel dims; their product is the world size.

    ``dp_shard=-1`` takes whatever the other dims leave of the world size (FSDP over the rest).
    """

    dp_replicate: int = 1
    dp_shard: int = -1
    pp: int = 1
    tp: int = 1
    world_size: int = 1

    def __post_init__(self) -> None:
        for name in ("dp_replicate", "pp", "tp"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name}={getattr(self, name)} must be >= 1")
        others = self.dp_replicate * self.pp * self.tp
        if self.dp_shard == -1:
            if self.world_size % others:
                raise ValueError(
                    f"world size {self.world_size} is not divisible by parallel.dp_replicate * parallel.pp * "
                    f"parallel.tp = {others}; choose sizes whose product divides the number of processes"
                )
            self.dp_shard = self.world_size // others
        if self.dp_shard < 1:
            raise ValueError(f"parallel.dp_shard={self.dp_shard} must be >= 1 (or -1 to fill the world)")
        if others * self.dp_shard != self.world_size:
            raise ValueError(
                f"parallel.dp_replicate({self.dp_replicate}) * parallel.dp_shard({self.dp_shard}) * "
                f"parallel.pp({self.pp}) * parallel.tp({self.tp}) = {others * self.dp_shard}, but the job has "
                f"{self.world_size} processes; make the product equal the world size"
            )

    @property
    def dp(self) -> int:
        """Total data-parallel degree (replicas times shards): the number of distinct batches."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp_shard > 1

    def sizes(self) -> tuple[int, ...]:
        return tuple(getattr(self, d) for d in MESH_DIMS)


def _first_slurm_host(nodelist: str) -> str:
    """First host name of a Slurm nodelist such as ``gpu[012-015,020],cpu1`` (no scontrol needed)."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if m is None:
        raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r} could not be parsed")
    prefix, ranges = m.group(1), m.group(2)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _env_from_slurm() -> None:
    """Translate Slurm's variables into torchrun's so that ``srun python train.py`` just works."""
    env = os.environ
    env.setdefault("RANK", env["SLURM_PROCID"])
    env.setdefault("WORLD_SIZE", env["SLURM_NTASKS"])
    env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
    env.setdefault("MASTER_ADDR", _first_slurm_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "localhost"))))
    # A port derived from the job id keeps concurrent jobs on the same node apart.
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str | None = None) -> tuple[int, int]:
    """Start the default process group once, from torchrun or Slurm variables; returns (rank, world).

    A plain ``python script.py`` becomes a world of one on loopback, so the same code path (DTensor,
    DCP) runs everywhere.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        _env_from_slurm()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "RANK" not in os.environ:
        # A world of one on a private loopback store. Nothing goes into os.environ: child processes
        # (torchrun launches, tests) must not inherit a rendezvous that points at this process.
        dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    else:
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"


@dataclass
class ParallelMesh:
    """The 4-D mesh, its sizes, and the flattened data-parallel mesh (kept here, not re-sliced)."""

    dims: ParallelDims
    mesh: DeviceMesh
    dp: DeviceMesh  # dp_replicate x dp_shard flattened: ranks that see different batches

    def __getitem__(self, name: str) -> DeviceMesh:
        """A named sub-mesh: ``pp``, ``dp_replicate``, ``dp_shard``, ``tp`` or ``dp``."""
        return self.dp if name == "dp" else self.mesh[name]

    @property
    def fsdp(self) -> DeviceMesh:
        """Mesh that ``fully_shard`` takes: 2-D ``(dp_replicate, dp_shard)`` is HSDP, replicate=1 plain FSDP."""
        if self.dims.dp_replicate > 1:
            return self.mesh["dp_replicate", "dp_shard"]
        return self.mesh["dp_shard"]


def build_mesh(dims: ParallelDims) -> ParallelMesh:
    """The 4-D mesh ``(pp, dp_replicate, dp_shard, tp)`` plus the flattened ``dp`` mesh for data loading.

    Size-1 dims are kept so that code can always ask for ``mesh["tp"]`` and friends.
    """
    mesh = init_device_mesh(device_type(), dims.sizes(), mesh_dim_names=MESH_DIMS)
    dp = mesh["dp_replicate", "dp_shard"]._flatten("dp")
    return ParallelMesh(dims=dims, mesh=mesh, dp=dp)

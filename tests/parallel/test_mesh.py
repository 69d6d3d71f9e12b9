"""ParallelDims arithmetic and errors, and the Slurm -> torchrun variable translation."""
import os

import pytest

from aligner.parallel.mesh import ParallelDims, _env_from_slurm, _first_slurm_host


def test_dp_shard_fills_the_world():
    dims = ParallelDims(tp=2, pp=2, dp_replicate=1, dp_shard=-1, world_size=16)
    assert (dims.pp, dims.dp_replicate, dims.dp_shard, dims.tp) == (2, 1, 4, 2)
    assert dims.dp == 4 and dims.fsdp_enabled
    assert dims.sizes() == (2, 1, 4, 2)


def test_layout_that_does_not_fill_the_world_names_every_dim():
    with pytest.raises(ValueError, match=r"parallel.dp_replicate\(1\) \* parallel.dp_shard\(2\) \* parallel.pp\(1\) "
                                         r"\* parallel.tp\(2\) = 4, but the job has 8 processes"):
        ParallelDims(tp=2, dp_shard=2, world_size=8)
    with pytest.raises(ValueError, match="world size 6 is not divisible by .* = 4"):
        ParallelDims(tp=4, world_size=6)
    with pytest.raises(ValueError, match="parallel.tp=0 must be >= 1"):
        ParallelDims(tp=0, world_size=1)


@pytest.mark.parametrize("nodelist, first", [("gpu[012-015,020],cpu1", "gpu012"), ("node7", "node7"),
                                             ("a[3,5]", "a3"), ("h100-[1-4]", "h100-1")])
def test_first_slurm_host(nodelist, first):
    assert _first_slurm_host(nodelist) == first


def test_slurm_variables_become_torchrun_variables(monkeypatch):
    # A private copy of the environment: the variables set here must not leak into later tests,
    # where a RANK would make init_distributed wait for a rendezvous that never comes.
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(SLURM_PROCID="13", SLURM_NTASKS="16", SLURM_LOCALID="5", SLURM_JOB_NODELIST="gpu[007-008]",
               SLURM_JOB_ID="123456")
    monkeypatch.setattr(os, "environ", env)
    _env_from_slurm()
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("13", "16", "5")
    assert env["MASTER_ADDR"] == "gpu007"
    assert env["MASTER_PORT"] == str(20000 + 123456 % 20000)

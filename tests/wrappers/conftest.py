import sys
from pathlib import Path

import pytest
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent / "workers"))


@pytest.fixture(scope="session")
def single_process_mesh():
    """A world of one process in this pytest process (gloo on loopback), for single-process references."""
    from aligner.parallel import ParallelDims, build_mesh, init_distributed

    init_distributed("gloo")
    if dist.get_world_size() != 1:
        pytest.skip("the single-process references need a world of one process")
    return build_mesh(ParallelDims(world_size=1))

"""torchrun worker (one process, NCCL on a GPU): optimizer offload moves AdamW state between the GPU and
the CPU, for plain parameters and for FSDP's DTensor parameters (bf16 mixed precision), and training is
bit-identical with and without it. Prints one ``OK <case>`` line per case."""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from policy_common import TOTAL_STEPS, TokenLoss, full_weights, job_config, make_batch  # noqa: E402

from aligner.parallel import ParallelDims, build_mesh, init_distributed  # noqa: E402
from aligner.wrappers import PolicyModel  # noqa: E402
from aligner.wrappers.optimizer import optimizer_state_devices  # noqa: E402
from aligner.parallel.process_exit import end_process  # noqa: E402


def train(pmesh, offload: bool, mixed_precision: str):
    policy = PolicyModel(job_config(optimizer_offload=offload, mixed_precision=mixed_precision), pmesh)
    policy.set_total_steps(TOTAL_STEPS)
    metrics = []
    for step in range(3):
        policy.prepare_for_training()
        assert optimizer_state_devices(policy.optimizer) <= {"cuda"}, optimizer_state_devices(policy.optimizer)
        metrics.append(policy.train_step(make_batch(step), TokenLoss()))
        assert optimizer_state_devices(policy.optimizer) == {"cuda"}
        policy.finish_training()
        assert optimizer_state_devices(policy.optimizer) == ({"cpu"} if offload else {"cuda"})
    state = next(iter(policy.optimizer.state.values()))["exp_avg"]
    return metrics, full_weights(policy), isinstance(state, DTensor), policy.state_dict()


def main() -> None:
    assert torch.cuda.is_available()
    init_distributed()
    assert dist.get_backend() == "nccl"
    pmesh = build_mesh(ParallelDims(world_size=1))
    for mixed_precision in ("float32", "bfloat16"):
        m0, w0, dtensor, _ = train(pmesh, False, mixed_precision)
        m1, w1, _, sd = train(pmesh, True, mixed_precision)
        assert dtensor == (mixed_precision == "bfloat16")  # bf16 goes through FSDP: DTensor state
        assert m0 == m1, (m0, m1)
        assert all(torch.equal(w0[k], w1[k]) for k in w0)
        assert {v.device.type for k, v in sd["optimizer"].items() if k.endswith("exp_avg")} == {"cpu"}
        print(f"OK {mixed_precision} offload: loss {[round(m['loss'], 5) for m in m1]}", flush=True)
    end_process()  # barrier, destroy, os._exit: see aligner/parallel/process_exit.py


if __name__ == "__main__":
    main()

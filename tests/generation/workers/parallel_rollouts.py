"""torchrun worker: PolicyModel.generate at TP=2, dp_shard=2 (FSDP) and PP=2 layouts, before and after a step.

Usage: ``parallel_rollouts.py OUT_DIR CASES.json``. For each case (a ``parallel`` layout plus options) it
builds a PolicyModel and, on this data-parallel rank's share of the prompts, records:

- greedy rollouts, and seeded sampling (n=2);
- unseeded sampling of the SAME two prompts on every rank (tp ranks must agree, dp ranks must differ);
- the FSDP state after the rollouts (every parameter sharded again, ``reshard_after_forward`` as before);
- the KV heads this rank's cache held, and whether the PP copy was freed by ``finish_inference``;
- one training step's metrics, then greedy rollouts again (the refit), and the full weights after the step.

Each rank saves ``OUT_DIR/<case>.rank<R>.pt``.
"""
import json
import sys
from pathlib import Path

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout_common import (  # noqa: E402
    TokenLoss, as_dict, dp_share, eos_id, full_weights, generation_config, greedy, job_config, make_batch,
    prompt_share, prompts, seeded)

from aligner.generation.parallel import _reshards_after_forward  # noqa: E402
from aligner.parallel import ParallelDims, build_mesh, init_distributed  # noqa: E402
from aligner.parallel.process_exit import end_process  # noqa: E402
from aligner.wrappers import PolicyModel  # noqa: E402


def fsdp_flags(policy) -> list[bool]:
    return [_reshards_after_forward(m) for m in policy.model.modules() if isinstance(m, FSDPModule)]


def all_sharded(policy) -> bool:
    """Every parameter is FSDP's sharded DTensor (this rank holds half of it), none a gathered tensor."""
    params = list(policy.model.parameters())
    return all(isinstance(p, DTensor) and p.to_local().numel() * 2 <= p.numel() + 1 for p in params)


def run_case(name: str, case: dict, out_dir: Path, rank: int, world: int) -> None:
    cfg = job_config(case["layout"], tied=case.get("tied", False))
    p = cfg.parallel
    pmesh = build_mesh(ParallelDims(dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, pp=p.pp, tp=p.tp,
                                    world_size=world))
    policy = PolicyModel(cfg, pmesh)
    policy.set_total_steps(4)
    policy.configure_generation(generation_config(), tokenizer=[eos_id()])
    share = prompt_share(prompts(), policy.dp_rank, policy.dp_size)
    flags_before = fsdp_flags(policy)

    policy.prepare_for_inference()
    before = policy.generate(share, greedy())
    sampled = policy.generate(share, seeded())
    unseeded = policy.generate(prompts()[:2], seeded(seed=None))
    inner = policy.rollout.engine.inner
    # TorchEngine's caches (private, read for this check only): KV heads this rank holds.
    kv_heads = next(iter(inner._caches.values())).k.shape[1]
    resharded, flags_after = all_sharded(policy), fsdp_flags(policy)
    policy.finish_inference()
    copy = policy.rollout.engine.full_copy
    copy_bytes_offloaded = None if copy is None else sum(t.untyped_storage().nbytes() for t in copy.parameters())

    policy.prepare_for_training()
    metrics = policy.train_step(dp_share(make_batch(0), policy.dp_rank, policy.dp_size), TokenLoss())
    policy.finish_training()
    policy.prepare_for_inference()
    after = policy.generate(share, greedy())
    policy.finish_inference()

    torch.save({"before": as_dict(before), "sampled": as_dict(sampled), "unseeded": as_dict(unseeded),
                "after": as_dict(after), "metrics": metrics, "weights": full_weights(policy),
                "kv_heads": kv_heads, "resharded": resharded, "fsdp_flags": (flags_before, flags_after),
                "copy_bytes_offloaded": copy_bytes_offloaded, "dp_rank": policy.dp_rank, "dp_size": policy.dp_size,
                "tp_rank": pmesh["tp"].get_local_rank()},
               out_dir / f"{name}.rank{rank}.pt")


def main() -> None:
    out_dir, cases = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    rank, world = init_distributed("gloo")
    for name, case in cases.items():
        run_case(name, case, out_dir, rank, world)
    end_process()  # barrier, destroy, os._exit: see aligner/parallel/process_exit.py


if __name__ == "__main__":
    main()

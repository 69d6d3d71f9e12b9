"""torchrun worker: PolicyModel training steps at several parallel layouts.

Usage: ``policy_layouts.py OUT_DIR CASES.json``. For each case (a ``parallel`` layout plus options) it
builds a PolicyModel, runs two training steps on this rank's share of fixed global batches, saves a DCP
checkpoint ``OUT_DIR/<case>.dcp``, then runs a third step both straight on and in a fresh model loaded
from the state dict; eval_step and forward run on a held-out batch after the two steps. Each rank saves ``OUT_DIR/<case>.rank<R>.pt``: the returned metrics, the full
weights of the parameters it holds after two steps, the state-dict keys, the metrics on every rank (to
check they agree) and the two third steps.
"""
import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from policy_common import (  # noqa: E402
    TOTAL_STEPS, TokenLoss, dp_share, evaluate, full_weights, job_config, make_batch, run_steps, state_dict_keys)

from aligner.parallel import ParallelDims, build_mesh, init_distributed  # noqa: E402
from aligner.parallel.process_exit import end_process  # noqa: E402
from aligner.wrappers import PolicyModel  # noqa: E402


def run_case(name: str, case: dict, out_dir: Path, rank: int, world: int) -> None:
    cfg = job_config(case["layout"], micro_batch_size=case.get("micro_batch_size", 1), tied=case.get("tied", False))
    p = cfg.parallel
    pmesh = build_mesh(ParallelDims(dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, pp=p.pp, tp=p.tp,
                                    world_size=world))
    policy = PolicyModel(cfg, pmesh)
    metrics = run_steps(policy, steps=2)
    weights = full_weights(policy)
    evaluated = evaluate(policy)
    # A DCP checkpoint that the test loads at the single-process layout.
    dcp.save(policy.state_dict(), checkpoint_id=out_dir / f"{name}.dcp")
    # In memory: the third step straight on, and in a fresh model loaded from the state dict.
    saved = copy.deepcopy(policy.state_dict())
    third = dp_share(make_batch(2), policy.dp_rank, policy.dp_size)
    straight = policy.train_step(third, TokenLoss())
    resumed_policy = PolicyModel(cfg, pmesh)
    resumed_policy.set_total_steps(TOTAL_STEPS)
    resumed_policy.load_state_dict(saved)
    resumed = resumed_policy.train_step(third, TokenLoss())
    same_weights = all(torch.equal(a, b) for a, b in zip(full_weights(policy).values(),
                                                           full_weights(resumed_policy).values()))
    # Every rank's metrics, so the test can check they are identical everywhere.
    everyone = [None] * world
    dist.all_gather_object(everyone, metrics)
    torch.save({"metrics": metrics, "all_ranks_metrics": everyone, "weights": weights,
                "keys": state_dict_keys(policy), "third_step": straight, "resumed_third_step": resumed,
                "resumed_weights_equal": same_weights, **evaluated}, out_dir / f"{name}.rank{rank}.pt")


def main() -> None:
    out_dir, cases = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    rank, world = init_distributed("gloo")
    for name, case in cases.items():
        run_case(name, case, out_dir, rank, world)
    end_process()  # barrier, destroy, os._exit: see aligner/parallel/process_exit.py


if __name__ == "__main__":
    main()

"""torchrun worker: save a training checkpoint at one parallel layout, load it at others.

``reshard.py save OUT RESULTS`` (2 processes, TP=2): two training steps, save_checkpoint at step 2,
then record the RNG draws right after the save, the full weights, AdamW moments and LR, and the
loss and weights after a third step.

``reshard.py load OUT RESULTS LAYOUTS_JSON``: for each layout (e.g. ``[{"tp": 2}, {"dp_shard": 2}]``)
build the model with a different init, load the latest checkpoint of OUT, and record the same
things (RNG draws right after the load). Rank 0 writes RESULTS with torch.save.
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ckpt_train_state as ts  # noqa: E402
from helpers import tiny_config  # noqa: E402  (ckpt_train_state put tests/ on the path)

from aligner.checkpoint import find_resume_checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from aligner.checkpoint.rng import seed_all  # noqa: E402
from aligner.parallel import ParallelDims, build_mesh, build_parallel_model, init_distributed  # noqa: E402
from aligner.parallel.process_exit import end_process  # noqa: E402


def build(layout: dict, world: int, seed: int):
    pm = build_mesh(ParallelDims(world_size=world, **layout))
    model = build_parallel_model(tiny_config(), pm, seed=seed)
    optimizer, scheduler = ts.build_optimizer(model)
    return pm, model, optimizer, scheduler


def step(pm, model, optimizer, scheduler, n: int) -> float:
    """Training step ``n``; returns the loss summed over the whole batch (identical on every rank)."""
    local = torch.tensor(ts.train_step(model, optimizer, scheduler, n, pm["dp"].get_local_rank(), pm.dims.dp),
                         dtype=torch.float64)
    dist.all_reduce(local, group=pm["dp"].get_group())
    return float(local)


def snapshot(pm, model, optimizer, scheduler, extra=None) -> dict:
    """RNG draws of every rank (taken first), full weights and moments, LR, and the next step's result."""
    draws = [None] * dist.get_world_size()
    dist.all_gather_object(draws, ts.random_draws())
    result = {"draws": draws, "weights": ts.full_weights(model), "moments": ts.full_optimizer_state(model, optimizer),
              "lr": scheduler.get_last_lr(), "extra": extra}
    result["loss_3"] = step(pm, model, optimizer, scheduler, 3)
    result["weights_3"] = ts.full_weights(model)
    return result


def main() -> None:
    mode, out, results_file = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    rank, world = init_distributed("gloo")
    if mode == "save":
        seed_all(100 + rank)  # a different random stream on every rank
        pm, model, optimizer, scheduler = build({"tp": 2}, world, seed=0)
        losses = [step(pm, model, optimizer, scheduler, n) for n in (1, 2)]
        save_checkpoint(out, 2, ts.app_state(model, optimizer, scheduler), {"consumed_samples": 8, "losses": losses},
                        keep_last=2)
        results = snapshot(pm, model, optimizer, scheduler)
    else:
        results = {}
        for layout in json.loads(sys.argv[4]):
            pm, model, optimizer, scheduler = build(layout, world, seed=7)  # weights the load must overwrite
            seed_all(555)
            extra = load_checkpoint(find_resume_checkpoint(out, "auto"), ts.app_state(model, optimizer, scheduler))
            results[json.dumps(layout)] = snapshot(pm, model, optimizer, scheduler, extra)
    if rank == 0:
        torch.save(results, results_file)
    end_process()  # barrier, destroy, os._exit: see aligner/parallel/process_exit.py


if __name__ == "__main__":
    main()

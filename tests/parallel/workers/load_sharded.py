"""torchrun worker: load HF checkpoints shard by shard and report memory and what was loaded.

Usage: ``load_sharded.py BIG_CKPT TINY_CKPT TINY_TIED_CKPT TINY_VALUE_CKPT OUT_DIR``.

1. Under TP=2, load the ~250M-parameter bf16 ``BIG_CKPT`` and measure this process's peak resident
   memory increase while doing it (``VmHWM`` after resetting it through ``/proc/self/clear_refs``);
   save each parameter's local shard with the slice of the global tensor it claims to be.
2. Load ``TINY_CKPT`` (Qwen2-style, untied) under TP=2, ``TINY_TIED_CKPT`` under FSDP (dp_shard=2)
   and TP=2, and the value model ``TINY_VALUE_CKPT`` under TP=2, and save the outputs for a fixed
   batch for comparison with single-process loading.
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from aligner.parallel import ParallelDims, build_mesh, build_parallel_model, init_distributed
from aligner.parallel.loading import local_shard_index
from aligner.parallel.process_exit import end_process


def memory_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def tiny_logits(path: str, pm, **options) -> torch.Tensor:
    model = build_parallel_model(path, pm, **options)
    tokens = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = model(tokens)
    return logits.full_tensor() if isinstance(logits, DTensor) else logits


def main() -> None:
    big, tiny, tiny_tied, tiny_value, out_dir = sys.argv[1:6]
    rank, world = init_distributed("gloo")
    tp_mesh = build_mesh(ParallelDims(world_size=world, tp=world))
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
    baseline = memory_kib("VmRSS")
    model = build_parallel_model(big, tp_mesh, dtype="bfloat16")
    peak = memory_kib("VmHWM")
    shards = {}
    for name, param in model.named_parameters():
        local, index = local_shard_index(param)
        shards[name] = ([(s.start, s.stop) for s in index], local.detach().clone())
    local_bytes = sum(t.numel() * t.element_size() for _, t in shards.values())
    torch.save(shards, Path(out_dir) / f"shards_rank{rank}.pt")
    del model, shards

    dp_mesh = build_mesh(ParallelDims(world_size=world, dp_shard=world))
    logits = {
        "tiny_tp": tiny_logits(tiny, tp_mesh, loss_parallel=False),
        "tiny_tied_fsdp": tiny_logits(tiny_tied, dp_mesh),
        "tiny_tied_tp": tiny_logits(tiny_tied, tp_mesh),
        "tiny_value_tp": tiny_logits(tiny_value, tp_mesh),
    }
    stats = {"rank": rank, "baseline_kib": baseline, "peak_kib": peak, "local_param_bytes": local_bytes}
    (Path(out_dir) / f"stats_rank{rank}.json").write_text(json.dumps(stats))
    if rank == 0:
        torch.save(logits, Path(out_dir) / "tiny_logits.pt")
    end_process()  # barrier, destroy, os._exit: see aligner/parallel/process_exit.py


if __name__ == "__main__":
    main()

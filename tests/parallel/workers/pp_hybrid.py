"""4-process worker: pipeline parallel composed with tensor or data parallel, one launch for both layouts.

Usage: torchrun --nproc_per_node 4 pp_hybrid.py OUT   (writes OUT.rank{r}.pt)
Cases: pp=2 x tp=2 (tied embeddings, left-padded batch, vocab-parallel loss) and pp=2 x dp_shard=2 (FSDP).
Models come from build_parallel_model with the per-name seeded init, cut by stage_fns_this_rank.
Each case also checks that gradients accumulate across train steps at new input shapes.
"""
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from aligner.parallel import ParallelDims, build_mesh, build_parallel_model, init_distributed
from aligner.parallel.pipeline import PipelineRunner, stage_fns_this_rank, sync_tied_weights, tied_embedding_group
from aligner.parallel.process_exit import end_process
from pp_common import (N_MICROBATCHES, build_optimizer, make_batch, token_logprobs_vocab_parallel,
                       token_loss_share_vocab_parallel)
from tests.helpers import tiny_config

CASES = {  # name: (layout, tie_word_embeddings, padded)
    "pp2_tp2": (dict(pp=2, tp=2, dp_shard=1), True, True),
    "pp2_dp2": (dict(pp=2, dp_shard=2), False, False),
}


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def run_case(world: int, layout: dict, tied: bool, padded: bool) -> dict:
    pmesh = build_mesh(ParallelDims(world_size=world, **layout))
    cfg = tiny_config(tie_word_embeddings=tied)
    (cut,) = stage_fns_this_rank(cfg.num_hidden_layers, pmesh["pp"].get_local_rank(), pmesh.dims.pp)
    stage = build_parallel_model(cfg, pmesh, seed=0, stage_fn=cut)
    tied_group = tied_embedding_group(pmesh)
    # The per-name init draws the last stage's copy under the name output.weight: copy the embedding over.
    sync_tied_weights([stage], tied_group)
    runner = PipelineRunner([stage], pmesh["pp"], N_MICROBATCHES, schedule="1F1B", tied_group=tied_group)
    batch = make_batch(seed=1, padded=padded)
    dp, dp_rank = pmesh.dims.dp, pmesh["dp"].get_local_rank()
    rows = slice(dp_rank * 8 // dp, (dp_rank + 1) * 8 // dp)
    local = {k: (v[rows] if v.dim() else v) for k, v in batch.items()}
    local["loss_scale"] = dp  # FSDP averages gradients over dp; the loss shares sum over dp
    loss, metrics = runner.train_step(local, token_loss_share_vocab_parallel)
    loss = loss / dp
    dist.all_reduce(loss, group=pmesh["dp"].get_group())  # global loss = sum of the dp shares
    grads = {n: full(p.grad).clone() for n, p in stage.named_parameters()}
    logprobs = runner.forward(local, token_logprobs_vocab_parallel)
    build_optimizer(stage.parameters()).step()
    weights = {n: full(p).detach().clone() for n, p in stage.named_parameters()}
    return dict(loss=loss, grads=grads, weights=weights, logprobs=logprobs, rows=(rows.start, rows.stop),
                stage_index=stage.pipeline_stage.stage_index,
                accumulation_error=accumulation_error(runner, stage, local))


def accumulation_error(runner: PipelineRunner, stage, batch: dict) -> float:
    """Gradients accumulate over train steps although a new input shape makes torch re-infer the stage
    shapes (which clears FSDP gradients) and a no-grad forward comes in between: max |g(a then b) - g(a) - g(b)|."""
    # Two sequence lengths this runner has not seen: each builds a new schedule.
    seq8 = {k: (v[:, :8] if isinstance(v, torch.Tensor) and v.dim() else v) for k, v in batch.items()}
    seq10 = {k: (v[:, :10] if isinstance(v, torch.Tensor) and v.dim() else v) for k, v in batch.items()}

    def grads_after(*steps):
        for p in stage.parameters():
            p.grad = None
        for step in steps:
            step()
        return {n: full(p.grad).clone() for n, p in stage.named_parameters()}

    g_both = grads_after(lambda: runner.train_step(batch, token_loss_share_vocab_parallel),
                         lambda: runner.forward(seq8, token_logprobs_vocab_parallel),
                         lambda: runner.train_step(seq10, token_loss_share_vocab_parallel))
    g_a = grads_after(lambda: runner.train_step(batch, token_loss_share_vocab_parallel))
    g_b = grads_after(lambda: runner.train_step(seq10, token_loss_share_vocab_parallel))
    return max((g_both[n] - g_a[n] - g_b[n]).abs().max().item() for n in g_both)


def main(out: str) -> None:
    rank, world = init_distributed()
    results = {name: run_case(world, *case) for name, case in CASES.items()}
    torch.save(results, f"{out}.rank{rank}.pt")
    end_process()  # barrier, destroy, os._exit: see aligner/parallel/process_exit.py


if __name__ == "__main__":
    main(sys.argv[1])

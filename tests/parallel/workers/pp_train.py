"""PP=2 worker: one launch runs several pipeline cases and saves, per rank, what its stage computed.

Usage: torchrun --nproc_per_node 2 pp_train.py OUT CHECKPOINT   (writes OUT.rank{r}.pt)
Cases: 1F1B and GPipe on an untied model, 1F1B on a tied-embedding model, 1F1B on a left-padded batch,
Interleaved1F1B (2 stages per rank) on a tied model with a padded batch, and 1F1B on stages that
build_parallel_model loads from CHECKPOINT (the tied model saved in Hugging Face format).
"""
import sys

import torch

from aligner.parallel.loading import build_parallel_model
from aligner.parallel.mesh import ParallelDims, build_mesh, init_distributed
from aligner.parallel.pipeline import (PipelineRunner, stage_fns_this_rank, stages_per_rank, sync_tied_weights,
                                       tied_embedding_group)
from aligner.parallel.process_exit import end_process
from pp_common import N_MICROBATCHES, build_optimizer, make_batch, token_logprobs, token_loss_share
from tests.helpers import tiny_model

CASES = {  # name: (schedule, tie_word_embeddings, padded); Interleaved1F1B holds 2 stages per rank
    "1f1b": ("1F1B", False, False),
    "gpipe": ("GPipe", False, False),
    "tied": ("1F1B", True, False),
    "padded": ("1F1B", False, True),
    "interleaved": ("Interleaved1F1B", True, True),
    "checkpoint": ("1F1B", True, False),
}


def run_case(pmesh, tied_group, schedule: str, tied: bool, padded: bool, checkpoint: str | None = None) -> dict:
    cuts = stage_fns_this_rank(4, pmesh["pp"].get_local_rank(), 2, num_stages_per_rank=stages_per_rank(schedule))
    if checkpoint is not None:  # each stage reads only its own tensors; the last reads the tied head as the embedding
        stages = [build_parallel_model(checkpoint, pmesh, stage_fn=cut) for cut in cuts]
    else:
        stages = [cut(tiny_model(seed=0, tie_word_embeddings=tied)) for cut in cuts]
        # Perturb the copy on the last stage: sync_tied_weights must restore the first stage's values.
        for stage in stages:
            if tied and stage.pipeline_stage.is_last:
                with torch.no_grad():
                    stage.output.weight.add_(1.0)
        sync_tied_weights(stages, tied_group)
    runner = PipelineRunner(stages, pmesh["pp"], N_MICROBATCHES, schedule=schedule, tied_group=tied_group)
    params = {n: p for stage in stages for n, p in stage.named_parameters()}
    batch = make_batch(seed=1, padded=padded)
    loss, metrics = runner.train_step(batch, token_loss_share)
    grads = {n: p.grad.clone() for n, p in params.items()}
    logprobs = runner.forward(batch, token_logprobs)
    build_optimizer(params.values()).step()
    weights = {n: p.detach().clone() for n, p in params.items()}
    # A second step at the same shape reuses the cached schedule and sees the updated weights.
    for p in params.values():
        p.grad = None
    loss_after, _ = runner.train_step(batch, token_loss_share)
    return dict(loss=loss, metrics=metrics, grads=grads, logprobs=logprobs, weights=weights, loss_after=loss_after,
                layers=[name for stage in stages for name in stage.layers.keys()])


def main(out: str, checkpoint: str) -> None:
    rank, world = init_distributed()
    torch.manual_seed(0)
    pmesh = build_mesh(ParallelDims(pp=2, dp_shard=1, world_size=world))
    tied_group = tied_embedding_group(pmesh)
    results = {name: run_case(pmesh, tied_group, *case, checkpoint=checkpoint if name == "checkpoint" else None)
               for name, case in CASES.items()}
    torch.save(results, f"{out}.rank{rank}.pt")
    end_process()  # barrier, destroy, os._exit: see aligner/parallel/process_exit.py


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

"""torchrun worker: vocab-parallel log-probs, entropy and cross-entropy on vocab-sharded DTensor logits.

Usage: ``tp_vocab_parallel.py OUT.pt``. Every rank builds the same full logits, shards them over the
vocab dim of a tp mesh (even and uneven vocab sizes, float32 and bfloat16), computes the three
quantities and the gradient of a weighted sum of them, and records which collectives ran. Rank 0
saves everything; the test compares with ``log_softmax`` on the full logits.
"""
import sys

import torch
from torch.distributed.tensor import Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode

from aligner.parallel import (ParallelDims, build_mesh, cross_entropy, init_distributed, token_entropy, token_logprobs,
                              token_logprobs_with_entropy)
from aligner.parallel.process_exit import end_process


def make_inputs(vocab: int, dtype: torch.dtype) -> dict:
    """Full logits [B, T, V], labels with ignored positions, and weights for the scalar objective."""
    B, T = 3, 7
    gen = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(B, T, vocab, generator=gen) * 3).to(dtype)
    labels = torch.randint(0, vocab, (B, T), generator=gen)
    labels[0, :3] = -100
    return {"logits": logits, "labels": labels, "w_lp": torch.randn(B, T, generator=gen),
            "w_ent": torch.randn(B, T, generator=gen)}


def main() -> None:
    out_path = sys.argv[1]
    rank, world = init_distributed("gloo")
    tp_mesh = build_mesh(ParallelDims(world_size=world, tp=world))["tp"]
    results = {}
    for vocab, dtype in ((128, torch.float32), (131, torch.float32), (128, torch.bfloat16)):
        x = make_inputs(vocab, dtype)
        logits = distribute_tensor(x["logits"], tp_mesh, [Shard(2)]).requires_grad_()
        with CommDebugMode() as comm:
            lp = token_logprobs(logits, x["labels"].clamp(min=0))
            ent = token_entropy(logits)
            ce = cross_entropy(logits, x["labels"], reduction="sum")
            ce_mean = cross_entropy(logits, x["labels"], reduction="mean")
            objective = (lp * x["w_lp"]).sum() + (ent * x["w_ent"]).sum() + ce + ce_mean
            objective.backward()
        results[f"{vocab}_{str(dtype).removeprefix('torch.')}"] = {
            "inputs": x, "logprobs": lp.detach(), "entropy": ent.detach(), "ce_sum": ce.detach(),
            "ce_mean": ce_mean.detach(), "grad": logits.grad.full_tensor(),
            "local_vocab": logits.to_local().shape[-1],
            "comms": {str(op): n for op, n in comm.get_comm_counts().items()},
        }
        fused = distribute_tensor(x["logits"], tp_mesh, [Shard(2)]).requires_grad_()
        with CommDebugMode() as comm:
            lp, ent = token_logprobs_with_entropy(fused, x["labels"].clamp(min=0))
            (lp * x["w_lp"]).sum().backward()
        results[f"{vocab}_{str(dtype).removeprefix('torch.')}"].update({
            "fused_logprobs": lp.detach(), "fused_entropy": ent, "fused_entropy_requires_grad": ent.requires_grad,
            "fused_grad": fused.grad.full_tensor(),
            "fused_comms": {str(op): n for op, n in comm.get_comm_counts().items()},
        })
    if rank == 0:
        torch.save(results, out_path)
    end_process()  # barrier, destroy, os._exit: see aligner/parallel/process_exit.py


if __name__ == "__main__":
    main()

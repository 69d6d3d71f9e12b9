"""torchrun worker: one training step of a tiny model at several parallel layouts.

Usage: ``tp_fsdp_train_step.py OUT.pt CASES.json``. For each case (a parallel layout, model overrides
and options) it builds the model with ``build_parallel_model`` (seeded per-name init), runs forward on
this rank's share of a fixed batch, backward, one AdamW step, and rank 0 saves the loss, every
gathered gradient and every gathered weight after the step. The test compares them with a
single-process run of the same model (``seeded_init_``) on the whole batch.
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from helpers import run_torchrun, tiny_config  # noqa: E402

from aligner.models import Transformer, attach_value_head  # noqa: E402
from aligner.parallel import ParallelDims, build_mesh, build_parallel_model, cross_entropy, init_distributed  # noqa: E402
from aligner.parallel.loading import seeded_init_  # noqa: E402
from aligner.parallel.process_exit import end_process  # noqa: E402

# Adam's first step moves each weight by about lr * g / (|g| + eps): its sensitivity to gradient
# rounding is lr / eps. eps=1e-4 keeps that at 10, so float32 reduction-order noise (~1e-7) cannot
# turn into 1e-5 weight differences, while every weight still moves by ~lr.
ADAMW = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-4, weight_decay=0.1)


def make_batch(vocab_size: int, case: dict) -> dict:
    """Fixed tokens [B, T], labels (next token, -100 on padding), optional left-padded attention mask."""
    B, T = case.get("batch", 4), case.get("seq", 16)
    gen = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, vocab_size, (B, T), generator=gen)
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, -1] = -100
    batch = {"tokens": tokens, "labels": labels, "attention_mask": None}
    if case.get("padded"):
        pad = torch.tensor([0, 3, 5, 1] * (B // 4) + [0] * (B % 4))[:B]  # left padding per row
        mask = (torch.arange(T)[None, :] >= pad[:, None]).long()
        batch["attention_mask"] = mask
        batch["labels"] = torch.where(mask.bool() & (labels != -100), labels, torch.full_like(labels, -100))
    batch["value_targets"] = torch.randn(B, T, generator=gen)
    return batch


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def stage_cutter(keep: set[int], first: bool, last: bool):
    """A ``stage_fn`` keeping layers ``keep``, the embedding only on the first and the head on the last stage."""
    def cut(model):
        for key in list(model.layers):
            if int(key) not in keep:
                del model.layers[key]
        if not first:
            model.tok_embeddings = None
        if not last:
            model.norm, model.output = None, None
        return model
    return cut


class StageChain:
    """Runs stage models one after another with a detached boundary, as a pipeline schedule would:
    each stage gets a plain leaf tensor and sends its output's gradient back by hand."""

    def __init__(self, stages):
        self.stages = stages
        self.boundaries = []

    def __call__(self, tokens, attention_mask=None):
        self.boundaries, h = [], tokens
        for i, stage in enumerate(self.stages):
            if i > 0:
                assert type(h) is torch.Tensor  # stage boundaries carry plain tensors
                sent, h = h, h.detach().requires_grad_()
                self.boundaries.append((sent, h))
            h = stage(h, attention_mask=attention_mask)
        return h

    def backward_boundaries(self):
        for sent, received in reversed(self.boundaries):
            sent.backward(received.grad)

    def named_parameters(self):
        for stage in self.stages:
            yield from stage.named_parameters()


def run_case(case: dict, world: int) -> dict:
    pm = build_mesh(ParallelDims(world_size=world, **case["layout"]))
    cfg = tiny_config(**case.get("model", {}))
    value_head = case.get("value_head", False)
    build = dict(seed=case.get("seed", 0), value_head=value_head, **case.get("options", {}))
    if "stages" in case:  # e.g. [[0, 1], [2, 3]]: the model split like pipeline stages, all on this rank
        n = len(case["stages"])
        model = StageChain([build_parallel_model(cfg, pm, stage_fn=stage_cutter(set(keep), i == 0, i == n - 1), **build)
                            for i, keep in enumerate(case["stages"])])
    else:
        model = build_parallel_model(cfg, pm, **build)
    batch = make_batch(cfg.vocab_size, case)
    dp, dp_rank = pm.dims.dp, pm["dp"].get_local_rank()
    B = batch["tokens"].shape[0]
    rows = slice(dp_rank * B // dp, (dp_rank + 1) * B // dp)
    mask = None if batch["attention_mask"] is None else batch["attention_mask"][rows]
    labels = batch["labels"][rows]
    count = (batch["labels"] != -100).sum()

    def local_loss_sum():
        out = model(batch["tokens"][rows], attention_mask=mask)
        if value_head:
            return (((out.squeeze(-1) - batch["value_targets"][rows]) ** 2) * (labels != -100)).sum()
        return cross_entropy(out, labels, reduction="sum")

    def global_mean(local_sum):
        total = local_sum.detach().float().clone()
        dist.all_reduce(total, group=pm["dp"].get_group())
        return (total / count).item()

    local_sum = local_loss_sum()
    # FSDP averages gradients over the dp ranks; scaling by dp makes the result the global sum / count.
    (local_sum / count * dp).backward()
    if isinstance(model, StageChain):
        model.backward_boundaries()
    loss = global_mean(local_sum)
    params = dict(model.named_parameters())
    grads = {n: full(p.grad).float().clone() for n, p in params.items()}
    local_shapes = {n: tuple((p.to_local() if isinstance(p, DTensor) else p).shape) for n, p in params.items()}
    param_dtypes = {n: str(p.dtype) for n, p in params.items()}
    torch.optim.AdamW(params.values(), **ADAMW).step()
    weights = {n: full(p).detach().float().clone() for n, p in params.items()}
    # A forward with the updated (now non-zero) biases and norms checks the step's effect end to end.
    with torch.no_grad():
        loss_after = global_mean(local_loss_sum())
    tied = "stages" not in case and cfg.tie_word_embeddings and model.output.weight is model.tok_embeddings.weight
    return {"loss": loss, "loss_after": loss_after, "grads": grads, "weights": weights,
            "param_dtypes": param_dtypes, "local_shapes": local_shapes, "tied_after_build": bool(tied),
            "batch": batch}


def reference_step(case: dict, batch: dict) -> dict:
    """The same step in one process on the whole batch, with plain torch ops (the ground truth)."""
    model = Transformer(tiny_config(**case.get("model", {})))
    if case.get("value_head"):
        attach_value_head(model)
    seeded_init_(model, case.get("seed", 0))
    out = model(batch["tokens"], attention_mask=batch["attention_mask"])
    labels = batch["labels"]
    count = (labels != -100).sum()
    if case.get("value_head"):
        total = (((out.squeeze(-1) - batch["value_targets"]) ** 2) * (labels != -100)).sum()
    else:
        total = F.cross_entropy(out.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    (total / count).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.optim.AdamW(model.parameters(), **ADAMW).step()
    with torch.no_grad():
        out = model(batch["tokens"], attention_mask=batch["attention_mask"])
        after = (((out.squeeze(-1) - batch["value_targets"]) ** 2) * (labels != -100)).sum() \
            if case.get("value_head") else F.cross_entropy(out.flatten(0, 1), labels.flatten(), reduction="sum")
    return {"loss": (total / count).item(), "loss_after": (after / count).item(), "grads": grads,
            "weights": {n: p.detach().clone() for n, p in model.named_parameters()}}


def assert_matches_reference(got: dict, case: dict, atol: float = 1e-5) -> None:
    """Loss, every gradient, every weight after the step and the loss after it equal the reference."""
    want = reference_step(case, got["batch"])
    assert got["grads"].keys() == want["grads"].keys()
    assert abs(got["loss"] - want["loss"]) <= atol, (got["loss"], want["loss"])
    for name in want["grads"]:
        torch.testing.assert_close(got["grads"][name], want["grads"][name], rtol=0, atol=atol,
                                   msg=lambda m: f"gradient of {name}: {m}")
        torch.testing.assert_close(got["weights"][name], want["weights"][name], rtol=0, atol=atol,
                                   msg=lambda m: f"{name} after AdamW: {m}")
    assert abs(got["loss_after"] - want["loss_after"]) <= atol, (got["loss_after"], want["loss_after"])


def run_cases(tmp_dir: Path, nproc: int, cases: dict) -> dict:
    """Run ``cases`` in one torchrun job of ``nproc`` processes; results by case name."""
    cases_file, out = Path(tmp_dir) / "cases.json", Path(tmp_dir) / "results.pt"
    cases_file.write_text(json.dumps(cases))
    run_torchrun(Path(__file__), nproc, str(out), str(cases_file))
    return torch.load(out, weights_only=False)


def main() -> None:
    out_path, cases_path = sys.argv[1], sys.argv[2]
    rank, world = init_distributed("gloo")
    cases = json.loads(Path(cases_path).read_text())
    results = {name: run_case(case, world) for name, case in cases.items()}
    if rank == 0:
        torch.save(results, out_path)
    end_process()  # barrier, destroy, os._exit: see aligner/parallel/process_exit.py


if __name__ == "__main__":
    main()

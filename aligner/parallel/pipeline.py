"""Pipeline parallelism over the ``pp`` mesh dim with ``torch.distributed.pipelining``.

How a pipeline step works here:

- Each rank of a pipeline holds one stage (interleaved schedules: several) cut from the full model by
  :func:`cut_to_stage`: the layers of other stages are deleted from ``model.layers``, which is keyed by
  the layer index, so parameter names stay those of the full model (checkpoints and HF names just work).
- :class:`PipelineRunner` gives the whole batch to every stage. ``tokens`` feed the first stage; the
  ``position_ids``, ``attention_mask`` and ``document_ids`` go to *every* stage as keyword arguments,
  which ``torch.distributed.pipelining`` splits into micro-batches together with the tokens, so that
  padded and packed batches mask and rotate the same way on every stage.
- The loss function runs on the last stage once per micro-batch and returns that micro-batch's *share of
  the global loss* (e.g. the summed token losses divided by the token count of the whole batch). The
  schedule sums these shares and does not rescale gradients, so loss and gradients equal the ones of one
  forward/backward over the full batch.
- Tied embeddings (SmolLM2): the first and the last stage each hold a copy of the shared weight. After
  backward the two gradients are summed over a 2-rank group (:func:`sync_tied_gradients`), so that the
  copies, stepped by identical optimizers, stay equal.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_flatten, tree_unflatten, treespec_dumps, treespec_loads

# Schedules by their name in ``parallel.pp_schedule``, and how many stages each puts on a rank.
SCHEDULES = {"1F1B": Schedule1F1B, "GPipe": ScheduleGPipe, "Interleaved1F1B": ScheduleInterleaved1F1B}
STAGES_PER_RANK = {"1F1B": 1, "GPipe": 1, "Interleaved1F1B": 2}
# Batch keys that every stage's Transformer.forward takes besides the tokens.
MODEL_INPUT_KWARGS = ("position_ids", "attention_mask", "document_ids", "branch_ids")

LossFn = Callable[[torch.Tensor, dict], "torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]"]


@dataclass(frozen=True)
class StageInfo:
    """What :func:`cut_to_stage` made of a model; stored on it as ``model.pipeline_stage``."""

    stage_index: int
    num_stages: int
    layer_ids: tuple[int, ...]
    tied_embeddings: bool  # the full model's LM head shared the embedding weight

    @property
    def is_first(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.num_stages - 1


def split_layers(num_layers: int, pp_size: int, num_stages_per_rank: int = 1) -> list[list[int]]:
    """Layer indices of each of the ``pp_size * num_stages_per_rank`` stages, as even as possible.

    The remainder goes to the earliest stages: the last stage also runs the LM head and the loss.
    """
    num_stages = pp_size * num_stages_per_rank
    if num_layers < num_stages:
        raise ValueError(
            f"the model has {num_layers} layers but parallel.pp={pp_size} with {num_stages_per_rank} stage(s) "
            f"per rank makes {num_stages} pipeline stages, and every stage needs at least one layer; "
            f"lower parallel.pp (or use a parallel.pp_schedule with one stage per rank: 1F1B, GPipe)"
        )
    base, extra = divmod(num_layers, num_stages)
    stages, start = [], 0
    for s in range(num_stages):
        n = base + (1 if s < extra else 0)
        stages.append(list(range(start, start + n)))
        start += n
    return stages


def stage_ids_this_rank(pp_rank: int, pp_size: int, num_stages_per_rank: int = 1) -> list[int]:
    """Stages held by pipeline rank ``pp_rank``: looped order, stage ``s`` lives on rank ``s % pp_size``
    (the placement ``torch.distributed.pipelining`` assumes)."""
    return [pp_rank + i * pp_size for i in range(num_stages_per_rank)]


def cut_to_stage(model: nn.Module, stage_index: int, num_stages: int, layer_ids: list[int]) -> nn.Module:
    """Turn the full model into pipeline stage ``stage_index`` in place and return it.

    Deletes the layers not in ``layer_ids``, drops ``tok_embeddings`` unless first stage and
    ``norm``/``output`` unless last stage (``Transformer.forward`` skips ``None`` modules and takes hidden
    states ``[B, T, D]`` on later stages). Works on the meta device, so it can be the ``stage_fn`` of the
    loader. Attach a value head before cutting: tied embeddings are detected here, on the full model.
    """
    if getattr(model, "pipeline_stage", None) is not None:
        raise ValueError(f"this model is already pipeline stage {model.pipeline_stage.stage_index}; cut the full model")
    if not 0 <= stage_index < num_stages:
        raise ValueError(f"stage_index={stage_index} is outside the {num_stages} pipeline stages")
    missing = [i for i in layer_ids if str(i) not in model.layers]
    if missing:
        raise ValueError(f"layers {missing} of stage {stage_index} are not in the model (it has {len(model.layers)})")
    embedding, head = model.tok_embeddings, model.output
    tied = embedding is not None and head is not None and getattr(head, "weight", None) is embedding.weight
    keep = {str(i) for i in layer_ids}
    for name in list(model.layers.keys()):
        if name not in keep:
            del model.layers[name]
    if stage_index != 0:
        model.tok_embeddings = None
    if stage_index != num_stages - 1:
        model.norm = None
        model.output = None
    model.pipeline_stage = StageInfo(stage_index, num_stages, tuple(layer_ids), tied)
    return model


def stage_fns_this_rank(
    num_layers: int, pp_rank: int, pp_size: int, num_stages_per_rank: int = 1
) -> list[Callable[[nn.Module], nn.Module]]:
    """One ``stage_fn(model) -> stage`` per stage of this rank, to hand to the loader one at a time."""
    layers = split_layers(num_layers, pp_size, num_stages_per_rank)
    num_stages = len(layers)
    return [partial(cut_to_stage, stage_index=s, num_stages=num_stages, layer_ids=layers[s])
            for s in stage_ids_this_rank(pp_rank, pp_size, num_stages_per_rank)]


def tied_embedding_group(pmesh) -> dist.ProcessGroup | None:
    """The 2-rank group of the first and the last stage that share a tied embedding (None at pp=1).

    Every rank must call this (group creation is collective). With pp=2 it is the pp group itself;
    otherwise one group per (dp_replicate, dp_shard, tp) coordinate, and middle stages get None.
    """
    pp = pmesh.dims.pp
    if pp == 1:
        return None
    if pp == 2:
        return pmesh["pp"].get_group()
    ranks = pmesh.mesh.mesh  # [pp, dp_replicate, dp_shard, tp] global ranks
    pairs = [[int(a), int(b)] for a, b in zip(ranks[0].flatten(), ranks[-1].flatten())]
    group, _ = dist.new_subgroups_by_enumeration(pairs)
    return group


def _tied_weight(model: nn.Module) -> nn.Parameter | None:
    """This stage's copy of a tied embedding, or None when it holds none (or both: no pipeline cut)."""
    info: StageInfo = model.pipeline_stage
    if not info.tied_embeddings or info.is_first == info.is_last:
        return None
    return model.tok_embeddings.weight if info.is_first else model.output.weight


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def sync_tied_gradients(stage_models: list[nn.Module], group: dist.ProcessGroup | None) -> None:
    """Sum the gradients of the tied embedding copies of the first and the last stage, in place.

    Call on every rank after one backward, on gradients of that backward alone (ranks without a copy do
    nothing); :meth:`PipelineRunner.train_step` does it. Both copies then carry the full-model gradient
    ``d(embedding) + d(LM head)``.
    """
    for model in stage_models:
        weight = _tied_weight(model)
        if weight is None or not weight.requires_grad:
            continue
        if group is None:
            raise ValueError("the model ties its embeddings across pipeline stages but no tied group was given; "
                             "pass tied_embedding_group(pmesh)")
        if weight.grad is None:  # a stage that saw no gradient still joins the collective
            weight.grad = torch.zeros_like(weight)
        grad = weight.grad
        if isinstance(grad, DTensor) and grad.placements != weight.placements:
            # DTensor may leave a tp-sharded embedding's gradient replicated (or partial); give it the
            # parameter's layout so that both stages sum matching local shards.
            grad = weight.grad = grad.redistribute(weight.device_mesh, weight.placements)
        dist.all_reduce(_local(grad), group=group)


@torch.no_grad()
def sync_tied_weights(stage_models: list[nn.Module], group: dist.ProcessGroup | None) -> None:
    """Copy the first stage's tied embedding onto the last stage's LM head (after a random init)."""
    for model in stage_models:
        weight = _tied_weight(model)
        if weight is None:
            continue
        # Stage 0's ranks come first in the mesh, so the first stage is rank 0 of the tied group.
        dist.broadcast(_local(weight), group=group, group_src=0)


def build_pipeline_schedule(stages: list[PipelineStage], n_microbatches: int, loss_fn: Callable | None,
                            schedule: str = "1F1B"):
    """A ``torch.distributed.pipelining`` schedule over this rank's ``stages``.

    ``loss_fn(output, target, **loss_kwargs)`` returns a micro-batch's share of the global loss, so
    gradients are not rescaled by the number of micro-batches (``scale_grads=False``).
    """
    if len(stages) != stages_per_rank(schedule):
        raise ValueError(f"parallel.pp_schedule={schedule} runs {STAGES_PER_RANK[schedule]} stage(s) per rank but "
                         f"this rank has {len(stages)}; cut stages with stage_fns_this_rank(..., "
                         f"num_stages_per_rank=stages_per_rank('{schedule}'))")
    cls = SCHEDULES[schedule]
    if STAGES_PER_RANK[schedule] == 1:
        return cls(stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    return cls(stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)


def stages_per_rank(schedule: str) -> int:
    """How many pipeline stages ``parallel.pp_schedule`` puts on each rank (Interleaved1F1B: 2)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"parallel.pp_schedule='{schedule}' is unknown; choose one of {', '.join(SCHEDULES)}")
    return STAGES_PER_RANK[schedule]


def split_microbatches(batch: dict[str, Any], n_microbatches: int) -> list[dict[str, Any]]:
    """Split a batch dict into micro-batches along dim 0, the way the pipeline schedule splits its inputs.

    Tensors with a batch dim (and lists with one entry per sample) are split; 0-d tensors and other
    values (global normalisers such as the batch's token count) are given whole to every micro-batch.
    """
    size = batch["tokens"].shape[0]
    if size % n_microbatches:
        raise ValueError(f"batch size {size} is not divisible by {n_microbatches} pipeline micro-batches; set "
                         f"parallel.pp_microbatches to a divisor of the per-rank batch")
    chunk = size // n_microbatches
    out: list[dict[str, Any]] = [{} for _ in range(n_microbatches)]
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            if value.shape[0] != size:
                raise ValueError(f"batch['{key}'] has leading size {value.shape[0]} but batch['tokens'] has {size}; "
                                 f"per-sample tensors need the batch dim first, global values must be 0-d")
            parts = value.tensor_split(n_microbatches)
        elif isinstance(value, (list, tuple)) and len(value) == size:
            parts = [value[i * chunk:(i + 1) * chunk] for i in range(n_microbatches)]
        else:
            parts = [value] * n_microbatches
        for mb, part in zip(out, parts):
            mb[key] = part
    return out


def _microbatch_loss(output, mb_index, *, loss_fn, microbatches, metrics_by_mb):
    """The schedule's loss: the schedule's "target" is the micro-batch index, which finds the micro-batch."""
    i = int(mb_index)
    result = loss_fn(output, microbatches[i])
    if isinstance(result, tuple):
        loss, metrics_by_mb[i] = result
        return loss
    return result


def _microbatch_forward(output, mb_index, *, fn, microbatches, results):
    """Forward-only: apply ``fn`` per micro-batch on the last stage, and feed the schedule a dummy loss."""
    i = int(mb_index)
    results[i] = output if fn is None else fn(output, microbatches[i])
    return torch.zeros((), device=_local(output).device)


class PipelineRunner:
    """Runs training steps and no-grad forwards of a pipelined model; results come back on every pp rank.

    ``stage_models`` are this rank's stages from :func:`cut_to_stage` (already parallelized over tp/fsdp
    if wanted). A schedule is built per input shape and kept (``max_cached_shapes``): the first step at a
    new shape runs one extra forward+backward to infer the activation shapes, so pad to a few fixed lengths.
    """

    def __init__(self, stage_models: list[nn.Module], pp_mesh: DeviceMesh, n_microbatches: int,
                 schedule: str = "1F1B", tied_group: dist.ProcessGroup | None = None, max_cached_shapes: int = 4):
        for m in stage_models:
            if getattr(m, "pipeline_stage", None) is None:
                raise ValueError("PipelineRunner needs stages made by cut_to_stage (model.pipeline_stage is missing)")
        stages_per_rank(schedule)  # validates the name
        self.stage_models = list(stage_models)
        self.infos: list[StageInfo] = [m.pipeline_stage for m in stage_models]
        self.pp_group = pp_mesh.get_group()
        self.pp_size = pp_mesh.size()
        self.pp_rank = pp_mesh.get_local_rank()
        self.n_microbatches = n_microbatches
        self.schedule_name = schedule
        self.tied_group = tied_group
        self.max_cached_shapes = max_cached_shapes
        num_stages = self.infos[0].num_stages
        expected = stage_ids_this_rank(self.pp_rank, self.pp_size, num_stages // self.pp_size)
        got = [i.stage_index for i in self.infos]
        if num_stages % self.pp_size or got != expected:
            raise ValueError(f"pp rank {self.pp_rank} holds stages {got} of {num_stages}, but with parallel.pp="
                             f"{self.pp_size} it must hold {expected}; build stages with stage_fns_this_rank")
        if any(_tied_weight(m) is not None for m in stage_models) and tied_group is None:
            raise ValueError("this stage holds a copy of a tied embedding; pass tied_group=tied_embedding_group(pmesh)")
        self.holds_first = any(i.is_first for i in self.infos)
        self.holds_last = any(i.is_last for i in self.infos)
        self.last_stage_rank = (num_stages - 1) % self.pp_size
        # The compute device, from the mesh: with FSDP CPU offload the parameters themselves live on the CPU.
        cuda = pp_mesh.device_type == "cuda"
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device(pp_mesh.device_type)
        self._schedules: OrderedDict = OrderedDict()

    def _schedule(self, mode: str, shapes: tuple):
        """(schedule, stages) for ``mode`` ("train"/"eval") and these input shapes, cached."""
        key = (mode, shapes)
        if key in self._schedules:
            self._schedules.move_to_end(key)
            return self._schedules[key]
        stages = [PipelineStage(m, i.stage_index, i.num_stages, self.device, group=self.pp_group)
                  for m, i in zip(self.stage_models, self.infos)]
        loss = _microbatch_loss if mode == "train" else _microbatch_forward
        entry = (build_pipeline_schedule(stages, self.n_microbatches, loss, self.schedule_name), stages)
        self._schedules[key] = entry
        if len(self._schedules) > self.max_cached_shapes:
            self._schedules.popitem(last=False)
        return entry

    def _inputs(self, batch: dict[str, Any]):
        if "tokens" not in batch:
            raise KeyError(f"the pipeline batch needs 'tokens' [B, T]; it has {sorted(batch)}")
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        kwargs = {k: batch[k] for k in MODEL_INPUT_KWARGS if batch.get(k) is not None}
        shapes = tuple((k, tuple(v.shape), v.dtype) for k, v in [("tokens", batch["tokens"]), *kwargs.items()])
        # Only the first stage consumes tokens; the others receive activations from the stage before.
        args = (batch["tokens"],) if self.holds_first else ()
        return batch, args, kwargs, shapes

    def train_step(self, batch: dict[str, Any], loss_fn: LossFn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward and backward over all micro-batches; gradients accumulate into ``.grad`` like ``backward()``.

        ``loss_fn(output, microbatch)`` runs on the last stage with the stage output (logits ``[b, T, V]``)
        and the micro-batch dict (see :func:`split_microbatches`); it returns the micro-batch's share of the
        global loss, or ``(share, metrics)`` with metrics that are shares too. Returns ``(loss, metrics)``
        summed over micro-batches, the same on every pp rank (this data-parallel rank's part: sum over dp
        for the global value). Tied embedding gradients are synchronised before returning.
        """
        batch, args, kwargs, shapes = self._inputs(batch)
        microbatches = split_microbatches(batch, self.n_microbatches)
        schedule, _ = self._schedule("train", shapes)
        losses: list[torch.Tensor] = []
        metrics_by_mb: dict[int, dict] = {}
        # Earlier gradients wait aside: the tied-embedding sum must only add this step's gradients (else
        # accumulated ones would be counted twice), and a new schedule's shape inference clears FSDP's.
        stash = _stash_grads(self.stage_models)
        schedule.step(*args, target=torch.arange(self.n_microbatches), losses=losses, return_outputs=False,
                      loss_kwargs=dict(loss_fn=loss_fn, microbatches=microbatches, metrics_by_mb=metrics_by_mb),
                      **kwargs)
        sync_tied_gradients(self.stage_models, self.tied_group)
        _restore_grads(stash)
        result = None
        if self.holds_last:
            loss = sum(_local(l.detach()) for l in losses)
            metrics = {k: sum(_detach(metrics_by_mb[i][k]) for i in range(self.n_microbatches))
                       for k in metrics_by_mb.get(0, {})}
            result = (loss, metrics)
        return self._from_last_stage(result)

    @torch.no_grad()
    def forward(self, batch: dict[str, Any], fn: Callable | None = None) -> Any:
        """No-grad forward of the whole batch; returns ``fn(output, microbatch)`` concatenated over
        micro-batches along dim 0 (a tensor or a dict/tuple of tensors), or the last stage's outputs when
        ``fn`` is None, the same on every pp rank. Reduce in ``fn`` (e.g. per-token log-probs ``[b, T]``)
        so that the full logits never leave the last stage.
        """
        batch, args, kwargs, shapes = self._inputs(batch)
        microbatches = split_microbatches(batch, self.n_microbatches)
        schedule, stages = self._schedule("eval", shapes)
        results: dict[int, Any] = {}
        stash = _stash_grads(self.stage_models)  # see train_step; a forward may sit between backward and step
        schedule.eval(*args, target=torch.arange(self.n_microbatches), return_outputs=False,
                      loss_kwargs=dict(fn=fn, microbatches=microbatches, results=results), **kwargs)
        _restore_grads(stash)
        for stage in stages:
            stage.clear_runtime_states()  # frees the activations kept for a backward that never comes
        for model in self.stage_models:
            _reshard_fsdp(model)
        merged = None
        if self.holds_last:
            per_mb = [tree_flatten(results[i]) for i in range(self.n_microbatches)]
            spec = per_mb[0][1]
            leaves = [torch.cat([_full(mb[0][j]) for mb in per_mb]) for j in range(len(per_mb[0][0]))]
            merged = tree_unflatten(leaves, spec)
        return self._from_last_stage(merged)

    def _from_last_stage(self, tree: Any) -> Any:
        """Broadcast a tree of tensors from the rank holding the last stage to all pp ranks."""
        if self.pp_size == 1:
            return tree
        return broadcast_tree(tree, self.pp_group, self.last_stage_rank, self.device)


def _stash_grads(models: list[nn.Module]) -> dict[nn.Parameter, torch.Tensor]:
    """Take the gradients off the parameters (put back, summed, by :func:`_restore_grads`).

    A new schedule's shape inference runs a real forward and backward, then clears the gradients of FSDP
    parameters: without this, gradients accumulated by earlier steps would be lost, or wiped by a no-grad
    forward between backward and optimizer step.
    """
    stash = {}
    for model in models:
        for p in model.parameters():
            if p.grad is not None:
                stash[p], p.grad = p.grad, None
    return stash


def _restore_grads(stash: dict[nn.Parameter, torch.Tensor]) -> None:
    for p, grad in stash.items():
        p.grad = grad if p.grad is None else p.grad.add_(grad)


def _reshard_fsdp(model: nn.Module) -> None:
    """Free FSDP's gathered parameters. Under pipelining FSDP keeps them after forward (the backward of
    the same micro-batches comes later); after a no-grad forward nothing will reshard them, and the
    optimizer would then see the unsharded parameters instead of the sharded ones."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _detach(x):
    return _local(x.detach()) if isinstance(x, torch.Tensor) else torch.tensor(float(x))


def _full(x: torch.Tensor) -> torch.Tensor:
    return x.full_tensor() if isinstance(x, DTensor) else x


def broadcast_tree(tree: Any, group: dist.ProcessGroup, group_src: int, device: torch.device) -> Any:
    """Broadcast a pytree of plain tensors (and other values) whose structure only ``group_src`` knows.

    The structure, shapes and dtypes travel as one pickled object; each tensor then as a broadcast.
    """
    is_src = dist.get_rank(group) == group_src
    leaves: list = []
    meta: list = [None]
    if is_src:
        leaves, spec = tree_flatten(tree)
        described = [("tensor", tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else ("value", x)
                     for x in leaves]
        # The spec travels as its JSON string: pickled TreeSpecs are deprecated.
        meta = [(treespec_dumps(spec), described)]
    dist.broadcast_object_list(meta, group=group, group_src=group_src, device=device)
    spec, described = meta[0]
    spec = treespec_loads(spec)
    out = []
    for j, (kind, *rest) in enumerate(described):
        if kind == "value":
            out.append(rest[0])
            continue
        shape, dtype = rest
        t = leaves[j].detach().to(device).contiguous() if is_src else torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(t, group=group, group_src=group_src)
        out.append(t)
    return tree_unflatten(out, spec)

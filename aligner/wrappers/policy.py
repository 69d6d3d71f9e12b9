"""PolicyModel: a causal LM, its parallel layout and its optimizer, behind the alignable interface.

How one training step is normalised: ``N`` = ``loss_fn.num_units`` summed over every micro-batch of
the global batch (one all-reduce over the data-parallel ranks before the first forward). Each
micro-batch backpropagates ``loss_sum / N * dp_size``: dividing by the global ``N`` makes the sum of
the micro-batches' gradients the gradient of the global mean, and ``dp_size`` undoes FSDP's averaging
of gradients over data-parallel ranks. Loss and gradients are therefore the same whatever the
micro-batch size, the number of ranks, or how the examples' lengths fall into micro-batches.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from aligner.config import architecture_dict
from aligner.generation.engine import Rollouts, SamplingParams
from aligner.interface import LossFn
from aligner.models import config_from_hf
from aligner.parallel import ParallelMesh, build_parallel_model
from aligner.parallel.pipeline import (
    MODEL_INPUT_KWARGS,
    PipelineRunner,
    stage_fns_this_rank,
    stages_per_rank,
    tied_embedding_group,
)
from aligner.wrappers.batching import (PACKABLE_KEYS, at_positions, label_positions, num_rows, pack_rows,
                                       packing_pays, pipeline_runs, split_rows, trim_trailing_padding)
from aligner.wrappers.embedding_grad import fuse_tied_gradient_accumulation
from aligner.wrappers.optimizer import LRSchedule, build_optimizer, clip_grad_norm, move_optimizer_state
from aligner.wrappers.rollout import PolicyRolloutEngine

# The optimizer state dict is flattened to ``state.<fqn>.exp_avg`` keys: the same keys whichever stage,
# tensor shard or data-parallel rank holds a parameter, so checkpoints load at any layout.
_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)
_LOSS_SUM = "__loss_sum"  # the raw loss sum travels with the metrics through the pipeline schedule
_RESERVED = ("loss", "grad_norm", "lr")
# A tied LM head has no optimizer state of its own in the full model (it is the embedding); the last
# pipeline stage's copy saves and loads its state under the embedding's name, so checkpoints of tied
# models move between pipelined and unpipelined layouts.
_TIED_RENAMES = (("state.output.weight.", "state.tok_embeddings.weight."),
                 ("param_groups.output.weight.", "param_groups.tok_embeddings.weight."))


class PipelineStages(nn.Module):
    """This rank's pipeline stages seen as one module (never called): its parameter names are the full
    model's (``layers.5.mlp.up_proj.weight``), so one optimizer and one state dict cover all stages."""

    def __init__(self, stages: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleDict()
        for stage in stages:
            for name in ("tok_embeddings", "norm", "output"):
                if getattr(stage, name, None) is not None:
                    setattr(self, name, getattr(stage, name))
            for key, block in stage.layers.items():
                self.layers[key] = block

    def forward(self, *args, **kwargs):
        raise RuntimeError("PipelineStages only groups parameters; run the stages with a PipelineRunner")


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _model_inputs(mb: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: mb[k] for k in MODEL_INPUT_KWARGS if mb.get(k) is not None}


def _reshard(module: nn.Module) -> None:
    """Free FSDP's gathered parameters after a no-grad forward: the root keeps them gathered for a
    backward that will not come, and state dicts and optimizer steps need the sharded ones."""
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _concat(results: list[Any]) -> Any:
    """Concatenate per-micro-batch results (tensors, or dicts/tuples of them) along dim 0."""
    flat = [tree_flatten(r) for r in results]
    spec = flat[0][1]
    leaves = [torch.cat([_plain(f[0][j]) for f in flat]) for j in range(len(flat[0][0]))]
    return tree_unflatten(leaves, spec)


def _rows_per_example(loss_fn: LossFn) -> int:
    """Rows of the batch that form one example and must share a micro-batch (``loss_fn.rows_per_example``,
    e.g. 2 for a DPO pair); ``trainer.micro_batch_size`` counts examples."""
    group = int(getattr(loss_fn, "rows_per_example", 1))
    if group < 1:
        raise ValueError(f"{type(loss_fn).__name__}.rows_per_example={group} must be >= 1")
    return group


def _micro_rows(micro_batch_size: int, rows_per_example: int, fn: Any) -> int:
    """Rows per micro-batch: ``micro_batch_size`` examples of ``rows_per_example`` rows, or, for a loss whose
    rows each hold several examples (``fn.examples_per_row``, e.g. GRPO's samples of one prompt in one row),
    as many whole rows as keep to ``micro_batch_size`` examples (at least one)."""
    per_row = int(getattr(fn, "examples_per_row", 1))
    return max(1, micro_batch_size * rows_per_example // max(1, per_row))


class PolicyModel:
    """A causal LM (``model.path`` checkpoint or ``model.arch`` random init) trained with AdamW at the
    layout of ``job_cfg.parallel``; implements :class:`aligner.interface.Alignable`.

    Attributes: ``model`` (the parallel Transformer; under PP a :class:`PipelineStages` over this rank's
    stages), ``stages`` (list of stage modules; ``[model]`` without PP), ``optimizer``, ``scheduler``,
    ``pmesh``, ``dp_rank``, ``dp_size``, ``config`` (TransformerConfig), ``device``.
    """

    def __init__(self, job_cfg: Any, pmesh: ParallelMesh, value_head: bool = False):
        self.job_cfg = job_cfg
        self.value_head = value_head  # a scalar head (reward model): "logits" handed to losses are [b, T, 1]
        self.pmesh = pmesh
        dims = pmesh.dims
        p, t = job_cfg.parallel, job_cfg.trainer
        self.dp_size = dims.dp
        self.dp_rank = pmesh["dp"].get_local_rank()
        self.micro_batch_size = t.micro_batch_size
        if self.micro_batch_size < 1:
            raise ValueError(f"trainer.micro_batch_size={self.micro_batch_size} must be >= 1")
        self.device = (torch.device("cuda", torch.cuda.current_device()) if pmesh.mesh.device_type == "cuda"
                       else torch.device(pmesh.mesh.device_type))
        # Only the ranks at tp=0, pp=0 contribute to metric sums, so one world all-reduce sums over dp.
        self._reports_metrics = pmesh["tp"].get_local_rank() == 0 and pmesh["pp"].get_local_rank() == 0
        config = config_from_hf(architecture_dict(job_cfg.model), source="model")
        source = job_cfg.model.path if job_cfg.model.path else config
        build = dict(dtype=job_cfg.model.dtype, seed=t.seed, value_head=value_head,
                     activation_checkpointing=p.activation_checkpointing, mixed_precision=p.mixed_precision,
                     sequence_parallel=p.sequence_parallel)
        self.pp_size = dims.pp
        if dims.pp > 1:
            stage_fns = stage_fns_this_rank(config.num_hidden_layers, pmesh["pp"].get_local_rank(), dims.pp,
                                            stages_per_rank(p.pp_schedule))
            self.stages = [build_parallel_model(source, pmesh, stage_fn=fn, **build) for fn in stage_fns]
            self.model = PipelineStages(self.stages) if len(self.stages) > 1 else self.stages[0]
            self._tied_group = tied_embedding_group(pmesh)  # collective: every rank calls it
            self._pp_group = pmesh["pp"].get_group()
            self._runners: dict[int, PipelineRunner] = {}
        else:
            self.model = build_parallel_model(source, pmesh, **build)
            self.stages = [self.model]
            self._pp_group = None
        self.config = self.stages[0].config
        # The last stage's copy of a tied embedding duplicates the first stage's gradient.
        self._tied_copies = [s.output.weight for s in self.stages
                             if getattr(s, "pipeline_stage", None) is not None and s.pipeline_stage.tied_embeddings
                             and s.pipeline_stage.is_last and not s.pipeline_stage.is_first]
        # A tied embedding and LM head add their gradients into .grad themselves (no 113 MB temporaries).
        self.fused_tied_grad = [fuse_tied_gradient_accumulation(s) for s in self.stages]
        self.optimizer = build_optimizer(self.model.parameters(), job_cfg.optim)
        self.scheduler = LRSchedule(self.optimizer, job_cfg.optim)
        self.optimizer_offload = p.optimizer_offload
        self._state_offloaded = False
        self.rollout = PolicyRolloutEngine(self)  # the rollout engine, built on the first generate

    # ----------------------------------------------------------------- schedule length
    @property
    def total_steps(self) -> int | None:
        """Steps of the run; the LR schedule decays to ``optim.sched.min_lr`` over them."""
        return self.scheduler.total_steps

    @total_steps.setter
    def total_steps(self, value: int | None) -> None:
        self.scheduler.total_steps = value

    def set_total_steps(self, total_steps: int) -> None:
        """Same as ``model.total_steps = total_steps``."""
        self.total_steps = total_steps

    # ----------------------------------------------------------------- training
    def train_step(self, batch: dict[str, Any], loss_fn: LossFn) -> dict[str, float]:
        """One optimizer step on this dp rank's share of the global batch; see :class:`aligner.interface.Alignable`."""
        lr = self.scheduler.apply()  # first: a schedule that cannot be computed fails before any work
        self._onload_optimizer_state()
        for stage in self.stages:
            stage.train()
        rows = _micro_rows(self.micro_batch_size, _rows_per_example(loss_fn), loss_fn)
        micro = split_rows(batch, rows)
        n_units = self._global_units(micro, loss_fn)
        # float32 in the graph (a float64 divisor would promote the backward of the loss scalar).
        divisor, scale = n_units.float(), float(self.dp_size)
        if self.pp_size > 1:
            sums = self._pipeline_train(batch, loss_fn, divisor, scale, _rows_per_example(loss_fn))
        else:
            sums: dict[str, torch.Tensor] = {}
            for i, mb in enumerate(micro):
                self._sync_gradients(last=i == len(micro) - 1)
                mb = self._to_device(trim_trailing_padding(mb, multiple=8 * self.pmesh.dims.tp))
                logits, mb = self._logits(mb, loss_fn)
                loss_sum, metrics = loss_fn(logits, mb)
                loss_sum = _plain(loss_sum)
                (loss_sum / divisor * scale).backward()
                self._accumulate(sums, loss_sum, metrics)
        grad_norm = clip_grad_norm(self.model.parameters(), self.job_cfg.optim.clip_grad, self._pp_group,
                                   tied_copies=self._tied_copies)
        self.optimizer.step()
        self.rollout.weights_changed()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        out = self._reduce_metrics(sums, n_units)
        out.update(grad_norm=grad_norm, lr=lr)
        return out

    @torch.no_grad()
    def eval_step(self, batch: dict[str, Any], loss_fn: LossFn) -> dict[str, float]:
        """Loss and metrics of ``batch`` without gradients, normalised like :meth:`train_step`:
        ``{"loss", <metric> ...}``, identical on every rank."""
        group = _rows_per_example(loss_fn)
        micro = split_rows(batch, self.micro_batch_size * group)
        n_units = self._global_units(micro, loss_fn)

        def sums_of(logits, mb):
            loss_sum, metrics = loss_fn(logits, mb)
            # [1]-shaped so that the per-micro-batch results concatenate like per-example ones.
            return {_LOSS_SUM: _plain(loss_sum).detach().float().reshape(1),
                    **{k: _plain(v).detach().float().reshape(1) for k, v in metrics.items()}}

        # The loss's own forward shortcuts hold here too: sums_of returns sums, not rows.
        sums_of.logits_at_labels = getattr(loss_fn, "logits_at_labels", False)
        sums_of.token_level = getattr(loss_fn, "token_level", False)

        per_mb = self.forward(batch, sums_of, rows_per_example=group)
        sums = {k: v.sum() for k, v in per_mb.items()}
        return self._reduce_metrics(sums, n_units)

    def _sync_gradients(self, last: bool) -> None:
        """Under pure replication (``dp_shard=1``) reduce gradients only after the last micro-batch: the
        local gradients are full-size anyway, so accumulating them first saves an all-reduce per
        micro-batch at no memory cost. Sharded layouts reduce-scatter every micro-batch, which keeps only
        a shard of each gradient between micro-batches."""
        dims = self.pmesh.dims
        if dims.dp_shard == 1 and dims.dp_replicate > 1 and isinstance(self.model, FSDPModule):
            self.model.set_requires_gradient_sync(last)  # recurses into the blocks

    def _global_units(self, micro: list[dict[str, Any]], loss_fn: LossFn) -> torch.Tensor:
        """``N``: loss units summed over the micro-batches of every dp rank (float64 on the device; 1 when
        there are none, so a batch without loss tokens gives zero loss and gradients rather than NaN)."""
        local = torch.stack([torch.as_tensor(loss_fn.num_units(mb), dtype=torch.float64).reshape(()) for mb in micro])
        total = local.sum().to(self.device)
        if self.dp_size > 1:
            dist.all_reduce(total, group=self.pmesh["dp"].get_group())
        return torch.where(total > 0, total, torch.ones_like(total))

    def _pipeline_runs(self, batch: dict[str, Any], group: int = 1,
                       micro_batch_size: int | None = None) -> list[tuple[dict[str, Any], int]]:
        """(rows of one schedule run, its micro-batch count) over the batch; see :func:`pipeline_runs`.
        The runs are planned in examples of ``group`` rows, so no micro-batch splits an example;
        ``micro_batch_size`` examples per micro-batch (None: ``trainer.micro_batch_size``)."""
        n = num_rows(batch)
        if n % group:
            raise ValueError(f"the batch has {n} rows, not a multiple of the {group} rows of each example")
        runs = pipeline_runs(n // group, micro_batch_size or self.micro_batch_size,
                             self.job_cfg.parallel.pp_microbatches)
        runs = [(size * group, n_micro) for size, n_micro in runs]
        chunks = split_rows(batch, runs[0][0])
        return [(chunk, n) for chunk, (_, n) in zip(chunks, runs)]

    def _pipeline_train(self, batch, loss_fn, divisor, scale, group: int = 1) -> dict[str, torch.Tensor]:
        """Forward+backward of the batch through the pipeline schedule; gradients accumulate over runs."""

        def share(logits, mb):
            loss_sum, metrics = loss_fn(logits, mb)
            loss_sum = _plain(loss_sum)
            return loss_sum / divisor * scale, {_LOSS_SUM: loss_sum.detach(),
                                                **{k: _plain(v).detach() for k, v in metrics.items()}}

        sums: dict[str, torch.Tensor] = {}
        for chunk, n_micro in self._pipeline_runs(batch, group):
            _, metrics = self._runner(n_micro).train_step(chunk, share)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + v.to(self.device)
        return sums

    def _runner(self, n_microbatches: int) -> PipelineRunner:
        # One runner per micro-batch count: its schedules are cached by input shape only.
        if n_microbatches not in self._runners:
            self._runners[n_microbatches] = PipelineRunner(
                self.stages, self.pmesh["pp"], n_microbatches, self.job_cfg.parallel.pp_schedule,
                tied_group=self._tied_group)
        return self._runners[n_microbatches]

    @staticmethod
    def _accumulate(sums: dict[str, torch.Tensor], loss_sum: torch.Tensor, metrics: dict[str, torch.Tensor]) -> None:
        sums[_LOSS_SUM] = sums.get(_LOSS_SUM, 0) + loss_sum.detach()
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0) + _plain(v).detach()

    def _reduce_metrics(self, sums: dict[str, torch.Tensor], n_units: torch.Tensor) -> dict[str, float]:
        """Sums over dp ranks divided by ``N``; one world all-reduce, so every rank gets the same floats."""
        clash = [k for k in sums if k in _RESERVED]
        if clash:
            raise ValueError(f"the loss function returns metrics named {clash}, which the model reports itself; "
                             f"rename them")
        names = sorted(sums)
        values = torch.stack([torch.as_tensor(sums[k], device=self.device).double().reshape(()) for k in names])
        if dist.is_initialized() and dist.get_world_size() > 1:
            if not self._reports_metrics:
                values = torch.zeros_like(values)
            dist.all_reduce(values)
        values = (values / n_units).tolist()
        out = {"loss": values[names.index(_LOSS_SUM)]}
        out.update({k: v for k, v in zip(names, values) if k != _LOSS_SUM})
        return out

    # ----------------------------------------------------------------- inference
    @torch.no_grad()
    def forward(self, batch: dict[str, Any], fn: Callable[[torch.Tensor, dict], Any], rows_per_example: int = 1, *,
                micro_batch_size: int | None = None) -> Any:
        """No-grad eval-mode forward; ``fn(logits, micro_batch)`` per micro-batch of ``micro_batch_size``
        examples (None: ``trainer.micro_batch_size``; e.g. PPO's ``local_rollout_forward_batch_size``) of
        ``rows_per_example`` rows (2 keeps a chosen/rejected pair together), results concatenated along dim 0
        (on the model's device)."""
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"forward: micro_batch_size={micro_batch_size} must be >= 1")
        size = micro_batch_size or self.micro_batch_size
        was_training = [s.training for s in self.stages]
        for stage in self.stages:
            stage.eval()
        try:
            if self.pp_size > 1:
                return _concat([self._runner(n_micro).forward(chunk, fn)
                                for chunk, n_micro in self._pipeline_runs(batch, rows_per_example, size)])
            results = []
            for mb in split_rows(batch, _micro_rows(size, rows_per_example, fn)):
                results.append(fn(*self._logits(self._to_device(mb), fn)))
            return _concat(results)
        finally:
            for stage, mode in zip(self.stages, was_training):
                _reshard(stage)
                stage.train(mode)

    def _logits(self, mb: dict[str, Any], loss_fn: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """The model's output on a micro-batch, and the micro-batch the loss reads beside it.

        A loss that sums over tokens only (``loss_fn.token_level``, e.g. SFT's) may get the rows of a padded
        micro-batch laid end to end in one row without padding (:func:`pack_rows`), where that costs fewer
        FLOPs (:func:`packing_pays`). A loss that reads logits only where there are labels
        (``loss_fn.logits_at_labels``) gets the logits
        of those positions ``[b, K, V]`` and the micro-batch cut to the same positions: the final norm and
        the LM head then skip the prompt, most of a preference row, and no ``[b, T, V]`` tensor is made; the
        cut micro-batch also holds those ``logit_positions``.
        Under tensor parallelism the hidden states are sequence-sharded DTensors and the full logits are
        computed as before.
        """
        if getattr(loss_fn, "token_level", False) and self._packs(mb):
            mb = pack_rows(mb)
        inputs = _model_inputs(mb)
        if (getattr(loss_fn, "logits_at_labels", False) and self.pmesh.dims.tp == 1 and not self.value_head
                and "labels" in mb):
            positions = label_positions(mb["labels"])  # [b, K]
            cut = {**at_positions(mb, positions), "logit_positions": positions}
            return self.model(mb["tokens"], **inputs, logit_positions=positions), cut
        return self.model(mb["tokens"], **inputs), mb

    def _packs(self, mb: dict[str, Any]) -> bool:
        """Whether to lay a padded micro-batch's rows end to end (one process or FSDP: TP's sequence sharding
        and PP's fixed stage shapes keep the padded rows)."""
        if self.pmesh.dims.tp > 1 or self.pp_size > 1 or self.value_head or "attention_mask" not in mb:
            return False
        if not set(mb) <= PACKABLE_KEYS or mb["tokens"].shape[0] < 2:
            return False
        c = self.config
        layer_params = (c.hidden_size * c.head_dim * (c.num_attention_heads * 2 + c.num_key_value_heads * 2)
                        + 3 * c.hidden_size * c.intermediate_size)
        lengths = mb["attention_mask"].sum(-1)
        return packing_pays(lengths, mb["tokens"].shape[1], layer_params, c.num_attention_heads * c.head_dim)

    def _to_device(self, mb: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in mb.items()}

    # ----------------------------------------------------------------- phases
    def prepare_for_training(self) -> None:
        """Optimizer state back on the accelerator (when offloaded) and train mode."""
        self._onload_optimizer_state()
        for stage in self.stages:
            stage.train()

    def finish_training(self) -> None:
        """With ``parallel.optimizer_offload``, move AdamW's moments to CPU memory (no-op otherwise)."""
        if self.optimizer_offload:
            move_optimizer_state(self.optimizer, "cpu")
            self._state_offloaded = True

    def _onload_optimizer_state(self) -> None:
        if self._state_offloaded:
            move_optimizer_state(self.optimizer, self.device)
            self._state_offloaded = False

    def prepare_for_inference(self) -> None:
        """Eval mode; the rollout engine's memory back and its weights refit if they changed."""
        for stage in self.stages:
            stage.eval()
        self.rollout.onload()

    def finish_inference(self) -> None:
        """Release the rollout engine's memory (KV caches); back to train mode."""
        self.rollout.offload()
        for stage in self.stages:
            stage.train()

    # ----------------------------------------------------------------- rollouts
    def generate(self, prompts: list[list[int]], sampling: SamplingParams | None = None) -> Rollouts:
        """Sample responses to this dp rank's ``prompts`` (token ids) with the rollout engine, on the current
        weights; ``sampling`` defaults to ``job_cfg.generation``'s. See :mod:`aligner.wrappers.rollout`."""
        was_training = [s.training for s in self.stages]
        for stage in self.stages:
            stage.eval()
        try:
            return self.rollout.generate(prompts, sampling)
        finally:
            for stage, mode in zip(self.stages, was_training):
                stage.train(mode)

    def configure_generation(self, generation: Any = None, tokenizer: Any = None) -> None:
        """Rollout settings (a GenerationConfig) and tokenizer (or EOS ids) for the next ``generate``."""
        self.rollout.configure(generation, tokenizer)

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """``{"model", "optimizer", "scheduler"}``: sharded (DTensor) values under full-model names and
        flattened optimizer keys, so a checkpoint saved at one layout loads at another."""
        optimizer = get_optimizer_state_dict(self.model, self.optimizer, options=_FLAT)
        return {"model": get_model_state_dict(self.model),
                "optimizer": self._rename_tied(optimizer, to_embedding=True),
                "scheduler": self.scheduler.state_dict()}

    def _rename_tied(self, optimizer_state: dict[str, Any], to_embedding: bool) -> dict[str, Any]:
        if not self._tied_copies:
            return optimizer_state
        out = {}
        for key, value in optimizer_state.items():
            for head, embedding in _TIED_RENAMES:
                old, new = (head, embedding) if to_embedding else (embedding, head)
                if key.startswith(old):
                    key = new + key[len(old):]
            out[key] = value
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load :meth:`state_dict`'s structure (values possibly saved at another layout)."""
        set_model_state_dict(self.model, state_dict["model"])
        self.rollout.weights_changed()
        optimizer = self._rename_tied(state_dict["optimizer"], to_embedding=False)
        set_optimizer_state_dict(self.model, self.optimizer, optimizer, options=_FLAT)
        self.scheduler.load_state_dict(state_dict["scheduler"])
        # Loaded moments sit where the template had them; the next training phase puts them on the device.
        self._state_offloaded = self.optimizer_offload

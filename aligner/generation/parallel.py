"""The built-in rollout engine at any parallel layout (TP, FSDP/HSDP, PP), and its weight refit.

:class:`ParallelEngine` wraps an inner single-model engine (the built-in ``TorchEngine``) and decides which
module it generates on and which ranks generate what (``docs/generation.md``, "Parallel layouts and refit"):

- **Tensor parallel**: on the sharded training model itself. Each rank's KV cache holds only its own KV
  heads (the engine reads head counts off the sharded ``k_proj`` weight). The LM head's vocab-sharded
  logits are all-gathered to ``[B, T, V]`` by a forward hook that exists only during generation (``B x V``
  numbers per decode step), so every tp rank samples from bit-identical logits with one shared seed, draws
  the same tokens and stays in lockstep without a per-token broadcast. Sequence parallelism needs nothing:
  a 1-token decode step, or a prefill whose length does not divide by tp, is sharded unevenly over the
  sequence dim, which DTensor pads.
- **FSDP / HSDP**: every FSDP module is all-gathered once before the rollout and kept gathered
  (``reshard_after_forward`` off), so decode steps run no data-parallel collectives; afterwards the
  gathered weights are freed and the flags restored, so training memory is what it was. Each dp rank
  generates for its own prompts.
- **Pipeline parallel**: stages fold into data parallelism. Each rank assembles a full, unsharded copy of
  the model in the generation dtype (tp and FSDP shards gathered, stages broadcast over the pp group);
  the prompts of one data-parallel share are split over its ``pp x tp`` ranks, which generate
  independently, and the rollouts are all-gathered so every rank of the share returns all of them.
  Cost: one full model per rank, so this suits models that fit one device (pipelined models that do not
  should generate with the TensorRT-LLM backend).

Refit (:meth:`ParallelEngine.update_weights`, after each optimizer step): the live weights (TP, FSDP) need
none, FSDP gathers the current shards at each rollout; the PP copy is refilled in place and the inner
engine refit (for a cast copy it may keep), both once, at the start of the next rollout.

Every method is collective: all ranks of the job call it together, as they call ``train_step``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from aligner.generation.engine import GenerationEngine, Rollouts, SamplingParams
from aligner.generation.torch_engine import TorchEngine, generation_dtype
from aligner.models.transformer import Transformer
from aligner.parallel.mesh import ParallelMesh
from aligner.parallel.pipeline import split_layers

# Builds the inner single-model engine on a module (the live model, or the PP copy).
BuildEngine = Callable[[nn.Module], GenerationEngine]
logger = logging.getLogger("aligner.generation")
_SEED_RANGE = 2 ** 62
_SEED_STRIDE = 0x9E3779B97F4A7C15 % _SEED_RANGE  # spreads per-rank seeds far apart


# ----------------------------------------------------------------------------------------- FSDP
def _fsdp_modules(model: nn.Module) -> list[FSDPModule]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _reshards_after_forward(module: FSDPModule) -> bool:
    # FSDP2 keeps the flag as each parameter group's post-forward mesh (None: stay gathered).
    return any(g.post_forward_mesh_info is not None for g in module._get_fsdp_state()._fsdp_param_groups)


@contextlib.contextmanager
def gathered_fsdp_weights(model: nn.Module) -> Iterator[None]:
    """All-gather every FSDP module of ``model`` once and keep it gathered inside the block; reshard after.

    Collective over the FSDP mesh. Without FSDP this does nothing. After the block every parameter is its
    sharded DTensor again, the gathered memory is freed and ``reshard_after_forward`` is as before, so the
    next training step sees exactly the state it would have seen without the rollout.
    """
    modules = _fsdp_modules(model)
    flags = [(m, _reshards_after_forward(m)) for m in modules]
    try:
        for m in modules:
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
        yield
    finally:
        for m, flag in flags:
            m.set_reshard_after_forward(flag, recurse=False)
            m.reshard()
        if isinstance(model, FSDPModule):
            # Each no-grad forward appends to FSDP's post-forward order, which only a backward clears;
            # clear it here so that rollouts without training in between (aligner generate) do not grow it.
            model.reset_iter_state()


# ----------------------------------------------------------------------------------------- TP
def _gather_vocab(module: nn.Module, inputs, output):
    return output.full_tensor() if isinstance(output, DTensor) else output


@contextlib.contextmanager
def full_vocab_logits(model: nn.Module) -> Iterator[None]:
    """Inside the block the model returns plain logits ``[B, T, V]``: vocab-sharded DTensor logits of a
    tensor-parallel LM head are all-gathered (bit-identical on every tp rank). Outside, training keeps its
    vocab-parallel logits."""
    head = getattr(model, "output", None)
    if head is None:
        yield
        return
    handle = head.register_forward_hook(_gather_vocab)
    try:
        yield
    finally:
        handle.remove()


# ----------------------------------------------------------------------------------------- seeds
def _rank_sampling(sampling: SamplingParams, pmesh: ParallelMesh, stream: int, group: dist.ProcessGroup | None,
              group_src: int = 0) -> SamplingParams:
    """``sampling`` with the seed this rank samples with.

    An explicit seed is kept for stream 0 (so a data-parallel rank samples exactly as one process would on
    its prompts) and moved by ``stream`` otherwise (pipeline folds: each share its own random stream).
    Unseeded rollouts draw a seed from the default generator (whose state checkpoints save, so a resumed
    run draws the same), broadcast from ``group_src`` over ``group`` (the ranks that must sample alike),
    and offset by the data-parallel rank and ``stream``: ranks seeded alike by the trainer would otherwise
    draw identical random numbers for different prompts.
    """
    if sampling.seed is not None:
        if stream == 0:
            return sampling
        return _with_seed(sampling, (sampling.seed + stream * _SEED_STRIDE) % _SEED_RANGE)
    drawn = torch.randint(0, _SEED_RANGE, (1,), dtype=torch.int64)  # every rank draws: streams stay in step
    if group is not None and dist.get_world_size(group) > 1:
        if pmesh.mesh.device_type == "cuda":
            drawn = drawn.to(torch.device("cuda", torch.cuda.current_device()))
        dist.broadcast(drawn, group=group, group_src=group_src)
    stream_id = pmesh["dp"].get_local_rank() * max(1, _fold_size(pmesh)) + stream
    return _with_seed(sampling, (int(drawn.item()) + stream_id * _SEED_STRIDE) % _SEED_RANGE)


def _with_seed(sampling: SamplingParams, seed: int) -> SamplingParams:
    return dataclasses.replace(sampling, seed=seed)


def _fold_size(pmesh: ParallelMesh) -> int:
    return pmesh.dims.pp * pmesh.dims.tp if pmesh.dims.pp > 1 else 1


# ----------------------------------------------------------------------------------------- PP copy
def _owner_pp_rank(name: str, stage: nn.Module, pp_size: int) -> int:
    """The pipeline rank that holds parameter ``name`` of the full model."""
    info = stage.pipeline_stage
    if name.startswith("tok_embeddings."):
        stage_index = 0
    elif name.startswith(("norm.", "output.")):
        stage_index = info.num_stages - 1
    elif name.startswith("layers."):
        layer = int(name.split(".")[1])
        per_stage = split_layers(stage.config.num_hidden_layers, pp_size, info.num_stages // pp_size)
        stage_index = next(s for s, ids in enumerate(per_stage) if layer in ids)
    else:
        raise ValueError(f"parameter '{name}' belongs to no pipeline stage; the pipelined generation copy "
                         f"knows tok_embeddings, layers.N, norm and output")
    return stage_index % pp_size


def new_full_model(stages: Sequence[nn.Module], dtype: torch.dtype, device: torch.device) -> Transformer:
    """An empty full Transformer of the stages' config (parameters in ``dtype``, frozen) on ``device``."""
    cfg = stages[0].config
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)
    model.to_empty(device=device)
    model.requires_grad_(False)
    if cfg.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    with torch.no_grad():
        # The live model's RoPE buffer (same dtype, same values), so positions rotate identically.
        model.rope_inv_freq = stages[0].rope_inv_freq.detach().to(device).clone()
    return model.eval()


@torch.no_grad()
def copy_pipelined_weights(stages: Sequence[nn.Module], pmesh: ParallelMesh, full: Transformer) -> Transformer:
    """Fill ``full`` (from :func:`new_full_model`) with the current weights of every pipeline stage.

    Collective: each parameter is gathered over tp and FSDP by the ranks of the stage that owns it, cast to
    ``full``'s dtype and broadcast over the pp group. Peak extra memory: one parameter in full precision.
    """
    pp_size = pmesh.dims.pp
    pp_group = pmesh["pp"].get_group()
    pp_rank = pmesh["pp"].get_local_rank()
    held = {name: p for stage in stages for name, p in stage.named_parameters()}
    for name, dst in full.named_parameters():  # tied weights once, under the embedding's name
        owner = _owner_pp_rank(name, stages[0], pp_size)
        if owner == pp_rank:
            if name not in held:
                raise RuntimeError(f"pipeline rank {pp_rank} should hold '{name}' but its stages do not; "
                                   f"the stages were not cut by aligner.parallel.pipeline.cut_to_stage")
            src = held[name].detach()
            dst.copy_(src.full_tensor() if isinstance(src, DTensor) else src)
        if pp_size > 1:
            dist.broadcast(dst, group=pp_group, group_src=owner)
    return full


def _free_storage(model: nn.Module) -> None:
    for p in {id(p): p for p in model.parameters()}.values():
        p.untyped_storage().resize_(0)


def _restore_storage(model: nn.Module) -> None:
    for p in {id(p): p for p in model.parameters()}.values():
        p.untyped_storage().resize_(p.numel() * p.element_size())


# ----------------------------------------------------------------------------------------- rollouts
def _share(n: int, parts: int, index: int) -> slice:
    """Contiguous, near-even share ``index`` of ``n`` items split ``parts`` ways."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return slice(start, start + base + (1 if index < extra else 0))


def concat_rollouts(parts: Sequence[Rollouts]) -> Rollouts:
    """The rollouts of several prompt shares, in share order (prompt-major order is preserved)."""
    return Rollouts(prompt_token_ids=[x for r in parts for x in r.prompt_token_ids],
                    response_token_ids=[x for r in parts for x in r.response_token_ids],
                    logprobs=[x for r in parts for x in r.logprobs],
                    finish_reasons=[x for r in parts for x in r.finish_reasons],
                    response_lengths=[x for r in parts for x in r.response_lengths])


def _no_rollouts() -> Rollouts:
    return Rollouts(prompt_token_ids=[], response_token_ids=[], logprobs=[], finish_reasons=[])


class ParallelEngine:
    """A :class:`GenerationEngine` for a model at any parallel layout (see the module docstring).

    Args:
        stages: this rank's modules of the model: ``[model]`` without pipeline parallelism, else its
            pipeline stages (as ``PolicyModel.stages``); parameter names are the full model's.
        pmesh: the layout's :class:`aligner.parallel.ParallelMesh`.
        build_engine: builds the inner engine on a module, e.g.
            ``lambda m: TorchEngine(m, eos_ids, max_batch_size=64, dtype=None)``. It is called on the first
            ``generate``, with the FSDP weights gathered, so KV caches sized from the weights get this
            rank's tp heads. :func:`build_parallel_engine` makes one from a ``GenerationConfig``.
        copy_dtype: dtype of the pipeline-parallel copy (default: the stages' parameter dtype).

    Refit is lazy: :meth:`update_weights` marks the weights changed and the next ``generate`` refreshes
    what depends on them (the PP copy, the inner engine's cast copy) once, however many steps came between.
    """

    def __init__(self, stages: Sequence[nn.Module], pmesh: ParallelMesh, build_engine: BuildEngine, *,
                 copy_dtype: torch.dtype | None = None):
        self.stages = list(stages)
        self.pmesh = pmesh
        self._build_engine = build_engine
        self.pipelined = pmesh.dims.pp > 1
        first = next(self.stages[0].parameters())
        self._copy_dtype = copy_dtype or first.dtype
        self._device = first.device
        self._inner: GenerationEngine | None = None
        self._copy: Transformer | None = None  # PP: the full model every rank generates on
        self._stale = True  # the weights changed since the inner engine (or the copy) last read them
        self._offloaded = False
        self._inner_offloaded = False
        # Collective (it creates process groups), so made here, where every rank is.
        self._fold = pmesh.mesh["pp", "tp"]._flatten("pp_tp") if self.pipelined else None
        self._closed = False

    @property
    def inner(self) -> GenerationEngine | None:
        """The single-model engine (None until the first ``generate``)."""
        return self._inner

    @property
    def full_copy(self) -> Transformer | None:
        """Under PP, the full model copy this rank generates on (None otherwise, or before the first rollout)."""
        return self._copy

    # ------------------------------------------------------------------- GenerationEngine
    @torch.no_grad()
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingParams) -> Rollouts:
        """Rollouts of this data-parallel rank's prompts, identical on all of its tp and pp ranks."""
        self._check_open()
        self.onload()
        prompts = [list(p) for p in prompt_token_ids]
        if self.pipelined:
            return self._generate_folded(prompts, sampling)
        model = self.stages[0]
        tp_mesh = self.pmesh["tp"]
        sampling = _rank_sampling(sampling, self.pmesh, 0, tp_mesh.get_group() if tp_mesh.size() > 1 else None)
        with gathered_fsdp_weights(model), full_vocab_logits(model):
            return self._ready_engine(model).generate(prompts, sampling)

    def update_weights(self, model: nn.Module | Sequence[nn.Module] | None = None) -> None:
        """Refit: the next ``generate`` uses the current weights. ``model``: other modules to read the
        weights from from now on (default: the ones given at construction)."""
        self._check_open()
        if model is not None:
            self.stages = [model] if isinstance(model, nn.Module) else list(model)
        self._stale = True

    def offload(self) -> None:
        """Release the KV caches and, under PP, the full model copy."""
        self._check_open()
        if self._offloaded:
            return
        if self._inner is not None:
            self._inner.offload()
            self._inner_offloaded = True
        if self._copy is not None:
            _free_storage(self._copy)
            self._stale = True
        self._offloaded = True

    def onload(self) -> None:
        """Re-acquire what :meth:`offload` released: the PP copy's memory now (refilled at the next
        ``generate``); the inner engine's at the next ``generate``, inside its FSDP all-gather (an engine
        may size its caches from the gathered weights)."""
        self._check_open()
        if self._offloaded and self._copy is not None:
            _restore_storage(self._copy)
        self._offloaded = False

    def close(self) -> None:
        """Free the inner engine and the copy; the engine cannot be used afterwards."""
        if self._inner is not None:
            self._inner.close()
        self._inner, self._copy, self._closed = None, None, True

    # ------------------------------------------------------------------- internals
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this ParallelEngine was closed; build a new one to generate again")

    def _ready_engine(self, model: nn.Module) -> GenerationEngine:
        """The inner engine on ``model``, built, onloaded and refit (call with the weights gathered)."""
        if self._inner is None:
            self._inner = self._build_engine(model)  # reads the current weights
            self._stale = False
        if self._inner_offloaded:
            self._inner.onload()
            self._inner_offloaded = False
        if self._stale:
            self._inner.update_weights(model)
            self._stale = False
        return self._inner

    def _generate_folded(self, prompts: list[list[int]], sampling: SamplingParams) -> Rollouts:
        if self._copy is None:
            self._copy = new_full_model(self.stages, self._copy_dtype, self._device)
            self._stale = True
        if self._stale:
            copy_pipelined_weights(self.stages, self.pmesh, self._copy)  # collective over the whole job
        engine = self._ready_engine(self._copy)  # refits a cast copy the inner engine may keep
        parts, index = self._fold.size(), self._fold.get_local_rank()
        share = _share(len(prompts), parts, index)
        mine = prompts[share]
        if sampling.seed is not None:
            # Seeded: keep the seed and shift the prompt index, so the fold draws what one process would.
            sampling = dataclasses.replace(sampling, prompt_index_offset=sampling.prompt_index_offset + share.start)
        else:
            sampling = _rank_sampling(sampling, self.pmesh, index, None)
        rollouts = engine.generate(mine, sampling) if mine else _no_rollouts()
        gathered: list[Rollouts | None] = [None] * parts
        dist.all_gather_object(gathered, rollouts, group=self._fold.get_group())
        return concat_rollouts(gathered)


def build_parallel_engine(stages: nn.Module | Sequence[nn.Module], pmesh: ParallelMesh, gen_cfg: Any,
                          tokenizer: Any) -> ParallelEngine:
    """The built-in engine for a model (or this rank's pipeline ``stages``) at the layout of ``pmesh``, set up
    from a ``GenerationConfig``; ``tokenizer``: a tokenizer or the EOS token ids.

    Where the rollout computes in ``gen_cfg.dtype`` (``auto``: bfloat16 where the device computes it
    natively), and what is compiled:

    - PP: the copy is made in that dtype; the decode step is compiled on it.
    - FSDP: in the dtype the all-gather produces (``parallel.mixed_precision``), not compiled. FSDP swaps
      gathered and sharded parameters on its modules in hooks that neither a cast copy of the weights nor
      ``torch.compile(fullgraph=True)`` can follow. Set ``parallel.mixed_precision=bfloat16`` for bf16
      rollouts under FSDP.
    - TP, or one process: in that dtype (a cast copy, tp-sharded like the weights, when it differs from
      the training dtype; refreshed by ``update_weights``), compiled as configured.
    """
    stages = [stages] if isinstance(stages, nn.Module) else list(stages)
    first = next(stages[0].parameters())
    wanted = generation_dtype(gen_cfg.dtype, first.device, first.dtype)
    live_fsdp = pmesh.dims.pp == 1 and any(_fsdp_modules(s) for s in stages)

    def inner(model: nn.Module) -> GenerationEngine:
        engine = TorchEngine(model, tokenizer, max_batch_size=gen_cfg.max_batch_size,
                             dtype=None if live_fsdp else wanted, compile=gen_cfg.compile and not live_fsdp)
        if gen_cfg.dtype != "auto" and engine.dtype != wanted:
            logger.warning("generation.dtype=%s, but under FSDP rollouts compute in the dtype FSDP gathers the "
                           "weights in (%s); set parallel.mixed_precision to choose it", gen_cfg.dtype,
                           str(engine.dtype).removeprefix("torch."))
        return engine

    return ParallelEngine(stages, pmesh, inner, copy_dtype=wanted)

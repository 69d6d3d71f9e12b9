"""The built-in rollout engine: a static KV cache on the training model's own weights, continuous batching.

How a ``generate`` call runs (one process; ``aligner.generation.parallel`` adds TP / FSDP / PP):

1. Every sample (``n`` per prompt) waits in a queue. The KV cache has one row ("slot") per sample
   the call can run at once: the call's sample count capped at ``max_batch_size``, rounded up to a
   power of two (:func:`slot_count`). Each row has its own length
   (:class:`aligner.models.kv_cache.RowKVCache`).
2. Free slots take waiting samples: their prompts are prefilled together, right-padded (causal
   attention never looks right, so padding changes nothing), with logits computed only at each
   prompt's last token; samples of the same prompt share one prefill and copy its cache rows.
3. A decode step feeds one token to every slot, so within a call its shapes never change; it is
   compiled once per (slot count, cache length) and kept (``compile=True``; CUDA graphs on GPU), so
   calls of a size seen before re-trace nothing. Each row attends to its own prefix through a
   ``[B, 1, 1, W]`` mask built from per-row positions, where ``W`` is the longest row's length rounded
   up to 64 (a dynamic dimension of the compiled graph), so attention reads only the used part of the
   cache. Idle and finished rows compute and are ignored (the power-of-two rounding leaves fewer than
   half the slots idle). Tokens, log-probs and finish flags stay on the device.
4. Every ``sync_every`` steps the host reads one small tensor (which rows finished, or produced a
   token that could complete a stop string), collects finished rows and refills their slots.

Randomness is counter-based (``aligner.generation.sampling``): a sample's tokens depend on the seed,
its prompt index and its sample index only, never on the batch or slot it ran in.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import types
from typing import Any, Sequence

import torch
from torch import nn

from aligner.generation.continuous_batching import ContinuousBatch
from aligner.generation.engine import Rollouts, SamplingParams
from aligner.generation.sampling import logprobs_of, sample_next
from aligner.models.kv_cache import CacheRows, CacheWindow, build_row_kv_caches

_ENGINE_IDS = itertools.count()
_CACHE_ROUND = 256  # cache lengths are rounded up to this, so calls with similar lengths share one graph
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def generation_dtype(dtype: str | torch.dtype | None, device: torch.device, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype the engine computes in: ``"auto"`` is bfloat16 where the device computes it natively
    (CUDA with bf16; CPUs with AVX512-BF16 or AMX, where bf16 decoding measured ~2x faster than float32,
    see bench/RESULTS.md), else the model's dtype; ``None`` is the model's dtype."""
    if dtype is None:
        return model_dtype
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else model_dtype
        if device.type == "cpu":
            native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
            return torch.bfloat16 if native else model_dtype
        return model_dtype
    if dtype not in _DTYPES:
        raise ValueError(f"generation dtype '{dtype}' is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def slot_count(samples: int, max_batch_size: int) -> int:
    """KV-cache slots for a call of ``samples`` sequences: one per sample up to ``max_batch_size`` (more
    wait for a free slot), rounded up to a power of two (capped at ``max_batch_size``) so that calls of
    similar sizes share one compiled decode step."""
    if samples < 1 or max_batch_size < 1:
        raise ValueError(f"slot_count: samples={samples} and max_batch_size={max_batch_size} must be >= 1")
    wanted = min(samples, max_batch_size)
    return min(max_batch_size, 1 << (wanted - 1).bit_length())


def _eos_ids(model: nn.Module, tokenizer_or_eos_ids: Any) -> tuple[list[int], Any]:
    """(EOS ids, tokenizer or None): the tokenizer's EOS plus the model config's ``eos_token_id``."""
    if isinstance(tokenizer_or_eos_ids, int) or (
            isinstance(tokenizer_or_eos_ids, Sequence) and not isinstance(tokenizer_or_eos_ids, str)):
        ids = [tokenizer_or_eos_ids] if isinstance(tokenizer_or_eos_ids, int) else list(tokenizer_or_eos_ids)
        return sorted({int(i) for i in ids}), None
    tokenizer = tokenizer_or_eos_ids
    ids = set()
    for attr in ("eos_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            ids.update([value] if isinstance(value, int) else value)
    config_eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    if config_eos is not None:
        ids.update([config_eos] if isinstance(config_eos, int) else config_eos)
    return sorted(int(i) for i in ids), tokenizer


class TorchEngine:
    """Batched KV-cache generation on ``model``'s own parameters (see the module docstring).

    Args:
        model: a :class:`aligner.models.Transformer` (plain, or tensor-parallel via ``parallel.py``).
        tokenizer_or_eos_ids: a tokenizer (``eos_id`` / ``eos_token_id`` and ``decode``; needed for
            ``stop_strings``) or the EOS token ids. With a tokenizer, the model config's
            ``eos_token_id`` counts as EOS too; a list of ids is taken as the complete set.
        max_batch_size: most KV-cache slots (sequences decoded at once); each call allocates only
            :func:`slot_count` of them (its sample count, rounded up to a power of two).
        max_seq_len: cache length per slot (prompt + response); None sizes it from each call (the
            longest prompt + ``max_new_tokens``, rounded up to 256, grown when a call needs more).
        dtype: ``"auto"`` | ``"float32"`` | ``"bfloat16"`` | ``"float16"`` | a torch dtype | None (the
            model's). When it differs from the model's, the engine keeps one cast copy of the weights,
            refreshed by :meth:`update_weights`; otherwise it reads the live parameters (no copy).
        compile: ``torch.compile`` the decode step (``reduce-overhead``, i.e. CUDA graphs, on GPU).
        sync_every: decode steps between host checks for finished rows (default 1 on CPU, where a
            check costs microseconds, 4 on GPU, where each check waits for the device).
    """

    def __init__(self, model: nn.Module, tokenizer_or_eos_ids: Any, *, max_batch_size: int = 64,
                 max_seq_len: int | None = None, dtype: str | torch.dtype | None = "auto",
                 compile: bool = False, sync_every: int | None = None):
        if max_batch_size < 1:
            raise ValueError(f"TorchEngine max_batch_size={max_batch_size} must be >= 1")
        self.model = model
        self.eos_ids, self.tokenizer = _eos_ids(model, tokenizer_or_eos_ids)
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        first = next(p for p in model.parameters())
        self.device = first.device
        self.dtype = generation_dtype(dtype, self.device, first.dtype)
        self.sync_every = sync_every or (4 if self.device.type == "cuda" else 1)
        self.compile = compile
        self._weights: dict[str, torch.Tensor] | None = None  # cast copy, only when dtypes differ
        self._caches: dict | None = None
        self._cache_len = 0
        self._slots = 0
        # Compiled decode steps by (slots, cache length): graphs skip guards on modules (the caches
        # included), so each cache shape needs its own; kept, so a size seen before re-traces nothing.
        self._decoders: dict[tuple[int, int], Any] = {}
        self._token_texts: list[str] | None = None
        self._closed = False
        self.decode = self._decode_step

    # ---------------------------------------------------------------- GenerationEngine
    @torch.no_grad()
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingParams) -> Rollouts:
        """``sampling.n`` samples per prompt, prompt-major (see :class:`Rollouts`)."""
        if self._closed:
            raise RuntimeError("this TorchEngine was closed; build a new one to generate again")
        prompts = [[int(t) for t in p] for p in prompt_token_ids]
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"generate: prompt {i} is empty; every prompt needs at least one token")
        if sampling.stop_strings and self.tokenizer is None:
            raise ValueError("generate: stop_strings need a tokenizer; build the TorchEngine with the tokenizer "
                             "instead of bare EOS ids")
        if not prompts:
            return Rollouts([], [], [], [])
        self._ensure_weights()
        self._ensure_cache(max(map(len, prompts)) + sampling.max_new_tokens, len(prompts) * sampling.n)
        batch = ContinuousBatch(self, prompts, sampling)
        with self._caches_attached():
            batch.loop()
        return batch.rollouts()

    def update_weights(self, model: nn.Module | None = None) -> None:
        """Refit. On the live weights nothing is copied (the next step reads them); a cast copy is refreshed.
        ``model``: generate with this module from now on (same architecture)."""
        if model is not None and model is not self.model:
            self.model = model
            self._caches, self._slots = None, 0  # rebuilt for the new module at the next generate
            self._decoders = {}  # graphs traced on the old module
        if self._weights is not None:
            live = dict(self.model.named_parameters())
            for name, copy in self._weights.items():
                copy.copy_(live[name].detach())

    def offload(self) -> None:
        """Free the KV cache and any cast copy of the weights (re-made by the next generate)."""
        self._caches, self._cache_len, self._slots, self._weights = None, 0, 0, None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def onload(self) -> None:
        """Nothing to do eagerly: the next ``generate`` re-allocates what it needs."""

    def close(self) -> None:
        """Free everything; the engine cannot be used afterwards."""
        self.offload()
        self._closed = True

    # ---------------------------------------------------------------- model calls
    def _compiled(self, method):
        """``torch.compile`` of a private copy of ``method``: dynamo caches graphs per code object, so a
        copy with its own name keeps this engine's graphs (traced on its model) to itself."""
        fn = method.__func__
        name = f"{fn.__name__}_engine{next(_ENGINE_IDS)}"
        code = fn.__code__.replace(co_name=name, co_qualname=name)
        own = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
        own.__kwdefaults__ = fn.__kwdefaults__
        options = {
            # CUDA graphs on GPU (what mode="reduce-overhead" sets; mode and options exclude each other).
            "triton.cudagraphs": self.device.type == "cuda",
            # On CPU a lower realize threshold keeps inductor from recomputing each query's RoPE
            # (cos/sin) inside the attention-score loop once per key (2x faster attention).
            "realize_cpu_opcount_threshold": 8,
            # Guards on the model's modules are skipped: checking ~300 parameters costs ~1 ms per step,
            # and this private copy only ever runs on this engine's model, whose structure generation
            # never changes (a new model or cache shape gets a new copy).
            "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
        }
        return torch.compile(types.MethodType(own, self), fullgraph=True, options=options)

    def _forward(self, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
        if self._weights is None:
            return self.model(tokens, **kwargs)
        return torch.func.functional_call(self.model, self._weights, (tokens,), kwargs, strict=False)

    def _decode_step(self, tokens, positions, window, keys, steps, temperature, top_p, min_new, *,
                     top_k: int, greedy: bool, suppress_ids: torch.Tensor | None):
        """One token for every slot: ``tokens, positions [B]`` -> (next tokens, their log-probs) ``[B]``.

        ``window``: cache positions ``[W]`` to attend over (a dynamic dim: one graph for every length).
        """
        mask = (window[None, :] <= positions[:, None])[:, None, None, :]  # [B, 1, 1, W]
        # One query per row: attention runs as two matmuls (transformer.single_query_attention), not SDPA.
        logits = self._forward(tokens[:, None], position_ids=positions[:, None], mask=mask,
                               input_pos=CacheWindow(positions[:, None], window.shape[0]))[:, 0]  # [B, V]
        return self.sample(logits, keys, steps, temperature, top_p, min_new,
                           top_k=top_k, greedy=greedy, suppress_ids=suppress_ids)

    @staticmethod
    def sample(logits, keys, steps, temperature, top_p, min_new, *, top_k, greedy, suppress_ids):
        """(next tokens, their log-probs) ``[b]`` from ``logits [b, V]`` (see ``sampling.sample_next``)."""
        suppress_rows = steps < min_new if suppress_ids is not None else None
        tokens = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, keys=keys, steps=steps,
                             suppress_ids=suppress_ids, suppress_rows=suppress_rows, greedy=greedy)
        return tokens, logprobs_of(logits, tokens, temperature)

    def prefill_logits(self, tokens: torch.Tensor, rows: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Run right-padded prompts ``tokens [u, T]`` into cache rows ``rows [u]``; logits ``[u, V]`` at
        positions ``last [u]`` (only those positions go through the LM head)."""
        u, T = tokens.shape
        positions = torch.arange(T, device=tokens.device).expand(u, T)

        def take_last(module, args):
            h = args[0]
            return (h[torch.arange(u, device=h.device), last][:, None],) if type(h) is torch.Tensor else None

        head = getattr(self.model, "output", None)
        handle = head.register_forward_pre_hook(take_last) if head is not None else None
        try:
            logits = self._forward(tokens, position_ids=positions, input_pos=CacheRows(rows, positions))
        finally:
            if handle is not None:
                handle.remove()
        if logits.shape[1] != 1:  # the hook could not cut (e.g. a DTensor input): take the rows now
            logits = logits[torch.arange(u, device=logits.device), last][:, None]
        return logits[:, 0]

    # ---------------------------------------------------------------- memory
    def _ensure_weights(self) -> None:
        if self._weights is not None:
            return
        params = dict(self.model.named_parameters())
        if all(p.dtype == self.dtype or not p.is_floating_point() for p in params.values()):
            return
        from torch.distributed.fsdp import FSDPModule

        if any(isinstance(m, FSDPModule) for m in self.model.modules()):
            return  # FSDP gathers its shards in its own compute dtype; a copy would need its own sharding
        self._weights = {n: p.detach().to(self.dtype) for n, p in params.items()}

    def _ensure_cache(self, need: int, samples: int) -> None:
        """A cache of :func:`slot_count` rows for ``samples`` sequences, each at least ``need`` positions long,
        and the decode step compiled for its shape."""
        limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        if limit is not None and need > limit:
            raise ValueError(f"generate: longest prompt + max_new_tokens = {need} positions exceeds the model's "
                             f"max_position_embeddings={limit}; shorten the prompts or max_new_tokens")
        if self.max_seq_len is not None:
            if need > self.max_seq_len:
                raise ValueError(f"generate: longest prompt + max_new_tokens = {need} exceeds the engine's "
                                 f"max_seq_len={self.max_seq_len}; raise max_seq_len or shorten the prompts")
            length = self.max_seq_len
        else:
            length = max(self._cache_len, math.ceil(need / _CACHE_ROUND) * _CACHE_ROUND)
            if limit is not None:
                length = min(length, limit)
        slots = slot_count(samples, self.max_batch_size)
        if self.compile:
            if (slots, length) not in self._decoders:
                self._decoders[(slots, length)] = self._compiled(self._decode_step)
            self.decode = self._decoders[(slots, length)]
        if self._caches is None or length != self._cache_len or slots != self._slots:
            self._caches = None  # free the old one first
            self._caches = build_row_kv_caches(self.model, slots, length, self.dtype, self.device)
            self._cache_len, self._slots = length, slots

    @contextlib.contextmanager
    def _caches_attached(self):
        # Attached only while generating: the training forward must run without them.
        layers = self.model.layers
        try:
            for name, cache in self._caches.items():
                layers[name].self_attn.kv_cache = cache
            yield
        finally:
            for name in self._caches:
                layers[name].self_attn.kv_cache = None

    def token_texts(self) -> list[str]:
        """Each vocabulary id decoded alone (cached): which tokens could complete a stop string."""
        if self._token_texts is None:
            V = self.model.config.vocab_size
            self._token_texts = [self.tokenizer.decode([i], skip_special_tokens=True) for i in range(V)]
        return self._token_texts

    def copy_cache_rows(self, src: torch.Tensor, dst: torch.Tensor, length: int) -> None:
        """Copy the first ``length`` cache positions of rows ``src`` into rows ``dst`` in every layer."""
        for cache in self._caches.values():
            cache.copy_rows(src, dst, length)

    @property
    def cache_len(self) -> int:
        """Positions per KV-cache row (prompt + response) as currently allocated."""
        return self._cache_len

    @property
    def slots(self) -> int:
        """KV-cache rows (sequences decoded at once) as currently allocated: :func:`slot_count` of the last
        call; 0 when no cache is allocated."""
        return self._slots

"""TensorRT-LLM as a rollout backend (``generation.backend=trtllm``) behind :class:`GenerationEngine`.

Written against TensorRT-LLM's Python LLM API, PyTorch backend (``tensorrt_llm.LLM``,
``tensorrt_llm.SamplingParams``, ``LLM.generate`` on token-id prompts returning ``RequestOutput`` /
``CompletionOutput``), and its RL refit path: ``tensorrt_llm.llmapi.rlhf_utils.WorkerExtension.update_weights``
called through ``LLM._collective_rpc`` with CUDA-IPC handles, under the Ray orchestrator. TensorRT-LLM needs
NVIDIA GPUs and its container, so what runs here is the adapter logic (sampling translation, stop and finish
handling, log-probs, refit names and tensors), unit-tested against a fake ``tensorrt_llm`` module that follows
that API; docs/generation.md says which API version and what was and was not verified.

How our conventions are kept on top of TensorRT-LLM's:

* EOS stays in the response with its log-prob: TensorRT-LLM drops ``end_id`` from outputs, so ``end_id`` is
  disabled (-1) and EOS is passed as a stop token id, which ``include_stop_str_in_output`` keeps.
* Greedy is ``top_k=1`` (greedy in every API version); an unset temperature/top-k/top-p would also mean greedy
  to TensorRT-LLM, so sampling always passes all three.
* Log-probs follow our convention (log_softmax(logits / temperature), before top-k/top-p): TensorRT-LLM's
  ``RAW`` log-probs are log_softmax(logits), right for greedy and temperature 1; ``PROCESSED`` ones include the
  temperature, right when top-k/top-p are off. With both a temperature != 1 and top-k/top-p, ``PROCESSED`` is
  renormalised over the kept tokens (it exceeds ours by -log of the kept mass); such settings already get the
  negative-KL warning in training.
* Stop strings are checked on the decoded text here as well (TensorRT-LLM matches their token ids only).
* Seeds: TensorRT-LLM's default seed is 0 for every request, so an unseeded call draws a base seed from
  torch's RNG; request ``i`` gets ``base + i``.
"""
from __future__ import annotations

import importlib
import json
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from aligner.generation.engine import Rollouts, SamplingParams
from aligner.generation.trtllm_refit import (
    check_complete_model,
    hf_weights,
    ipc_handles,
    weight_buckets,
    write_model_skeleton,
)
from aligner.models.hf import to_torch_dtype

INSTALL_HINT = (
    "generation.backend=trtllm needs TensorRT-LLM, which is not installed: run `pip install aligner[trtllm]` "
    "inside NVIDIA's TensorRT-LLM container (nvcr.io/nvidia/tensorrt-llm/release; see docs/generation.md), or use "
    "generation.backend=torch (the built-in engine, no extra packages)"
)
# The worker extension whose update_weights receives refits (shipped with TensorRT-LLM).
WORKER_EXTENSION = "tensorrt_llm.llmapi.rlhf_utils.WorkerExtension"
# Executor memory released by offload(): everything, KV cache included (TensorRT-LLM's sleep tags).
SLEEP_TAGS = ("sampler", "drafter", "guided_decoder", "spec_resource_manager", "model_extra", "executor_extra",
              "model", "draft_model", "kv_cache")


def import_tensorrt_llm() -> Any:
    """The ``tensorrt_llm`` module, or an ImportError that says how to install it."""
    try:
        return importlib.import_module("tensorrt_llm")
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from e


def trtllm_dtype(dtype: str) -> str:
    """``generation.dtype`` as TensorRT-LLM's ``dtype`` argument: ``auto`` is bfloat16 (every GPU it runs on
    has it); the others pass through."""
    return "bfloat16" if dtype == "auto" else dtype


def _logprob_mode_kwargs(sampling: SamplingParams) -> dict[str, Any]:
    """``logprobs_mode`` that gives our log-prob convention (see the module docstring)."""
    wants_temperature = not sampling.greedy and sampling.temperature != 1.0
    try:
        mode = importlib.import_module("tensorrt_llm.sampling_params").LogprobMode
    except (ImportError, AttributeError):
        if wants_temperature:
            raise ValueError(f"generation.temperature={sampling.temperature}: this TensorRT-LLM has no "
                             f"SamplingParams.logprobs_mode, so its log-probs ignore the temperature; upgrade "
                             f"TensorRT-LLM, or sample at temperature 1.0 or 0") from None
        return {}  # older releases return raw log-probs, which is what greedy and temperature 1 need
    return {"logprobs_mode": mode.PROCESSED if wants_temperature else mode.RAW}


def to_trtllm_sampling(trt: Any, sampling: SamplingParams, *, eos_ids: Sequence[int], pad_id: int | None,
                       seed: int, n: int) -> Any:
    """Our :class:`SamplingParams` as one ``tensorrt_llm.SamplingParams`` request with ``n`` samples."""
    if sampling.min_new_tokens > 0:
        # TensorRT-LLM enforces a minimum length on end_id only, which would drop EOS and its log-prob.
        raise ValueError(f"generation.min_new_tokens={sampling.min_new_tokens} is not supported by the TensorRT-LLM "
                         f"backend; use generation.backend=torch, or min_new_tokens=0 (what RL training wants)")
    stop_ids = [] if sampling.ignore_eos else list(eos_ids)
    stop_ids += [t for t in sampling.stop_token_ids if t not in stop_ids]
    if sampling.greedy:
        choice = dict(top_k=1)  # greedy in every release; temperature=0 is refused by older ones
    else:
        choice = dict(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
    return trt.SamplingParams(
        max_tokens=sampling.max_new_tokens, n=n, seed=seed, end_id=-1, pad_id=pad_id,
        stop_token_ids=stop_ids or None, stop=[s for s in sampling.stop_strings if s] or None,
        include_stop_str_in_output=True,
        ignore_eos=sampling.ignore_eos, logprobs=1, detokenize=False, **choice, **_logprob_mode_kwargs(sampling))


def finish_reason_of(completion: Any, eos_ids: Sequence[int]) -> str:
    """A ``CompletionOutput``'s finish as ours: ``eos`` / ``stop`` / ``length``."""
    reason = completion.finish_reason
    if reason == "length":
        return "length"
    if reason == "stop":
        # stop_reason: the stop token id or string that ended it; None for TensorRT-LLM's own end_id.
        return "eos" if completion.stop_reason is None or completion.stop_reason in eos_ids else "stop"
    raise RuntimeError(f"TensorRT-LLM finished a request with reason {reason!r} (stop_reason "
                       f"{completion.stop_reason!r}); only stop and length are expected: check the server log")


def sampled_logprobs(completion: Any, tokens: Sequence[int]) -> list[float]:
    """The log-prob of each sampled token from ``CompletionOutput.logprobs``: a list with one
    ``{token_id: Logprob(logprob, rank)}`` dict per token (older releases: one float per token)."""
    entries = completion.logprobs
    if entries is None or len(entries) != len(tokens):
        got = "none" if entries is None else len(entries)
        raise RuntimeError(f"TensorRT-LLM returned {got} log-probs for {len(tokens)} tokens; the request asked for "
                           f"logprobs=1, so this TensorRT-LLM release reports them differently")
    values = []
    for position, (token, entry) in enumerate(zip(tokens, entries)):
        if isinstance(entry, dict):
            if token not in entry:
                raise RuntimeError(f"TensorRT-LLM's log-probs at position {position} cover tokens {sorted(entry)} "
                                   f"but not the sampled token {token}; upgrade TensorRT-LLM (newer releases "
                                   f"always include the sampled token)")
            entry = entry[token]
        values.append(float(getattr(entry, "logprob", entry)))
    return values


def first_stop_string_end(tokens: Sequence[int], stop_strings: Sequence[str], tokenizer: Any) -> int | None:
    """The shortest ``k`` whose decoded ``tokens[:k]`` (special tokens skipped, as the built-in engine
    decodes) contains a stop string, or None."""
    stop_strings = [s for s in stop_strings if s]

    def hit(k: int) -> bool:
        text = tokenizer.decode(list(tokens[:k]), skip_special_tokens=True)
        return any(s in text for s in stop_strings)

    if not stop_strings or not tokens or not hit(len(tokens)):
        return None
    low, high = 1, len(tokens)  # containment only grows with k: binary search for the first hit
    while low < high:
        mid = (low + high) // 2
        if hit(mid):
            high = mid
        else:
            low = mid + 1
    return low


def _group_rank(group: Any) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def _group_size(group: Any) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _gather_to_leader(obj: Any, group: Any) -> list[Any] | None:
    """Every rank's ``obj`` on the group's rank 0 (None elsewhere)."""
    if _group_size(group) == 1:
        return [obj]
    out = [None] * _group_size(group) if _group_rank(group) == 0 else None
    dist.gather_object(obj, out, dst=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return out


def _scatter_from_leader(per_rank: list[Any] | None, group: Any) -> Any:
    """Rank ``r`` of the group gets ``per_rank[r]`` from the group's rank 0."""
    if _group_size(group) == 1:
        return per_rank[0]
    out = [None]
    dist.scatter_object_list(out, per_rank, src=dist.get_global_rank(group, 0) if group is not None else 0,
                             group=group)
    return out[0]


def _barrier(group: Any) -> None:
    if _group_size(group) > 1:
        dist.barrier(group=group)


def llm_kwargs(trt: Any, model_dir: str | Path, gen_cfg: Any, tensor_parallel_size: int,
               load_format: str = "auto") -> dict[str, Any]:
    """Arguments of ``tensorrt_llm.LLM`` for ``generation`` settings ``gen_cfg``."""
    from tensorrt_llm.llmapi import KvCacheConfig

    kwargs: dict[str, Any] = dict(
        model=str(model_dir), tensor_parallel_size=tensor_parallel_size, dtype=trtllm_dtype(gen_cfg.dtype),
        max_batch_size=gen_cfg.max_batch_size, load_format=load_format,
        kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=gen_cfg.trtllm.kv_cache_memory_fraction,
                                      enable_block_reuse=True),
        # update_weights and collective RPCs exist only on the Ray executor.
        orchestrator_type="ray", ray_worker_extension_cls=WORKER_EXTENSION)
    try:  # offload()/onload() need sleep support switched on when the engine is built
        from tensorrt_llm.llmapi.llm_args import SleepConfig

        kwargs["sleep_config"] = SleepConfig()
    except ImportError:
        kwargs["enable_sleep"] = True  # releases before sleep_config
    if not gen_cfg.compile:
        kwargs["cuda_graph_config"] = None
    return kwargs


class TrtLlmEngine:
    """A :class:`~aligner.generation.engine.GenerationEngine` on a TensorRT-LLM ``LLM``.

    One ``LLM`` serves the ranks of ``group`` (default: every rank): it lives on the group's rank 0, the other
    ranks send it their prompts and get their rollouts back, so every rank calls :meth:`generate` with its own
    prompts as with the built-in engine. Ranks with the same ``share_key`` (the tp and pp ranks of one
    data-parallel share; default: the rank itself) pass the same prompts: those are generated once and every
    such rank gets the same rollouts. ``update_weights`` sends every rank's full weights (CUDA-IPC handles for
    its own GPU) to the workers on the same GPUs. Built by :func:`build_trtllm_engine`, or directly on a
    Hugging Face directory (``aligner generate``).
    """

    def __init__(self, model_dir: str | Path, gen_cfg: Any, tokenizer: Any, *, tensor_parallel_size: int = 1,
                 load_format: str = "auto", group: Any = None, share_key: int | None = None):
        self._trt = import_tensorrt_llm()
        if tokenizer.eos_id is None:
            raise ValueError(f"{getattr(tokenizer, 'source', 'the tokenizer')} has no EOS token; TensorRT-LLM "
                             f"generation stops on it (set eos_token in tokenizer_config.json)")
        self.gen_cfg, self.tokenizer, self.group = gen_cfg, tokenizer, group
        self.is_leader = _group_rank(group) == 0
        self.share_key = _group_rank(group) if share_key is None else share_key
        self.source_model: nn.Module | None = None  # what update_weights() refits from by default
        config_file = Path(model_dir) / "config.json"
        hf_config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        self.num_hidden_layers = hf_config.get("num_hidden_layers")
        # EOS: the tokenizer's and the model config's (an instruct model's end-of-turn may be either).
        config_eos = hf_config.get("eos_token_id")
        config_eos = [] if config_eos is None else [config_eos] if isinstance(config_eos, int) else config_eos
        self.eos_ids = sorted({tokenizer.eos_id, *config_eos})
        self._tmp_dir: tempfile.TemporaryDirectory | None = None
        self.llm = (self._trt.LLM(**llm_kwargs(self._trt, model_dir, gen_cfg, tensor_parallel_size, load_format))
                    if self.is_leader else None)
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this TrtLlmEngine was closed; build a new one")

    # ----------------------------------------------------------------- generation
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingParams) -> Rollouts:
        """``sampling.n`` samples per prompt, prompt-major (see :class:`GenerationEngine`)."""
        self._check_open()
        prompts = [[int(t) for t in p] for p in prompt_token_ids]
        # Every rank draws, so RNG streams stay aligned across ranks; the leader's draw is used.
        drawn = int(torch.randint(0, 2**31 - 1, ()).item()) if sampling.seed is None else sampling.seed
        per_rank = _gather_to_leader((self.share_key, prompts), self.group)
        results = None
        if self.is_leader:
            shares = dict(per_rank)  # one entry per share key, in first-seen (rank) order
            rollouts = self._generate_here([p for share in shares.values() for p in share], sampling, drawn)
            by_key, start = {}, 0
            for key, share in shares.items():
                rows = slice(start, start + len(share) * sampling.n)
                by_key[key] = Rollouts(rollouts.prompt_token_ids[rows], rollouts.response_token_ids[rows],
                                       rollouts.logprobs[rows], rollouts.finish_reasons[rows])
                start = rows.stop
            results = [by_key[key] for key, _ in per_rank]
        return _scatter_from_leader(results, self.group)

    def _generate_here(self, prompts: list[list[int]], sampling: SamplingParams, base_seed: int) -> Rollouts:
        # TensorRT-LLM refuses n > 1 greedy samples in one request; n identical requests give the same rows.
        repeats, n_per_request = (sampling.n, 1) if sampling.greedy else (1, sampling.n)
        requests = [p for p in prompts for _ in range(repeats)]
        params = [to_trtllm_sampling(self._trt, sampling, eos_ids=self.eos_ids, pad_id=self.tokenizer.pad_id,
                                     seed=base_seed + i, n=n_per_request) for i in range(len(requests))]
        outputs = self.llm.generate(requests, params, use_tqdm=False) if requests else []
        out = Rollouts([], [], [], [])
        for prompt, request_output in zip(requests, outputs):
            completions = sorted(request_output.outputs, key=lambda c: c.index)
            if len(completions) != n_per_request:
                raise RuntimeError(f"TensorRT-LLM returned {len(completions)} samples for a request of "
                                   f"n={n_per_request}")
            for completion in completions:
                tokens, logprobs, finish = self._convert(completion, sampling)
                out.prompt_token_ids.append(prompt)
                out.response_token_ids.append(tokens)
                out.logprobs.append(logprobs)
                out.finish_reasons.append(finish)
        out.response_lengths = [len(r) for r in out.response_token_ids]
        return out

    def _convert(self, completion: Any, sampling: SamplingParams) -> tuple[list[int], list[float], str]:
        tokens = list(completion.token_ids)
        logprobs = sampled_logprobs(completion, tokens)
        finish = finish_reason_of(completion, self.eos_ids)
        cut = first_stop_string_end(tokens, sampling.stop_strings, self.tokenizer)
        if cut is not None and (cut < len(tokens) or finish == "length"):
            tokens, logprobs, finish = tokens[:cut], logprobs[:cut], "stop"
        return tokens, logprobs, finish

    # ----------------------------------------------------------------- refit
    def update_weights(self, model: nn.Module | None = None) -> None:
        """Send ``model``'s current weights (default: :attr:`source_model`) to the TensorRT-LLM workers.

        Collective over the group: every rank sends its full tensors, in buckets of
        ``generation.trtllm.refit_bucket_mb``, as CUDA-IPC handles keyed by its GPU's UUID; the leader passes
        each bucket to ``WorkerExtension.update_weights`` and finalises with ``update_weights(None)``.
        """
        self._check_open()
        model = model if model is not None else self.source_model
        if model is None:
            raise ValueError("TrtLlmEngine.update_weights needs the trained model (update_weights(policy.model)): "
                             "the engine holds its own copy of the weights")
        if self.num_hidden_layers is not None:
            check_complete_model(model, self.num_hidden_layers)
        dtype = to_torch_dtype(trtllm_dtype(self.gen_cfg.dtype))
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        uuid = self._device_uuid()
        max_bytes = self.gen_cfg.trtllm.refit_bucket_mb * 2**20
        for bucket in weight_buckets(hf_weights(model, dtype, device), max_bytes):
            payloads = _gather_to_leader({uuid: ipc_handles(bucket)}, self.group)
            if self.is_leader:
                merged = {k: v for payload in payloads for k, v in payload.items()}
                self.llm._collective_rpc("update_weights", (merged,))
            _barrier(self.group)  # the bucket's tensors stay alive until every worker has copied them
        if self.is_leader:
            self.llm._collective_rpc("update_weights", (None,))  # finalise: post-load processing, cache reset
        _barrier(self.group)

    def _device_uuid(self) -> str:
        from tensorrt_llm._torch.utils import get_device_uuid

        # Without CUDA (the unit tests' fake) device 0 stands in.
        return get_device_uuid(torch.cuda.current_device() if torch.cuda.is_available() else 0)

    # ----------------------------------------------------------------- memory
    def offload(self) -> None:
        """Release the engine's GPU memory (weights and KV cache) for training; :meth:`onload` restores it."""
        self._check_open()
        if self.is_leader:
            if hasattr(self.llm, "release"):
                self.llm.release()
            else:
                self.llm._collective_rpc("sleep", (list(SLEEP_TAGS),))
        _barrier(self.group)

    def onload(self) -> None:
        """Re-acquire what :meth:`offload` released."""
        self._check_open()
        if self.is_leader:
            if hasattr(self.llm, "resume"):
                self.llm.resume()
            else:
                self.llm._collective_rpc("wakeup", (list(SLEEP_TAGS),))
        _barrier(self.group)

    def close(self) -> None:
        """Shut the TensorRT-LLM executor down (its Ray workers too)."""
        if self._closed:
            return
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None
        if self._tmp_dir is not None:
            self._tmp_dir.cleanup()
        self._closed = True


def build_trtllm_engine(model_or_policy: Any, gen_cfg: Any, tokenizer: Any) -> TrtLlmEngine:
    """A :class:`TrtLlmEngine` holding ``model_or_policy``'s current weights (what ``build_engine`` calls for
    ``generation.backend=trtllm``).

    ``model_or_policy`` is a Transformer or a PolicyModel (``.model``, ``.config``, ``.pmesh``). TensorRT-LLM
    builds the architecture from a weightless directory and the first refit sends the weights, so nothing is
    written to disk but ``config.json`` and the tokenizer. ``generation.trtllm.tensor_parallel_size=-1``
    takes the policy's ``parallel.tp``.
    """
    model = getattr(model_or_policy, "model", model_or_policy)
    config = getattr(model_or_policy, "config", None) or model.config
    pmesh = getattr(model_or_policy, "pmesh", None)
    tp = gen_cfg.trtllm.tensor_parallel_size
    if tp == -1:
        tp = pmesh.dims.tp if pmesh is not None else 1
    share_key = pmesh["dp"].get_local_rank() if pmesh is not None else None  # tp/pp ranks share prompts
    tmp = tempfile.TemporaryDirectory(prefix="aligner-trtllm-")
    skeleton = write_model_skeleton(config, tokenizer, tmp.name, trtllm_dtype(gen_cfg.dtype))
    engine = TrtLlmEngine(skeleton, gen_cfg, tokenizer, tensor_parallel_size=tp, load_format="dummy",
                          share_key=share_key)
    engine._tmp_dir = tmp
    engine.source_model = model
    engine.update_weights(model)
    return engine

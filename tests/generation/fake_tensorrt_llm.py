"""A stand-in for the ``tensorrt_llm`` package, shaped like the parts of its LLM API the adapter calls.

Follows TensorRT-LLM's behaviour where the adapter depends on it: ``SamplingParams`` fields and its refusal
of n > 1 greedy samples; unset temperature/top-k/top-p meaning greedy; ``end_id`` ending a sequence
*without* the token; stop token ids and stop strings (matched on their token ids) ending it with the
token kept when ``include_stop_str_in_output``; ``finish_reason`` / ``stop_reason``; per-token log-probs as
``{token_id: Logprob(logprob, rank)}`` dicts; ``_collective_rpc("update_weights", (handles,))`` decoding
base64-pickled ``reduce_tensor`` handles as ``rlhf_utils.WorkerExtension`` does. The "model" is a script:
``FakeLLM.script[tuple(prompt)]`` lists the token sequence each sample would produce.

``install(monkeypatch, modern=True)`` puts the modules into ``sys.modules``; ``modern=False`` imitates an
older release (no ``LogprobMode``, no ``SleepConfig``).
"""
from __future__ import annotations

import base64
import enum
import pickle
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union


@dataclass
class Logprob:
    logprob: float
    rank: Optional[int] = None


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: Optional[float] = None
    logprobs: Optional[list[dict[int, Logprob]]] = field(default_factory=list)
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt: Optional[str] = None
    finished: bool = True


class LogprobMode(enum.Enum):
    RAW = "raw"
    PROCESSED = "processed"


@dataclass(kw_only=True)
class SamplingParams:
    end_id: Optional[int] = None
    pad_id: Optional[int] = None
    max_tokens: int = 32
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    include_stop_str_in_output: bool = False
    n: int = 1
    best_of: Optional[int] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    temperature: Optional[float] = None
    min_tokens: Optional[int] = None
    logprobs: Optional[int] = None
    ignore_eos: bool = False
    detokenize: bool = True
    logprobs_mode: LogprobMode = LogprobMode.RAW

    def __post_init__(self):
        if self.pad_id is None:
            self.pad_id = self.end_id
        self.best_of = self.best_of or self.n
        if self.best_of > 1 and self._greedy_decoding:
            raise ValueError(f"Greedy decoding in the LLM API does not allow multiple returns (best_of={self.best_of})")
        if self.top_p is not None and not 0 <= self.top_p <= 1:
            raise ValueError("top_p must be in [0, 1]")
        if self.temperature is not None and self.temperature < 0:
            raise ValueError("temperature must be >= 0")

    @property
    def _greedy_decoding(self) -> bool:
        return ((self.temperature is None and self.top_p is None and self.top_k is None)
                or self.top_k == 1 or self.top_p == 0.0 or self.temperature == 0)


class OldSamplingParams(SamplingParams):
    """A release before ``logprobs_mode``: passing it is a TypeError, like an unknown dataclass field."""

    def __init__(self, **kwargs):
        if "logprobs_mode" in kwargs:
            raise TypeError("__init__() got an unexpected keyword argument 'logprobs_mode'")
        super().__init__(**kwargs)


class KvCacheConfig:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class SleepConfig:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


def get_device_uuid(index: int) -> str:
    return f"GPU-fake-{index}"


def raw_logprob(position: int) -> float:
    """The fake model's log-prob of the token it emits at ``position`` (RAW mode)."""
    return -0.1 * (position + 1)


class FakeLLM:
    """``tensorrt_llm.LLM`` on a scripted "model"; every instance is kept in ``FakeLLM.instances``."""

    instances: list["FakeLLM"] = []
    script: dict[tuple[int, ...], list[list[int]]] = {}
    encode: Callable[[str], list[int]] = staticmethod(lambda text: [ord(c) for c in text])

    def __init__(self, model: str, tensor_parallel_size: int = 1, dtype: str = "auto", **kwargs: Any):
        self.model, self.tensor_parallel_size, self.dtype, self.kwargs = model, tensor_parallel_size, dtype, kwargs
        self.generate_calls: list[tuple[list, Any, bool]] = []
        self.rpc_calls: list[tuple[str, tuple]] = []
        self.weights: dict[str, Any] = {}  # what update_weights received, by Hugging Face name
        self.finalized = 0
        self.is_shutdown = False
        FakeLLM.instances.append(self)

    def generate(self, inputs, sampling_params=None, use_tqdm=True):
        self.generate_calls.append((inputs, sampling_params, use_tqdm))
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(inputs)
        return [RequestOutput(i, list(prompt), [self._complete(prompt, sp, j) for j in range(sp.n)])
                for i, (prompt, sp) in enumerate(zip(inputs, params))]

    def _complete(self, prompt: list[int], sp: SamplingParams, index: int) -> CompletionOutput:
        sequences = self.script[tuple(prompt)]
        planned = sequences[index % len(sequences)]
        temperature = 1.0 if sp._greedy_decoding or sp.temperature is None else sp.temperature
        stop_ids = list(sp.stop_token_ids or [])
        stops = [sp.stop] if isinstance(sp.stop, str) else list(sp.stop or [])
        out = CompletionOutput(index)
        for position, token in enumerate(planned[:sp.max_tokens]):
            if token == sp.end_id and not sp.ignore_eos:
                out.finish_reason = "stop"  # end_id: finished, token not returned
                return out
            value = raw_logprob(position)
            if sp.logprobs_mode == LogprobMode.PROCESSED:
                value = value / temperature
            out.token_ids.append(token)
            # Like newer releases: the top-1 entry beside the sampled token's.
            out.logprobs.append({token: Logprob(value, 2), token + 1000: Logprob(value / 2, 1)})
            if token in stop_ids:
                return self._stopped(out, token, [token], sp)
            for s in stops:
                ids = FakeLLM.encode(s)
                if out.token_ids[-len(ids):] == ids:
                    return self._stopped(out, s, ids, sp)
        out.finish_reason = "length"
        return out

    @staticmethod
    def _stopped(out: CompletionOutput, reason, ids: list[int], sp: SamplingParams) -> CompletionOutput:
        out.finish_reason, out.stop_reason = "stop", reason
        if not sp.include_stop_str_in_output:
            out.token_ids, out.logprobs = out.token_ids[:-len(ids)], out.logprobs[:-len(ids)]
        return out

    def _collective_rpc(self, method: str, args: tuple = (), kwargs: Optional[dict] = None, non_block: bool = False,
                        unique_reply_rank: Optional[int] = None, target_ranks=None) -> list[Any]:
        self.rpc_calls.append((method, args))
        if method == "update_weights":
            (handles,) = args
            if handles is None:
                self.finalized += 1
                return [None]
            for uuid, serialized in handles.items():
                for name, (rebuild, rebuild_args) in pickle.loads(base64.b64decode(serialized)):
                    self.weights[(uuid, name)] = rebuild(*rebuild_args)
        return [None]

    def shutdown(self) -> None:
        self.is_shutdown = True


def install(monkeypatch, modern: bool = True) -> types.ModuleType:
    """Put a fake ``tensorrt_llm`` (and the submodules the adapter imports) into ``sys.modules``."""
    FakeLLM.instances = []
    FakeLLM.script = {}
    root = types.ModuleType("tensorrt_llm")
    sampling = types.ModuleType("tensorrt_llm.sampling_params")
    llmapi = types.ModuleType("tensorrt_llm.llmapi")
    llm_args = types.ModuleType("tensorrt_llm.llmapi.llm_args")
    torch_pkg = types.ModuleType("tensorrt_llm._torch")
    torch_utils = types.ModuleType("tensorrt_llm._torch.utils")
    params_cls = SamplingParams if modern else OldSamplingParams
    root.LLM, root.SamplingParams, root.sampling_params, root.llmapi = FakeLLM, params_cls, sampling, llmapi
    sampling.SamplingParams = params_cls
    if modern:
        sampling.LogprobMode = LogprobMode
        llm_args.SleepConfig = SleepConfig
    llmapi.LLM, llmapi.SamplingParams, llmapi.KvCacheConfig = FakeLLM, params_cls, KvCacheConfig
    llmapi.llm_args = llm_args
    torch_utils.get_device_uuid = get_device_uuid
    torch_pkg.utils = torch_utils
    modules = {"tensorrt_llm": root, "tensorrt_llm.sampling_params": sampling, "tensorrt_llm.llmapi": llmapi,
               "tensorrt_llm.llmapi.llm_args": llm_args, "tensorrt_llm._torch": torch_pkg,
               "tensorrt_llm._torch.utils": torch_utils}
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return root

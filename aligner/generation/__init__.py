"""Rollout engines behind one interface (``engine.py``): the built-in KV-cache engine and TensorRT-LLM."""
from __future__ import annotations

from typing import Any

from aligner.generation.engine import FINISH_REASONS, GenerationEngine, Rollouts, SamplingParams


def build_engine(model_or_policy: Any, gen_cfg: Any, tokenizer: Any) -> GenerationEngine:
    """The rollout engine ``gen_cfg`` (a ``GenerationConfig``) asks for, on a model or a ``PolicyModel``.

    ``backend="torch"``: a :class:`~aligner.generation.torch_engine.TorchEngine` on the model's own weights;
    a PolicyModel spread over several processes gets ``aligner.generation.parallel.build_parallel_engine``
    (TP / FSDP / PP). ``backend="trtllm"``: TensorRT-LLM, imported only here. ``tokenizer``: a tokenizer, or
    the EOS token ids (then ``stop_strings`` cannot be used).
    """
    if gen_cfg.backend == "trtllm":
        from aligner.generation.trtllm_engine import build_trtllm_engine

        return build_trtllm_engine(model_or_policy, gen_cfg, tokenizer)
    if gen_cfg.backend != "torch":
        raise ValueError(f"generation.backend='{gen_cfg.backend}' is not one of torch, trtllm")
    pmesh = getattr(model_or_policy, "pmesh", None)
    # Any mesh, even a world of one: FSDP (also carrying bf16 mixed precision on one process) swaps
    # parameters, which only the parallel engine handles.
    if pmesh is not None:
        from aligner.generation.parallel import build_parallel_engine

        return build_parallel_engine(model_or_policy.stages, pmesh, gen_cfg, tokenizer)
    from aligner.generation.torch_engine import TorchEngine

    return TorchEngine(getattr(model_or_policy, "model", model_or_policy), tokenizer,
                       max_batch_size=gen_cfg.max_batch_size, dtype=gen_cfg.dtype, compile=gen_cfg.compile)


__all__ = ["FINISH_REASONS", "GenerationEngine", "Rollouts", "SamplingParams", "build_engine"]

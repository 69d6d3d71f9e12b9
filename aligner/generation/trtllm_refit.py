"""The weights of a TensorRT-LLM refit: our parameters as full tensors under Hugging Face names, in memory-
bounded buckets, as the CUDA-IPC payload ``tensorrt_llm.llmapi.rlhf_utils.WorkerExtension.update_weights``
reads; and the weightless model directory TensorRT-LLM starts from before the first refit.

Nothing here imports ``tensorrt_llm``; ``trtllm_engine.py`` sends what these functions build.
"""
from __future__ import annotations

import base64
import json
import pickle
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from aligner.models.args import config_to_hf
from aligner.models.hf import TOKENIZER_FILES, ours_to_hf_name

_WRAPPER_PARTS = ("_orig_mod.", "_checkpoint_wrapped_module.")  # torch.compile / activation checkpointing


def hf_weights(model: nn.Module, dtype: torch.dtype | None = None,
               device: torch.device | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(Hugging Face name, full tensor)`` of every parameter, the form TensorRT-LLM loads.

    Tensor-parallel / FSDP shards (DTensors) are gathered with ``full_tensor()`` (a collective: every rank of
    the mesh iterates in the same order). A tied LM head appears once, as ``model.embed_tokens.weight``, as in
    a Hugging Face checkpoint. Each rank's TensorRT-LLM worker takes the full tensors and cuts its own shard.
    """
    for name, param in model.named_parameters():  # named_parameters lists a tied weight once
        for part in _WRAPPER_PARTS:
            name = name.replace(part, "")
        tensor = param.detach()
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        yield ours_to_hf_name(name), tensor.to(device=device, dtype=dtype)


NamedTensors = list[tuple[str, torch.Tensor]]


def weight_buckets(named: Iterable[tuple[str, torch.Tensor]], max_bytes: int) -> Iterator[NamedTensors]:
    """Consecutive groups of at most ``max_bytes`` (a larger tensor goes alone), to bound refit memory."""
    bucket: NamedTensors = []
    size = 0
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > max_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def ipc_handles(bucket: NamedTensors) -> str:
    """The payload ``WorkerExtension.update_weights`` reads for one device: base64 of the pickled
    ``[(name, (rebuild_fn, args)), ...]`` from ``torch.multiprocessing.reductions.reduce_tensor``."""
    from torch.multiprocessing.reductions import reduce_tensor

    return base64.b64encode(pickle.dumps([(name, reduce_tensor(t)) for name, t in bucket])).decode("ascii")


def check_complete_model(model: nn.Module, num_hidden_layers: int) -> None:
    """Raise if ``model`` is one pipeline stage: a refit must send every weight from every rank."""
    layers = getattr(model, "layers", None)
    present = 0 if layers is None else len(layers)
    if getattr(model, "tok_embeddings", None) is None or getattr(model, "norm", None) is None \
            or present != num_hidden_layers:
        raise ValueError(f"TensorRT-LLM refit got a model with {present} of {num_hidden_layers} layers (a pipeline "
                         f"stage?); its workers need every weight, so run the trtllm backend with parallel.pp=1")


def write_model_skeleton(config: Any, tokenizer: Any, out_dir: str | Path, dtype: str) -> Path:
    """A Hugging Face directory without weights (``config.json`` and the tokenizer files), which TensorRT-LLM
    builds a model from with ``load_format="dummy"`` before the first refit fills in the weights."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config_to_hf(config, dtype=dtype), indent=2))
    source = Path(getattr(tokenizer, "source", "") or ".")
    copied = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    if "tokenizer.json" not in copied:
        raise FileNotFoundError(f"{source / 'tokenizer.json'} not found: TensorRT-LLM needs the tokenizer files "
                                f"beside config.json; load the tokenizer from the model directory")
    for name in copied:
        shutil.copy2(source / name, out / name)
    return out

"""Build a parallel model without any rank ever holding the whole of it.

The Transformer is built on the meta device (no memory), cut to this rank's pipeline stage,
parallelized (parameters become DTensors whose local shards have their final shapes), materialised
with ``to_empty`` (memory for the local shards only), then filled shard by shard: each rank reads
from the safetensors files exactly the slice of every tensor that it owns.

Random init is defined per parameter name, not by one generator stream over the model, so any
layout (TP, FSDP, a pipeline stage holding only some layers) produces the same full weights: the
tensor called ``layers.3.mlp.up_proj.weight`` is drawn from a generator seeded with a hash of the
seed and that name, on CPU, then sliced. :func:`seeded_init_` applied to a plain single-process
model gives the reference weights. (This differs from ``Transformer.init_weights``' stream.)
"""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from aligner.models.args import TransformerConfig
from aligner.models.heads import ValueHead, attach_value_head
from aligner.models.hf import CheckpointReader, load_config, to_torch_dtype
from aligner.models.transformer import RMSNorm, Transformer, rope_inv_freq
from aligner.parallel.mesh import ParallelMesh
from aligner.parallel.parallelize import parallelize_model


def local_shard_index(param: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """(this rank's local tensor of ``param``, the slices of the global tensor that it holds).

    Handles TP, FSDP, TP x FSDP (strided) and uneven shards; a plain tensor is its own full slice.
    """
    if not isinstance(param, DTensor):
        return param, tuple(slice(0, n) for n in param.shape)
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    local = param.to_local()
    if tuple(local.shape) != tuple(shape):
        raise RuntimeError(f"local shard shape {tuple(local.shape)} differs from the expected {tuple(shape)}")
    return local, tuple(slice(o, o + n) for o, n in zip(offset, shape))


def _unique_named_parameters(model: nn.Module):
    """(name, module, param) with tied parameters once, under their first name."""
    seen = set()
    for mname, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            yield (f"{mname}.{pname}" if mname else pname), module, pname, param


def _seeded_full_tensor(name: str, module: nn.Module, pname: str, shape, seed: int, std: float) -> torch.Tensor:
    """The full float32 initial value of parameter ``name``; same rule as ``Transformer.init_weights``."""
    if isinstance(module, RMSNorm):
        return torch.ones(shape)
    if pname == "bias":
        return torch.zeros(shape)
    if isinstance(module, ValueHead):
        std = 1.0 / (shape[-1] + 1) ** 0.5  # as attach_value_head
    # torch's CPU generator keeps only 32 bits of its seed, so hash seed and name together into 32.
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}".encode()))
    return torch.empty(shape).normal_(0.0, std, generator=gen)


@torch.no_grad()
def seeded_init_(model: nn.Module, seed: int, std: float = 0.02, prefix: str = "") -> nn.Module:
    """Fill every parameter of ``model`` (plain or DTensor-sharded) with its per-name seeded value.

    ``prefix`` is prepended to the names when ``model`` is a submodule (``"output."`` for the head).

    Each rank draws the full tensor of one parameter at a time (peak extra memory: the largest
    tensor in float32) and keeps its slice: meant for tests and small models; real runs load checkpoints.
    """
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    for name, module, pname, param in _unique_named_parameters(model):
        if tied and name == "output.weight" and not isinstance(module, ValueHead):
            # The last pipeline stage holds the tied matrix as the head only; draw the embedding's values.
            name = "tok_embeddings.weight"
        local, index = local_shard_index(param)
        full = _seeded_full_tensor(prefix + name, module, pname, tuple(param.shape), seed, std)
        local.copy_(full[index])
    return model


@torch.no_grad()
def load_checkpoint_shards(model: nn.Module, reader: CheckpointReader, *, skip: Callable[[str], bool] | None = None) -> nn.Module:
    """Read into each parameter of ``model`` only this rank's slice of it from the checkpoint.

    Args:
        model: a (possibly sharded, possibly pipeline-stage) Transformer, materialised with ``to_empty``.
        reader: ``aligner.models.hf.CheckpointReader`` over a Hugging Face directory (names are ours).
        skip: names not to load, e.g. a freshly attached value head.
    """
    available = set(reader.names())
    for name, _, _, param in _unique_named_parameters(model):
        if skip is not None and skip(name):
            continue
        if name not in available:
            raise KeyError(
                f"checkpoint {reader.path} has no tensor for model parameter '{name}'; the weights do not "
                f"match config.json (tie_word_embeddings? attention bias? q/k norm? a value head?)"
            )
        shape = tuple(reader.shape(name))
        if shape != tuple(param.shape):
            raise ValueError(
                f"checkpoint {reader.path}: tensor '{name}' has shape {shape} but the model built from "
                f"config.json expects {tuple(param.shape)}; check that config.json belongs to these weights"
            )
        local, index = local_shard_index(param)
        local.copy_(reader.read(name, index=index, dtype=local.dtype))
        # safetensors reads through a memory map; the pages touched stay in this process's resident
        # set until the map is dropped, so release it after every tensor to keep the peak at
        # "own shards + one tensor" rather than "own shards + every page read so far".
        reader.close()
    return model


def _device_for(pmesh: ParallelMesh) -> torch.device:
    if pmesh.mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(pmesh.mesh.device_type)


def build_parallel_model(
    config_or_path: TransformerConfig | str | Path,
    pmesh: ParallelMesh,
    *,
    dtype: str | torch.dtype = "float32",
    init: str | None = None,
    seed: int = 0,
    std: float = 0.02,
    value_head: bool | None = None,
    stage_fn: Callable[[Transformer], nn.Module] | None = None,
    **parallel_options,
) -> nn.Module:
    """Build, parallelize and fill a Transformer so that every rank holds only its own shards.

    Args:
        config_or_path: a TransformerConfig (random init) or a Hugging Face checkpoint directory.
        pmesh: the parallel mesh (:func:`aligner.parallel.build_mesh`).
        dtype: parameter dtype (``float32`` master weights for training; ``bfloat16`` for frozen models).
        init: ``checkpoint`` (default for a path) or ``random`` (default, and only choice, for a config).
        seed, std: random init, see :func:`seeded_init_` (identical full weights at every layout).
        value_head: end in a scalar ValueHead (reward/critic) instead of the LM head. None: as the
            checkpoint has it (``value_head.safetensors``), False for a config. True over a causal-LM
            checkpoint loads the trunk and initialises the head from ``seed``.
        stage_fn: cuts the meta model to this rank's pipeline stage (supplied by the pipeline code).
        **parallel_options: passed to :func:`aligner.parallel.parallelize_model`
            (activation_checkpointing, mixed_precision, compile, sequence_parallel, loss_parallel, ...).

    Returns:
        The parallel model on this rank's device, in train mode.
    """
    reader = None
    if isinstance(config_or_path, TransformerConfig):
        cfg = config_or_path
        init = init or "random"
        if init != "random":
            raise ValueError(f"init='{init}' needs a checkpoint directory, but a TransformerConfig was given")
    else:
        init = init or "checkpoint"
        cfg = load_config(config_or_path)
    if init not in ("checkpoint", "random"):
        raise ValueError(f"init='{init}' is not one of checkpoint, random")
    if init == "checkpoint":
        reader = CheckpointReader(config_or_path, config=cfg)
        if value_head is None:
            value_head = reader.has_value_head
        elif not value_head and reader.has_value_head:
            raise ValueError(f"{config_or_path} holds a value model (value_head.safetensors); pass value_head=True")
    dtype = to_torch_dtype(dtype)

    with torch.device("meta"):
        model = Transformer(cfg)
        if value_head:
            attach_value_head(model)
        model.to(dtype)
    if stage_fn is not None:
        model = stage_fn(model)
    parallelize_model(model, pmesh, **parallel_options)
    model.to_empty(device=_device_for(pmesh))
    embed, head = getattr(model, "tok_embeddings", None), getattr(model, "output", None)
    if cfg.tie_word_embeddings and embed is not None and head is not None and not value_head:
        if head.weight is not embed.weight:
            # to_empty re-creates plain parameters one by one, which unties them (DTensor and FSDP
            # parameters keep the tie); point the head back at the embedding.
            head.weight = embed.weight
    if init == "random":
        seeded_init_(model, seed, std)
    else:
        # A causal-LM checkpoint given value_head=True: a fresh head on top of the loaded trunk.
        fresh_head = value_head and not reader.has_value_head
        load_checkpoint_shards(model, reader, skip=(lambda name: name.startswith("output.")) if fresh_head else None)
        reader.close()
        if fresh_head and model.output is not None:
            seeded_init_(model.output, seed, std, prefix="output.")
    # Non-persistent buffers came out of to_empty uninitialised.
    with torch.no_grad():
        model.rope_inv_freq.copy_(rope_inv_freq(cfg).to(model.rope_inv_freq.device))
    return model

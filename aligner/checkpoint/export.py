"""``aligner export-hf CKPT OUT``: a training checkpoint (DCP, any layout) -> a Hugging Face directory.

Runs in one process with no process group: the model is built on the meta device from the
checkpoint's ``model_config.json``, materialised as full plain tensors on CPU, filled by DCP from
every rank's shards, and written with :func:`aligner.models.hf.save_hf_checkpoint` (tokenizer files
copied from the checkpoint). Needs the whole model in CPU memory once, in the export dtype.

Inside a checkpoint a model's tensors are keyed ``<prefix>.<parameter name>``, where the prefix is
the path of the model in the saved ``app_state``: ``model`` for ``{"model": ...}``, ``policy.model``
for ``{"policy": wrapper}`` whose state dict holds ``{"model": ..., "optimizer": ...}``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from aligner.checkpoint.dcp import MODEL_CONFIG_FILE, _single_process_quietly
from aligner.checkpoint.layout import find_resume_checkpoint, is_complete_checkpoint, not_a_checkpoint_error
from aligner.models.args import TransformerConfig, config_from_hf
from aligner.models.heads import attach_value_head
from aligner.models.hf import load_config, save_hf_checkpoint, to_torch_dtype
from aligner.models.transformer import Transformer

DEFAULT_KEY_PREFIX = "model"
# Wrapper modules (torch.compile, activation checkpointing) that a raw ``module.state_dict()`` keeps
# in its names; get_model_state_dict already drops them.
_WRAPPER_PARTS = ("_orig_mod.", "_checkpoint_wrapped_module.")


def _checkpoint_path(path: Path) -> Path:
    """``path`` itself when it is a checkpoint; the latest checkpoint when it is a run's output directory."""
    if is_complete_checkpoint(path):
        return path
    if path.is_dir():
        latest = find_resume_checkpoint(path, "auto")
        if latest is not None:
            return latest
    raise not_a_checkpoint_error(path, "aligner export-hf")


def _model_tensors(metadata, prefix: str) -> dict[str, TensorStorageMetadata]:
    """Our parameter name -> its stored metadata, for the keys under ``prefix.``."""
    found = {}
    for key, meta in metadata.state_dict_metadata.items():
        if isinstance(meta, TensorStorageMetadata) and key.startswith(prefix + "."):
            name = key[len(prefix) + 1:]
            for part in _WRAPPER_PARTS:
                name = name.replace(part, "")
            found[name] = (key, meta)
    return found


def _model_prefixes(metadata) -> list[str]:
    """Prefixes under which the checkpoint holds a Transformer's weights (keys ``<prefix>.norm.weight``)."""
    # Layer norms are named input_layernorm / q_norm, and optimizer keys end in .exp_avg etc.
    return sorted(k.removesuffix(".norm.weight") for k, m in metadata.state_dict_metadata.items()
                  if isinstance(m, TensorStorageMetadata) and k.endswith(".norm.weight") and ".layers." not in k)


def _read_model_config(ckpt: Path, config: TransformerConfig | str | os.PathLike | None) -> TransformerConfig:
    if isinstance(config, TransformerConfig):
        return config
    if config is not None:
        config = Path(config).expanduser()
        if config.is_dir():
            return load_config(config)
        with open(config) as f:
            return config_from_hf(json.load(f), source=str(config))
    config_file = ckpt / MODEL_CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: the checkpoint was saved without its model config; "
                                f"pass the model's config.json (or its directory) as config=")
    with open(config_file) as f:
        return config_from_hf(json.load(f), source=str(config_file))


def export_hf(
    checkpoint_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    *,
    key_prefix: str = DEFAULT_KEY_PREFIX,
    config: TransformerConfig | str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the model of a training checkpoint as a Hugging Face directory that ``transformers`` loads.

    Args:
        checkpoint_dir: a checkpoint (``OUTPUT/checkpoints/step_N``), or a run's output directory
            (its latest checkpoint is exported).
        out_dir: the Hugging Face directory to write (must not exist or be empty, unless ``overwrite``).
        dtype: dtype of the exported weights (``bfloat16``, ...); None keeps the saved dtype.
        key_prefix: where the model sits in the saved ``app_state`` (module doc). When nothing is
            stored under it and the checkpoint holds exactly one model, that model is exported.
        config: the model's TransformerConfig, config.json or directory; default: the checkpoint's
            ``model_config.json``.
        overwrite: replace a non-empty ``out_dir``.

    Returns:
        ``out_dir``. A value model's head goes to ``value_head.safetensors``.
    """
    ckpt = _checkpoint_path(Path(checkpoint_dir).expanduser())
    cfg = _read_model_config(ckpt, config)
    metadata = FileSystemReader(ckpt).read_metadata()
    stored = _model_tensors(metadata, key_prefix)
    if not stored:
        prefixes = _model_prefixes(metadata)
        if key_prefix == DEFAULT_KEY_PREFIX and len(prefixes) == 1:
            key_prefix = prefixes[0]
            stored = _model_tensors(metadata, key_prefix)
        else:
            found = ", ".join(prefixes) or "none"
            raise KeyError(f"checkpoint {ckpt} holds no model tensors under '{key_prefix}.' (model prefixes found: "
                           f"{found}); pass key_prefix= naming one of them")

    value_head = "output.bias" in stored
    first_float = next((m.properties.dtype for _, m in stored.values() if m.properties.dtype.is_floating_point),
                       torch.float32)
    model_dtype = to_torch_dtype(dtype) if dtype is not None else first_float
    with torch.device("meta"):
        model = Transformer(cfg)
        if value_head:
            attach_value_head(model)
    model = model.to(model_dtype).to_empty(device="cpu")
    tied = cfg.tie_word_embeddings and not value_head
    if tied:
        model.output.weight = model.tok_embeddings.weight  # to_empty unties; the head reads the embedding

    wanted = {name: t for name, t in model.state_dict().items() if not (tied and name == "output.weight")}
    missing = sorted(set(wanted) - set(stored))
    unexpected = sorted(set(stored) - set(wanted) - ({"output.weight"} if tied else set()))
    if missing or unexpected:
        raise ValueError(f"checkpoint {ckpt} ('{key_prefix}.*') does not match its model config: "
                         f"missing {missing[:6] or 'nothing'}, unexpected {unexpected[:6] or 'nothing'}; "
                         f"check key_prefix= and config=")
    for name, tensor in wanted.items():
        shape = tuple(stored[name][1].size)
        if shape != tuple(tensor.shape):
            raise ValueError(f"checkpoint {ckpt}: '{stored[name][0]}' has shape {shape}, the model from "
                             f"{MODEL_CONFIG_FILE} expects {tuple(tensor.shape)}; pass the right config=")
    # DCP copies (and casts) every stored shard into these full tensors, which share the model's storage.
    to_load = {stored[name][0]: tensor for name, tensor in wanted.items()}
    with _single_process_quietly():
        dcp.load(to_load, storage_reader=FileSystemReader(ckpt), no_dist=True)
    return save_hf_checkpoint(model, cfg, out_dir, dtype=dtype, tokenizer_dir=ckpt, overwrite=overwrite)

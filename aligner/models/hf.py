"""Hugging Face checkpoints <-> our Transformer: the one name table, safetensors reading and writing.

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. A reward or critic model also holds ``value_head.safetensors``
(``weight [1, D]``, ``bias [1]``) and no ``lm_head``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from aligner.models.args import TransformerConfig, config_from_hf, config_to_hf
from aligner.models.heads import attach_value_head, has_value_head
from aligner.models.transformer import Transformer, rope_inv_freq

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
VALUE_HEAD_FILE = "value_head.safetensors"
GENERATION_CONFIG_FILE = "generation_config.json"
# Copied verbatim from the tokenizer directory on export; the ones that exist are copied.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt")

# HF parameter-name prefixes and ours. Inside a layer the names are the same on both sides
# (self_attn.q_proj, mlp.gate_proj, input_layernorm, ...), so the table stays this short.
_HF_TO_OURS_PREFIX = [
    ("model.embed_tokens.", "tok_embeddings."),
    ("model.layers.", "layers."),
    ("model.norm.", "norm."),
    ("lm_head.", "output."),
]


def hf_to_ours_name(name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``layers.3.self_attn.q_proj.weight``."""
    for hf, ours in _HF_TO_OURS_PREFIX:
        if name.startswith(hf):
            return ours + name[len(hf):]
    raise KeyError(f"checkpoint tensor '{name}' has no counterpart in the Llama-family model")


def ours_to_hf_name(name: str) -> str:
    """Inverse of :func:`hf_to_ours_name`."""
    for hf, ours in _HF_TO_OURS_PREFIX:
        if name.startswith(ours):
            return hf + name[len(ours):]
    raise KeyError(f"model parameter '{name}' has no Hugging Face name")


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def to_torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; a ``torch.dtype`` passes through."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype '{dtype}' is not supported; choose one of: float32, bfloat16, float16")
    return _DTYPES[dtype]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _model_dir(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model directory {path} does not exist; pass a Hugging Face checkpoint directory "
                                f"(or run `aligner fetch-model smollm2-135m-instruct` for the embedded model)")
    if not path.is_dir():
        hint = " (convert a GGUF file first: `aligner convert FILE.gguf OUT_DIR`)" if path.suffix == ".gguf" else ""
        raise NotADirectoryError(f"{path} is a file, not a Hugging Face checkpoint directory{hint}")
    return path


def load_config(path: str | os.PathLike) -> TransformerConfig:
    """Read ``<path>/config.json`` into a :class:`TransformerConfig`."""
    path = _model_dir(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = (f"; it holds {ggufs[0]}: convert it with `aligner convert {path / ggufs[0]} OUT_DIR`" if ggufs
                else "; pass a Hugging Face checkpoint directory (config.json + *.safetensors)")
        raise FileNotFoundError(f"{config_file} not found{hint}")
    with open(config_file) as f:
        return config_from_hf(json.load(f), source=str(config_file))


class CheckpointReader:
    """Reads tensors of one HF checkpoint directory by *our* parameter names, whole or sliced.

    ``read(name, index=(slice(0, 256), slice(None)))`` reads only those rows from disk, so a rank
    that owns a tensor-parallel or FSDP shard never materialises the full tensor. With tied
    embeddings and no ``lm_head.weight`` in the files, ``output.weight`` reads the embedding.
    """

    def __init__(self, path: str | os.PathLike, config: TransformerConfig | None = None):
        self.path = _model_dir(path)
        self.config = config if config is not None else load_config(self.path)
        self._location: dict[str, tuple[Path, str]] = {}  # our name -> (file, name in that file)
        self._handles: dict[Path, Any] = {}
        self.unmapped: list[str] = []  # tensors in the files with no counterpart in our model
        for file, hf_name in self._list_lm_tensors():
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue  # a buffer some old exports saved; we compute it from the config
            try:
                self._location[hf_to_ours_name(hf_name)] = (file, hf_name)
            except KeyError:
                self.unmapped.append(hf_name)
        value_head_file = self.path / VALUE_HEAD_FILE
        self.has_value_head = value_head_file.is_file()
        if self.has_value_head:
            # A value model's head replaces the LM head; an lm_head still present in the files is not used.
            self._location["output.weight"] = (value_head_file, "weight")
            self._location["output.bias"] = (value_head_file, "bias")
        elif (self.config.tie_word_embeddings and "output.weight" not in self._location
              and "tok_embeddings.weight" in self._location):
            self._location["output.weight"] = self._location["tok_embeddings.weight"]

    def _list_lm_tensors(self) -> list[tuple[Path, str]]:
        index_file, single_file = self.path / WEIGHTS_INDEX_FILE, self.path / WEIGHTS_FILE
        if index_file.is_file():
            with open(index_file) as f:
                weight_map = json.load(f)["weight_map"]
            missing = sorted({s for s in weight_map.values() if not (self.path / s).is_file()})
            if missing:
                raise FileNotFoundError(f"{index_file} lists shards that are not in {self.path}: {', '.join(missing)}; "
                                        f"copy the complete checkpoint directory")
            return [(self.path / shard, name) for name, shard in weight_map.items()]
        if single_file.is_file():
            with safe_open(single_file, framework="pt") as f:
                return [(single_file, name) for name in f.keys()]
        others = sorted(p.name for p in self.path.iterdir() if p.suffix in (".bin", ".pt", ".gguf"))
        hint = (f" It holds {', '.join(others)}: re-save with transformers `save_pretrained(dir)` (safetensors), "
                f"or convert a GGUF file with `aligner convert`." if others else
                " Pass a directory written by transformers `save_pretrained` or `save_hf_checkpoint`.")
        raise FileNotFoundError(f"no weights in {self.path}: neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE}.{hint}")

    def names(self) -> list[str]:
        """Our parameter names this checkpoint provides (``output.weight`` included when tied)."""
        return list(self._location)

    def _locate(self, name: str) -> tuple[Any, str]:
        if name not in self._location:
            some = ", ".join(list(self._location)[:4])
            raise KeyError(f"tensor '{name}' is not in the checkpoint {self.path} "
                           f"(it has {len(self._location)} tensors, e.g. {some}); names are ours, not HF's")
        file, key = self._location[name]
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="pt")
        return self._handles[file], key

    def hf_name(self, name: str) -> str:
        """The name tensor ``name`` has inside its file (``lm_head.weight`` for ``output.weight``)."""
        return self._location[name][1]

    def shape(self, name: str) -> tuple[int, ...]:
        """Full shape of tensor ``name`` without reading its data."""
        handle, key = self._locate(name)
        return tuple(handle.get_slice(key).get_shape())

    def read(self, name: str, index: tuple[slice, ...] | None = None,
             dtype: torch.dtype | str | None = None) -> torch.Tensor:
        """Tensor ``name`` (or only ``tensor[index]``, read from disk without the rest), cast to ``dtype``."""
        handle, key = self._locate(name)
        tensor = handle.get_tensor(key) if index is None else handle.get_slice(key)[index]
        return tensor if dtype is None else tensor.to(to_torch_dtype(dtype))

    def close(self) -> None:
        """Release the open files."""
        self._handles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_checkpoint_names(model: nn.Module, reader: CheckpointReader) -> None:
    """Fail, naming the tensors, unless the checkpoint has exactly the model's parameters."""
    wanted = set(model.state_dict().keys())
    have = set(reader.names())
    missing = sorted(wanted - have)
    # Unexpected tensors are named as the files spell them, which is what the user can look up.
    unexpected = sorted(reader.hf_name(n) for n in have - wanted) + reader.unmapped
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing from the checkpoint: {', '.join(missing[:8])}"
                         + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
        if unexpected:
            parts.append(f"in the checkpoint but not in the model: {', '.join(unexpected[:8])}"
                         + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else ""))
        raise ValueError(f"checkpoint {reader.path} does not match its config.json ({'; '.join(parts)}); "
                         f"check that config.json belongs to these weights")


@torch.no_grad()
def load_weights(model: nn.Module, reader: CheckpointReader) -> None:
    """Copy every tensor of ``reader`` into the (non-distributed) ``model``, casting to its dtypes."""
    check_checkpoint_names(model, reader)
    copied = set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in copied:
            continue  # the tied LM head: the embedding was just loaded into the same storage
        copied.add(tensor.data_ptr())
        source = reader.read(name, dtype=tensor.dtype)
        if tuple(source.shape) != tuple(tensor.shape):
            raise ValueError(f"checkpoint {reader.path}: tensor '{name}' has shape {tuple(source.shape)}, "
                             f"the model built from config.json expects {tuple(tensor.shape)}")
        tensor.copy_(source)


def from_pretrained(path: str | os.PathLike, dtype: str | torch.dtype = "float32",
                    device: str | torch.device = "cpu") -> Transformer:
    """Load a Hugging Face checkpoint directory into a :class:`Transformer` (with its value head if saved).

    The model is built on the meta device, so memory is allocated once, in ``dtype`` on ``device``.
    """
    torch_dtype = to_torch_dtype(dtype)
    with CheckpointReader(path) as reader:
        cfg = reader.config
        with torch.device("meta"):
            model = Transformer(cfg)
            if reader.has_value_head:
                attach_value_head(model)
        model = model.to(dtype=torch_dtype).to_empty(device=device)
        if cfg.tie_word_embeddings and not has_value_head(model):
            model.output.weight = model.tok_embeddings.weight  # to_empty gives each module its own tensor
        load_weights(model, reader)
    model.rope_inv_freq = rope_inv_freq(cfg).to(device)  # float32 whatever the weights' dtype
    return model


def parse_size(size: int | str) -> int:
    """``"5GB"`` -> 5_000_000_000 bytes (``GiB`` etc. are powers of two); an int passes through."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size '{size}' is not a size; write e.g. 5GB, 500MB, 2GiB or a byte count")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def _full_cpu_tensor(t: torch.Tensor) -> torch.Tensor:
    # DTensor (TP/FSDP) is recognised by duck typing: aligner.models never imports torch.distributed.
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().cpu()


def _write_weights(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> None:
    """``model.safetensors``, or shards ``model-0000i-of-0000n.safetensors`` plus the index."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file({n: tensors[n].contiguous() for n in shards[0]}, str(out / WEIGHTS_FILE), metadata=meta)
        return
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in names}, str(out / file), metadata=meta)
        weight_map.update({n: file for n in names})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(out / WEIGHTS_INDEX_FILE, "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _replace_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` to ``out``; an existing ``out`` is replaced only if empty or ``overwrite``."""
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        elif overwrite:
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
            return
        else:
            raise FileExistsError(f"{out} already exists and is not empty; choose another directory or remove it "
                                  f"(from Python: overwrite=True replaces it)")
    tmp.rename(out)


def save_hf_checkpoint(
    model_or_state_dict: nn.Module | dict[str, torch.Tensor],
    config: TransformerConfig | None,
    out_dir: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    tokenizer_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a Hugging Face directory that ``transformers`` (and :func:`from_pretrained`) loads.

    Args:
        model_or_state_dict: a Transformer, or a full state dict with our names. DTensors are gathered
            with ``full_tensor()``, a collective: gather first and call this on one rank when distributed.
        config: the model's config (``None``: take ``model.config``).
        out_dir: destination; written under a temporary sibling name and renamed when complete.
        dtype: dtype of the saved weights (``None``: keep each tensor's dtype).
        max_shard_size: above this many bytes the weights are split into shards with an index.
        tokenizer_dir: a directory whose tokenizer files (and generation_config.json) are copied.
        overwrite: replace a non-empty ``out_dir``.

    Returns:
        ``out_dir``. Tied embeddings write no ``lm_head``; a value head goes to ``value_head.safetensors``.
    """
    if isinstance(model_or_state_dict, nn.Module):
        config = config if config is not None else model_or_state_dict.config
        state = model_or_state_dict.state_dict()
    else:
        state = dict(model_or_state_dict)
    if config is None:
        raise ValueError("save_hf_checkpoint needs the TransformerConfig when given a state dict; pass config=")
    target = to_torch_dtype(dtype) if dtype is not None else None
    value_head = "output.bias" in state  # the LM head has no bias; the value head has
    lm, head = {}, {}
    for name, t in state.items():
        t = _full_cpu_tensor(t)
        t = t.to(target) if target is not None and t.is_floating_point() else t
        if name.startswith("output.") and value_head:
            head[name.removeprefix("output.")] = t
        elif name == "output.weight" and config.tie_word_embeddings:
            continue  # tied: transformers re-ties lm_head to the embedding
        else:
            lm[ours_to_hf_name(name)] = t
    saved_dtype = target or next((t.dtype for t in lm.values() if t.is_floating_point()), torch.float32)

    out = Path(out_dir).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        with open(tmp / CONFIG_FILE, "w") as f:
            json.dump(config_to_hf(config, dtype=_dtype_name(saved_dtype)), f, indent=2)
        _write_weights(lm, tmp, parse_size(max_shard_size))
        if value_head:
            save_file({k: v.contiguous() for k, v in head.items()}, str(tmp / VALUE_HEAD_FILE),
                      metadata={"format": "pt"})
        source = Path(tokenizer_dir) if tokenizer_dir is not None else None
        if source is not None and not source.is_dir():
            raise FileNotFoundError(f"tokenizer_dir {source} is not a directory; pass the model directory "
                                    f"whose tokenizer.json should be copied")
        for file in TOKENIZER_FILES + (GENERATION_CONFIG_FILE,):
            if source is not None and (source / file).is_file():
                shutil.copyfile(source / file, tmp / file)
        if not (tmp / GENERATION_CONFIG_FILE).exists():
            generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
            if config.pad_token_id is not None:
                generation["pad_token_id"] = config.pad_token_id
            with open(tmp / GENERATION_CONFIG_FILE, "w") as f:
                json.dump(generation, f, indent=2)
        # safetensors creates its files owner-only; give them the mode the umask gave config.json.
        mode = (tmp / CONFIG_FILE).stat().st_mode & 0o777
        for file in tmp.glob("*.safetensors"):
            file.chmod(mode)
        _replace_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out

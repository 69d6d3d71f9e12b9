"""GGUF file (llama.cpp) -> Hugging Face checkpoint directory, dequantized.

Every tensor is dequantized with the ``gguf`` package, renamed through one table, and for the
``llama`` architecture the rotary row permutation that llama.cpp's converter applies to q and k is
undone. ``config.json`` comes from the GGUF metadata and ``tokenizer.json`` is rebuilt from the
``tokenizer.ggml.*`` arrays with the ``tokenizers`` library.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aligner.models.args import TransformerConfig
from aligner.models.hf import hf_to_ours_name, save_hf_checkpoint, to_torch_dtype
from aligner.models.transformer import rope_inv_freq

# GGUF architecture -> (HF model_type, whether llama.cpp permuted the q/k rows for its rotary layout).
ARCHITECTURES = {"llama": ("llama", True), "qwen2": ("qwen2", False), "qwen3": ("qwen3", False)}

# The one GGUF -> HF name table. "{i}" is the layer index.
GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
ROPE_FACTORS_TENSOR = "rope_freqs.weight"  # Llama 3.1+ rope scaling, stored as per-frequency divisors

# Split patterns of the byte-level BPE vocabularies whose merges were learned on them (tokenizer.ggml.pre).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SUPPORTED_PRE_TOKENIZERS = ("default", "gpt2", "smollm", "llama-bpe", "llama3", "llama-v3", "qwen2")
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def gguf_to_hf_name(name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    key, layer = (f"blk.{{i}}.{m.group(2)}", m.group(1)) if m else (name, None)
    if key not in GGUF_TO_HF:
        raise KeyError(f"GGUF tensor '{name}' has no counterpart in the Llama-family model")
    return GGUF_TO_HF[key].format(i=layer)


def unpermute_rotary_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (``[out, in]`` weight or ``[out]`` bias).

    llama.cpp stores each head's rotary pairs interleaved ``(x0, x_{d/2}, x1, ...)``; HF keeps the
    two halves apart. Its converter views the rows of one head as ``[2, d/2]`` and transposes them to
    ``[d/2, 2]``; transposing back restores HF's order.
    """
    rest = weight.shape[1:]
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, half, 2, *rest).transpose(1, 2).reshape(weight.shape)


def _metadata(reader) -> dict[str, Any]:
    """All scalar and array key/values of the file (tensor data excluded)."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        out[key] = field.contents()
    return out


def _float32(value: float) -> float:
    # GGUF stores float32: 1e-5 arrives as 9.999999747e-06; the shortest float32 repr gives back 1e-05.
    return float(str(np.float32(value)))


def llama3_rope_scaling_from_factors(factors: torch.Tensor, cfg_kwargs: dict, source: str) -> dict[str, Any]:
    """Recover HF's llama3 ``rope_scaling`` from the stored per-frequency divisors, and check it."""
    factor = float(factors.max())
    # Every Llama 3.1/3.2/3.3 release uses these three; the check below catches any other.
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    plain = TransformerConfig(**{**cfg_kwargs, "rope_scaling": None})
    scaled = TransformerConfig(**{**cfg_kwargs, "rope_scaling": scaling})
    implied = rope_inv_freq(plain) / rope_inv_freq(scaled)
    if not torch.allclose(implied, factors.float(), rtol=1e-3):
        raise ValueError(f"{source}: tensor {ROPE_FACTORS_TENSOR} holds rope factors that match no llama3 rope "
                         f"scaling with factor={factor}, low/high_freq_factor=1/4, original context 8192; "
                         f"this rope scaling cannot be converted")
    return scaling


def config_from_gguf(meta: dict[str, Any], tensor_names: set[str], source: str) -> TransformerConfig:
    """TransformerConfig from GGUF metadata; tied embeddings when the file has no ``output.weight``."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{source}: GGUF architecture '{arch}' is not supported; supported: "
                         f"{', '.join(ARCHITECTURES)}")

    def get(key, default=None, required=True):
        full = f"{arch}.{key}"
        if full not in meta and required and default is None:
            raise ValueError(f"{source}: GGUF metadata key '{full}' is missing; the file is incomplete")
        return meta.get(full, default)

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    tokens = meta.get("tokenizer.ggml.tokens")
    kwargs = dict(
        model_type=ARCHITECTURES[arch][0],
        vocab_size=int(get("vocab_size", len(tokens) if tokens else None)),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(get("attention.key_length", hidden // heads)),
        rms_norm_eps=_float32(get("attention.layer_norm_rms_epsilon")),
        rope_theta=_float32(get("rope.freq_base", 10000.0)),
        max_position_embeddings=int(get("context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias=any(n.endswith("attn_q.bias") for n in tensor_names),
        qk_norm=any(n.endswith("attn_q_norm.weight") for n in tensor_names),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )
    rotary_dims = get("rope.dimension_count", kwargs["head_dim"])
    if int(rotary_dims) != kwargs["head_dim"]:
        raise ValueError(f"{source}: rope.dimension_count={rotary_dims} rotates only part of head_dim="
                         f"{kwargs['head_dim']}; partial rotary embeddings are not supported")
    scaling_type = get("rope.scaling.type", "none", required=False)
    if scaling_type == "linear":
        kwargs["rope_scaling"] = {"rope_type": "linear", "factor": _float32(get("rope.scaling.factor"))}
    elif scaling_type != "none":
        raise ValueError(f"{source}: rope scaling '{scaling_type}' is not supported; supported: linear, llama3")
    return TransformerConfig(**kwargs)


def build_tokenizer(meta: dict[str, Any], source: str):
    """``tokenizers.Tokenizer`` for a byte-level BPE vocabulary stored in ``tokenizer.ggml.*``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{source}: tokenizer.ggml.model is '{kind}'; only byte-level BPE ('gpt2') tokenizers "
                         f"can be converted")
    pre = meta.get("tokenizer.ggml.pre", "default")
    byte_level_split = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in ("default", "gpt2"):
        pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif pre == "smollm":  # every digit on its own, then GPT-2's split
        pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    elif pre in ("llama-bpe", "llama3", "llama-v3"):
        pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), "isolated"),
                                                 byte_level_split])
    elif pre == "qwen2":
        pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_QWEN2_SPLIT), "isolated"),
                                                 byte_level_split])
    else:
        raise ValueError(f"{source}: tokenizer.ggml.pre '{pre}' is not supported; supported: "
                         f"{', '.join(SUPPORTED_PRE_TOKENIZERS)}")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    # Llama 3 tokenizers look a whole pre-token up in the vocabulary before merging.
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre.startswith("llama")))
    if pre == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    types = list(meta.get("tokenizer.ggml.token_type", [])) or [1] * len(tokens)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, k in zip(tokens, types) if k == _CONTROL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, k in zip(tokens, types) if k == _USER_DEFINED])
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos_id is not None:
        bos = tokens[bos_id]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)])
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def write_tokenizer_files(meta: dict[str, Any], out: Path, source: str, model_max_length: int) -> None:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json and chat_template.jinja."""
    tokenizer = build_tokenizer(meta, source)
    tokenizer.save(str(out / "tokenizer.json"))
    tokens = meta["tokenizer.ggml.tokens"]
    types = list(meta.get("tokenizer.ggml.token_type", []))
    special = {}
    for role in ("bos", "eos", "pad", "unk"):
        key = "padding" if role == "pad" else ("unknown" if role == "unk" else role)
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            special[f"{role}_token"] = tokens[token_id]
    control = [i for i, k in enumerate(types) if k in (_CONTROL, _USER_DEFINED)]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # the tokenizer.json as written, no rebuilt pipeline
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "added_tokens_decoder": {str(i): {"content": tokens[i], "lstrip": False, "normalized": False,
                                          "rstrip": False, "single_word": False, "special": types[i] == _CONTROL}
                                 for i in control},
        "additional_special_tokens": [tokens[i] for i in control if types[i] == _CONTROL],
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        **special,
    }
    template = meta.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
        (out / "chat_template.jinja").write_text(template)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    special_map = {**special, "additional_special_tokens": config["additional_special_tokens"]}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, ensure_ascii=False))


def read_gguf_state_dict(reader, cfg: TransformerConfig, permuted: bool, dtype: torch.dtype,
                         source: str) -> dict[str, torch.Tensor]:
    """Dequantized tensors of the file under our parameter names, q/k rows in HF order."""
    from gguf.quants import dequantize

    state = {}
    for t in reader.tensors:
        if t.name == ROPE_FACTORS_TENSOR:
            continue  # folded into config.rope_scaling
        try:
            hf_name = gguf_to_hf_name(t.name)
        except KeyError as e:
            raise ValueError(f"{source}: {e.args[0]}; this file cannot be converted") from None
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dims fastest-first
        values = dequantize(t.data, t.tensor_type)
        if not values.flags.writeable:  # F32/F16 tensors come back as read-only views of the mapped file
            values = values.copy()
        weight = torch.from_numpy(np.ascontiguousarray(values).reshape(shape))
        if permuted and ".self_attn.q_proj." in hf_name:
            weight = unpermute_rotary_rows(weight, cfg.num_attention_heads)
        elif permuted and ".self_attn.k_proj." in hf_name:
            weight = unpermute_rotary_rows(weight, cfg.num_key_value_heads)
        state[hf_to_ours_name(hf_name)] = weight.to(dtype)
    return state


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32") -> Path:
    """Convert a GGUF file into a Hugging Face directory (config.json, model.safetensors, tokenizer files).

    Quantized tensors (Q4_1, Q8_0, K-quants, ...) are dequantized, so the result is the quantized
    model in full precision, not the original release. The directory appears complete or not at all.
    """
    from gguf import GGUFReader

    gguf_path = Path(gguf_path).expanduser()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist; pass the path of a .gguf file")
    source = str(gguf_path)
    try:
        reader = GGUFReader(gguf_path)
    except Exception as e:  # the gguf package raises bare ValueError/struct errors on bad files
        raise ValueError(f"{source} is not a readable GGUF file ({e})") from e
    meta = _metadata(reader)
    names = {t.name for t in reader.tensors}
    cfg = config_from_gguf(meta, names, source)
    if ROPE_FACTORS_TENSOR in names:
        factors = next(t for t in reader.tensors if t.name == ROPE_FACTORS_TENSOR)
        cfg_kwargs = {f: getattr(cfg, f) for f in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                                  "head_dim", "rope_theta")}
        factors = torch.from_numpy(np.array(factors.data))
        cfg.rope_scaling = llama3_rope_scaling_from_factors(factors, cfg_kwargs, source)
    permuted = ARCHITECTURES[meta["general.architecture"]][1]
    with tempfile.TemporaryDirectory(prefix="aligner-gguf-") as staging:
        # The tokenizer first: an unsupported one fails before minutes of dequantization.
        write_tokenizer_files(meta, Path(staging), source, cfg.max_position_embeddings)
        state = read_gguf_state_dict(reader, cfg, permuted, to_torch_dtype(dtype), source)
        return save_hf_checkpoint(state, cfg, out_dir, dtype=dtype, tokenizer_dir=staging)


__all__ = ["GGUF_TO_HF", "build_tokenizer", "config_from_gguf", "convert_gguf", "gguf_to_hf_name",
           "llama3_rope_scaling_from_factors", "unpermute_rotary_rows"]
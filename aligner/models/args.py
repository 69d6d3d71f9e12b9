"""Architecture description of a Llama-family decoder, and its Hugging Face ``config.json`` mapping.

One dataclass covers Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3, SmolLM and TinyLlama: the families
differ only in the switches below (qkv bias, q/k norm, rope scaling, tied embeddings, sliding window).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

# HF ``model_type`` values we can load, with what each implies that config.json may not spell out.
SUPPORTED_MODEL_TYPES = {
    "llama": {},
    "mistral": {},
    "qwen2": {"attention_bias": True},
    "qwen3": {"qk_norm": True},
}


@dataclass
class TransformerConfig:
    """Sizes and switches of one decoder. Field names follow Hugging Face where they exist."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # HF rope_scaling dict: {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"} or {"rope_type": "linear", "factor"}; None = plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2/2.5: bias on q, k, v projections
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    sliding_window: int | None = None  # Mistral v0.1; None = full causal attention
    model_type: str = "llama"
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # HF keys we carry through export untouched

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}; grouped-query attention needs it to be"
            )

    @property
    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        d, h, kv, hd = self.hidden_size, self.num_attention_heads, self.num_key_value_heads, self.head_dim
        attn = d * h * hd + 2 * d * kv * hd + h * hd * d
        if self.attention_bias:
            attn += h * hd + 2 * kv * hd
        if self.qk_norm:
            attn += 2 * hd
        mlp = 3 * d * self.intermediate_size
        layer = attn + mlp + 2 * d
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * layer + embed + d


# Keys of HF config.json that map one-to-one onto TransformerConfig fields.
_DIRECT_KEYS = [f.name for f in dataclasses.fields(TransformerConfig) if f.name not in ("extra",)]
# Keys we understand but that do not change the computation; kept so export round-trips.
_PASSTHROUGH_KEYS = {"architectures", "torch_dtype", "dtype", "transformers_version", "use_cache",
                     "hidden_act", "initializer_range", "pretraining_tp", "mlp_bias", "attention_dropout",
                     "use_sliding_window", "max_window_layers", "layer_types"}


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> TransformerConfig:
    """Build a TransformerConfig from a Hugging Face ``config.json`` dict; unsupported models fail by name."""
    model_type = hf.get("model_type", "llama")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{source}: model_type '{model_type}' is not supported; supported: "
            f"{', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
        )
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{source}: hidden_act '{act}' is not supported; the Llama family uses 'silu'")
    if hf.get("mlp_bias"):
        raise ValueError(f"{source}: mlp_bias=true is not supported by the Llama-family model")
    kwargs: dict[str, Any] = dict(SUPPORTED_MODEL_TYPES[model_type])
    for key in _DIRECT_KEYS:
        if key in hf and hf[key] is not None:
            kwargs[key] = hf[key]
    kwargs.setdefault("num_key_value_heads", hf.get("num_attention_heads", 32))
    # transformers >= 5 writes rope_theta and the scaling together as rope_parameters.
    rope_params = hf.get("rope_parameters")
    if rope_params:
        rope_params = dict(rope_params)
        if "rope_theta" in rope_params:
            kwargs["rope_theta"] = rope_params.pop("rope_theta")
        kwargs["rope_scaling"] = rope_params
    # Qwen2 configs set sliding_window but only use it when use_sliding_window is true.
    if model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
        kwargs["sliding_window"] = None
    rope = kwargs.get("rope_scaling")
    if rope is not None:
        rope = dict(rope)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3", "linear"):
            raise ValueError(
                f"{source}: rope_scaling type '{rope_type}' is not supported; supported: default, llama3, linear"
            )
        rope["rope_type"] = rope_type
        kwargs["rope_scaling"] = None if rope_type == "default" else rope
    kwargs["extra"] = {k: v for k, v in hf.items() if k in _PASSTHROUGH_KEYS}
    return TransformerConfig(**kwargs)


_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def config_to_hf(cfg: TransformerConfig, dtype: str = "float32") -> dict[str, Any]:
    """Hugging Face ``config.json`` dict that ``transformers`` loads into the matching architecture."""
    hf: dict[str, Any] = {k: v for k, v in cfg.extra.items()}
    for key in _DIRECT_KEYS:
        if key in ("qk_norm",):
            continue  # implied by model_type qwen3
        hf[key] = getattr(cfg, key)
    hf["architectures"] = [_ARCHITECTURES[cfg.model_type]]
    hf["hidden_act"] = "silu"
    hf["torch_dtype"] = dtype
    if cfg.model_type == "llama":
        hf["mlp_bias"] = False
    if cfg.model_type in ("qwen2", "qwen3"):
        hf["use_sliding_window"] = cfg.sliding_window is not None
        hf.pop("layer_types", None)
    if cfg.model_type == "qwen2":
        hf.pop("attention_bias", None)  # Qwen2 always has the bias; the key is not part of its config
    hf.pop("dtype", None)
    hf.pop("rope_parameters", None)  # rope_theta + rope_scaling above say the same; both versions read them
    return hf

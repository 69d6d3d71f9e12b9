"""Hugging Face checkpoints <-> our Transformer: the one name table, safetensors reading and writing."""
from __future__ import annotations

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

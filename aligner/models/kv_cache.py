"""Static key/value cache that the rollout engine attaches to each attention layer."""
from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    """Pre-allocated keys and values ``[B, H_kv, S_max, hd]``, written in place at ``input_pos``.

    Static shapes keep the decode step free of reallocations (and capturable in a CUDA graph).
    """

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write ``k, v [B, H_kv, T, hd]`` at positions ``input_pos [T]``; return the whole cache."""
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k, self.v


def attach_kv_caches(model: nn.Module, batch: int, max_len: int, dtype: torch.dtype | None = None) -> None:
    """Give every attention layer of ``model`` a KV cache sized for ``batch`` rows of ``max_len``.

    Head counts are read off the projection weights, so a tensor-parallel shard gets a cache for
    only its own heads.
    """
    for layer in model.layers.values():
        attn = layer.self_attn
        weight = attn.k_proj.weight
        local = weight.to_local() if hasattr(weight, "to_local") else weight
        n_kv = local.shape[0] // attn.head_dim
        attn.kv_cache = KVCache(batch, n_kv, max_len, attn.head_dim, dtype or local.dtype, local.device)


def detach_kv_caches(model: nn.Module) -> None:
    """Remove the caches (frees their memory) so the model trains without them."""
    for layer in model.layers.values():
        layer.self_attn.kv_cache = None

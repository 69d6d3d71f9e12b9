"""Static key/value caches that the rollout engine attaches to each attention layer.

``KVCache``: every row at the same positions ``input_pos [T]``. ``RowKVCache``: each row (a slot of
the engine's continuous batch) has its own length, so finished rows are refilled with new prompts.
"""
from __future__ import annotations

from typing import NamedTuple

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


class CacheRows(NamedTuple):
    """``input_pos`` of a :class:`RowKVCache` prefill: write the new keys of cache rows ``rows [b]`` at
    ``positions [b, T]``; attention then runs over these new keys only (prompts start at position 0)."""

    rows: torch.Tensor
    positions: torch.Tensor


class CacheWindow(NamedTuple):
    """``input_pos`` of a :class:`RowKVCache` decode step: write every row's new keys at ``positions [B, T]``
    and attend over the first ``length`` cache positions (the longest row's; the mask hides the rest)."""

    positions: torch.Tensor
    length: int


class RowKVCache(nn.Module):
    """Keys and values ``[B, H_kv, S_max, hd]`` in which every row has its own positions.

    ``update(input_pos, k, v)`` with ``input_pos``:

    * ``positions [B, T]``: write row ``b``'s new keys at ``positions[b]``; return the whole cache (the
      caller's mask ``[B, 1, T, S_max]`` hides each row's unused tail);
    * :class:`CacheWindow`: the same, returning only the first ``length`` positions;
    * :class:`CacheRows`: write only some rows; return the new keys (a prefill of fresh prompts).

    Writes are index ops, so shapes stay static. Keys are stored transposed (``k_t [B, H_kv, hd, S_max]``)
    and handed out as a ``[B, H_kv, S, hd]`` view: a decode step's query-key products then run along
    contiguous keys, which compiled CPU code vectorizes without a horizontal sum per key.
    """

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__()
        self.register_buffer("k_t", torch.zeros(batch, n_kv_heads, head_dim, max_len, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("v", torch.zeros(batch, n_kv_heads, max_len, head_dim, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("all_rows", torch.arange(batch, device=device), persistent=False)

    @property
    def k(self) -> torch.Tensor:
        """The keys as ``[B, H_kv, S_max, hd]`` (a view of ``k_t``)."""
        return self.k_t.transpose(2, 3)

    def update(self, input_pos, k: torch.Tensor, v: torch.Tensor):
        """Write ``k, v [b, H_kv, T, hd]`` (see the class docstring); return the keys/values to attend to."""
        rows, length = self.all_rows, self.v.shape[2]
        if isinstance(input_pos, CacheRows):
            rows, positions = input_pos
        elif isinstance(input_pos, CacheWindow):
            positions, length = input_pos
        else:
            positions = input_pos
        # [rows, :, :, positions] and [rows, :, positions] index [b, T, H_kv, hd]: advanced dims come first.
        self.k_t[rows[:, None], :, :, positions] = k.transpose(1, 2).to(self.k_t.dtype)
        self.v[rows[:, None], :, positions] = v.transpose(1, 2).to(self.v.dtype)
        if isinstance(input_pos, CacheRows):
            return k, v
        return self.k_t[..., :length].transpose(2, 3), self.v[:, :, :length]

    def copy_rows(self, src: torch.Tensor, dst: torch.Tensor, length: int) -> None:
        """Copy the first ``length`` positions of rows ``src [n]`` into rows ``dst [n]`` (a shared prompt)."""
        self.k_t[dst, ..., :length] = self.k_t[src, ..., :length]
        self.v[dst, :, :length] = self.v[src, :, :length]


def build_row_kv_caches(model: nn.Module, batch: int, max_len: int, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> dict[str, RowKVCache]:
    """One :class:`RowKVCache` per attention layer of ``model`` (keyed like ``model.layers``), not attached."""
    caches = {}
    for name, layer in model.layers.items():
        attn = layer.self_attn
        n_kv, local = _local_kv_heads(attn)
        caches[name] = RowKVCache(batch, n_kv, max_len, attn.head_dim, dtype or local.dtype,
                                  device if device is not None else local.device)
    return caches


def _local_kv_heads(attn: nn.Module) -> tuple[int, torch.Tensor]:
    """(kv heads held by this rank, the local k_proj weight): read off the weight so a tensor-parallel
    shard gets a cache for only its own heads."""
    weight = attn.k_proj.weight
    local = weight.to_local() if hasattr(weight, "to_local") else weight
    return local.shape[0] // attn.head_dim, local


def attach_kv_caches(model: nn.Module, batch: int, max_len: int, dtype: torch.dtype | None = None) -> None:
    """Give every attention layer of ``model`` a KV cache sized for ``batch`` rows of ``max_len``.

    Head counts are read off the projection weights, so a tensor-parallel shard gets a cache for
    only its own heads.
    """
    for layer in model.layers.values():
        attn = layer.self_attn
        n_kv, local = _local_kv_heads(attn)
        attn.kv_cache = KVCache(batch, n_kv, max_len, attn.head_dim, dtype or local.dtype, local.device)


def detach_kv_caches(model: nn.Module) -> None:
    """Remove the caches (frees their memory) so the model trains without them."""
    for layer in model.layers.values():
        layer.self_attn.kv_cache = None

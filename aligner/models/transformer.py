"""The one Llama-family decoder (Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3, SmolLM, TinyLlama).

Plain PyTorch and free of distributed code: tensor, pipeline and data parallelism are applied from
outside (``aligner.parallel``). Pipeline stages are made by setting ``tok_embeddings``, ``norm``,
``output`` to ``None`` and deleting entries of ``layers``; ``forward`` passes through what is missing.
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from aligner.models.args import TransformerConfig
from aligner.models.kv_cache import KVCache


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back, as the Hugging Face Llama implementation does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_inv_freq(cfg: TransformerConfig) -> torch.Tensor:
    """Inverse RoPE frequencies ``[head_dim // 2]`` with Llama 3 or linear scaling applied."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos and sin ``[B, T, head_dim]`` for integer positions ``[B, T]`` (computed in float32)."""
    freqs = position_ids[..., None].float() * inv_freq.float()  # [B, T, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, H, T, hd]`` by the per-position angles ``cos, sin [B, T, hd]``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


def single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                           scale: float) -> torch.Tensor:
    """SDPA for one query per row (a decode step) as two batched matmuls, with the query heads that share a
    key/value head stacked as the rows of one product: ``q [B, H, 1, hd]``, ``k, v [B, H_kv, S, hd]``,
    ``mask`` boolean (True: attend) or additive, broadcastable to ``[B, 1, 1, S]``, or None.

    Why not SDPA: its math form (the one that compiles into the decode step on CPU) expands every key/value
    head to its group's query heads, reading the cache once per query head, and inductor turns the
    one-query products into scalar loops; two matmuls read each cached key once (decode attention of
    SmolLM2 at 16 rows, float32, AVX2: 0.78 -> 0.49 ms per layer, docs/generation.md).
    """
    B, H, _, D = q.shape
    n_kv = k.shape[1]
    scores = torch.matmul(q.reshape(B, n_kv, H // n_kv, D), k.transpose(-1, -2)) * scale  # [B, H_kv, G, S]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    return torch.matmul(probs, v).reshape(B, H, 1, D)


# Vocabulary rows per product when a few rows go through a large LM head on the CPU (vocab_projection).
HEAD_SLICE_ROWS = 2048
HEAD_SLICE_MAX_TOKENS = 64


def vocab_projection(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(h, weight, bias)`` for the LM head; for at most ``HEAD_SLICE_MAX_TOKENS`` tokens of plain CPU
    tensors (a decode step) it runs as one product per ``HEAD_SLICE_ROWS`` vocabulary rows.

    Why: MKL's float32 GEMM of 16 rows by SmolLM2's ``[49152, 576]`` head takes ~28 ms as one call and ~23 ms
    in 2048-row slices, each slice's panel staying in cache while it is used (AVX2, one thread; 1024-4096
    rows alike, 8192 already slower). The slices give the same dot products. Sharded tensors (tensor
    parallel heads) and many-token products (training, prefill of long prompts) take the one call.
    """
    tokens = h.numel() // h.shape[-1]
    if (h.device.type != "cpu" or type(h) is not torch.Tensor or type(weight) not in (torch.Tensor, nn.Parameter)
            or tokens > HEAD_SLICE_MAX_TOKENS or weight.shape[0] <= 2 * HEAD_SLICE_ROWS):
        return F.linear(h, weight, bias)
    biases = bias.split(HEAD_SLICE_ROWS) if bias is not None else itertools.repeat(None)
    return torch.cat([F.linear(h, w, b) for w, b in zip(weight.split(HEAD_SLICE_ROWS), biases)], dim=-1)


class LMHead(nn.Linear):
    """The LM head: an ``nn.Linear`` (same parameter names, same tensor-parallel plans) computed by
    :func:`vocab_projection`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return vocab_projection(x, self.weight, self.bias)


class Attention(nn.Module):
    """Grouped-query attention over SDPA, with optional qkv bias (Qwen2) and q/k norm (Qwen3).

    ``self.kv_cache`` is the hook the rollout engine uses: when set, new keys/values are written at
    ``input_pos`` and attention runs over the whole cache.
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, mask=None, input_pos=None):
        B, T, _ = x.shape
        # -1 instead of the head count: under tensor parallelism this rank holds only its heads.
        q = self.q_proj(x).view(B, T, -1, self.head_dim)
        k = self.k_proj(x).view(B, T, -1, self.head_dim)
        v = self.v_proj(x).view(B, T, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        if T == 1:  # a decode step (or a one-token prompt, which sees only itself: no mask needed)
            out = single_query_attention(q, k, v, mask, self.head_dim ** -0.5)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.head_dim ** -0.5,
                enable_gqa=q.shape[1] != k.shape[1])
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU MLP: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    """Pre-norm decoder layer."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = FeedForward(cfg)

    def forward(self, x, cos, sin, mask=None, input_pos=None):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos)
        return h + self.mlp(self.post_attention_layernorm(h))


def default_position_ids(tokens, attention_mask=None, document_ids=None) -> torch.Tensor:
    """Positions ``[B, T]``: 0.. per row, skipping left padding, restarting at each packed document."""
    B, T = tokens.shape[:2]
    if document_ids is not None:
        idx = torch.arange(T, device=document_ids.device).expand(B, T)
        starts = torch.ones_like(document_ids, dtype=torch.bool)
        starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
        # Index of the current document's first token, carried forward with a running max.
        first = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
        return idx - first
    if attention_mask is not None:
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return torch.arange(T, device=tokens.device).expand(B, T)


def build_attention_mask(
    batch: int,
    q_len: int,
    device: torch.device,
    attention_mask: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
    sliding_window: int | None = None,
    branch_ids: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Boolean SDPA mask ``[B, 1, T, T]`` (True = attend), or None when plain causal is exact.

    ``attention_mask [B, T]`` marks real tokens (1) and padding (0); ``document_ids [B, T]`` marks
    which packed document each token belongs to, and no token attends across documents.
    ``branch_ids [B, T]`` lays several continuations of one shared prefix in a row: 0 marks the prefix,
    which every later token sees, and a token of branch k >= 1 sees only the prefix and branch k (a
    preference pair as ``[prompt | chosen | rejected]``). A padded query keeps its own diagonal so its
    softmax row is never empty (its output is ignored anyway).
    """
    if (attention_mask is None and document_ids is None and branch_ids is None
            and (sliding_window is None or q_len <= sliding_window)):
        return None
    i = torch.arange(q_len, device=device)
    mask = (i[:, None] >= i[None, :]).expand(batch, q_len, q_len)  # causal [B, T, T]
    if sliding_window is not None:
        mask = mask & (i[:, None] - i[None, :] < sliding_window)
    if document_ids is not None:
        mask = mask & (document_ids[:, :, None] == document_ids[:, None, :])
    if branch_ids is not None:
        mask = mask & ((branch_ids[:, :, None] == branch_ids[:, None, :]) | (branch_ids[:, None, :] == 0))
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, :]
    mask = mask | torch.eye(q_len, dtype=torch.bool, device=device)
    return mask[:, None]


class Transformer(nn.Module):
    """Llama-family decoder: ``model(tokens [B, T]) -> logits [B, T, V]``.

    With a value head (``aligner.models.heads.attach_value_head``) the output is ``[B, T, 1]``.
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        # A dict keyed by the layer index keeps parameter names stable when pipeline stages drop layers.
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg) for i in range(cfg.num_hidden_layers)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.output = LMHead(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("rope_inv_freq", rope_inv_freq(cfg), persistent=False)

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        branch_ids: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
        logit_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the decoder (or this pipeline stage of it).

        Args:
            tokens: token ids ``[B, T]``, or hidden states ``[B, T, D]`` on a later pipeline stage.
            position_ids: RoPE positions ``[B, T]``; derived from the masks when omitted.
            attention_mask: ``[B, T]`` 1 for real tokens, 0 for padding (left or right).
            document_ids: ``[B, T]`` packed-document index; attention stays inside a document.
            branch_ids: ``[B, T]`` 0 for a shared prefix, k >= 1 for the k-th continuation of it; a branch
                sees the prefix and itself only (see :func:`build_attention_mask`).
            mask: a ready boolean SDPA mask ``[B, 1, T, S]`` (the KV-cache path); overrides the above.
            input_pos: cache positions ``[T]`` of these tokens when layers have a KV cache.
            logit_positions: ``[B, K]`` positions whose logits are wanted: the final norm and the LM head
                run on those rows only (a loss over response tokens skips the prompt's ``[T, V]`` logits).

        Returns:
            logits ``[B, T, V]`` (``[B, K, V]`` with ``logit_positions``; value head: ``[B, T, 1]``; earlier
            pipeline stage: hidden states).
        """
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        B, T = h.shape[:2]
        if mask is None:
            mask = build_attention_mask(B, T, h.device, attention_mask, document_ids, self.config.sliding_window,
                                        branch_ids)
        if position_ids is None:
            position_ids = (default_position_ids(h, attention_mask, document_ids) if branch_ids is None
                            else mask[:, 0].sum(-1) - 1)  # a token's position: how many tokens it sees, less 1
        cos, sin = rope_cos_sin(self.rope_inv_freq, position_ids, h.dtype)
        for layer in self.layers.values():
            h = layer(h, cos, sin, mask, input_pos)
        if logit_positions is not None and self.output is not None:
            h = h.gather(1, logit_positions[..., None].expand(-1, -1, h.shape[-1]))  # [B, K, D]
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random init (normal(0, std) for matrices, ones for norms, zeros for biases); used after
        building on the meta device and ``to_empty`` when no checkpoint is loaded."""
        self.rope_inv_freq.copy_(rope_inv_freq(self.config).to(self.rope_inv_freq.device))
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.reset_parameters()

"""Pure sampling functions for the rollout engines: log-probs, top-k / top-p filtering, seeded draws.

Randomness is counter-based: the uniform number behind token ``t`` of sample ``j`` of prompt ``i``
is a hash of ``(seed, i, j, t)``. A sequence's draws therefore do not depend on which other
sequences share its batch, which KV-cache slot it sits in, or when it was admitted, and drawing
them needs only a few integer ops on ``[B]`` tensors on the device (no generator objects, no
host sync; compilable and CUDA-graph safe). A token is drawn by inverting the cumulative
distribution of its row at that uniform number (float64, two-level: see ``draw_tokens``), which is
exact for any filtered distribution: tokens whose probability is zero can never be chosen.

The hash is Chris Wellons' ``lowbias32`` integer mixer applied in a chain, computed with int64
tensors in which every product stays below 2**63 (multiplication is split into 16-bit halves),
so it gives the same bits on every device and under ``torch.compile``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_BLOCK = 256  # tokens per block of the two-level inverse-CDF draw
_MASK32 = 0xFFFFFFFF
_MASK16 = 0xFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for ``x`` in ``[0, 2**32)`` without ever overflowing int64."""
    lo = (x & _MASK16) * c
    hi = (((x >> 16) * c) & _MASK16) << 16
    return (lo + hi) & _MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A well-mixed 32-bit hash of each element of an int64 tensor (its low 32 bits are used)."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _absorb(h: torch.Tensor, value: torch.Tensor | int) -> torch.Tensor:
    return hash32(h ^ (torch.as_tensor(value, dtype=torch.int64, device=h.device) & _MASK32))


def sequence_keys(seed: int, prompt_index: torch.Tensor, sample_index: torch.Tensor) -> torch.Tensor:
    """The random-stream key ``[B]`` (int64) of each sequence, from the call's seed, the sequence's
    prompt index and its sample index within that prompt (both ``[B]``)."""
    seed = int(seed) & ((1 << 64) - 1)
    h = hash32(torch.full_like(prompt_index, seed & _MASK32, dtype=torch.int64))
    h = _absorb(h, (seed >> 32) & _MASK32)
    h = _absorb(h, prompt_index.long())
    return _absorb(h, sample_index.long())


def uniform_draws(keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """A uniform number in the open interval (0, 1) (float64, 53 random bits) for token ``steps [B]``
    of each sequence ``keys [B]``."""
    h1 = _absorb(keys, steps.long())
    h2 = hash32(h1 ^ 0x5BD1E995)
    bits = (h1 << 21) | (h2 >> 11)  # 32 + 21 = 53 bits
    return (bits.double() + 0.5) * (2.0 ** -53)


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """Log-prob ``[B]`` of ``tokens [B]`` under ``log_softmax(logits [B, V] / temperature)`` in float32
    (plain ``log_softmax(logits)`` when ``temperature`` is 0, i.e. greedy)."""
    scaled = logits.float()
    if not (isinstance(temperature, (int, float)) and temperature in (0, 1)):
        scaled = scaled / temperature
    picked = scaled.gather(-1, tokens.long()[:, None])[:, 0]
    return picked - torch.logsumexp(scaled, dim=-1)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Set the logits ``[B, V]`` outside the top-k, then outside the nucleus of mass ``top_p``, to -inf.

    As Hugging Face's warpers: top-k keeps every token whose logit ties the k-th largest; top-p keeps
    the smallest set of most likely tokens whose probability (after top-k) sums to at least
    ``top_p``, and always at least one token. ``top_k=0`` and ``top_p=1.0`` are off (pass a Python
    float to skip the sort when it is off).
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if not (isinstance(top_p, (int, float)) and top_p >= 1.0):
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits.float(), dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of the more likely tokens
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def draw_tokens(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Token ``[B]`` drawn from ``softmax(logits [B, V])`` by inverting its cumulative distribution at
    ``uniforms [B]`` in (0, 1). Tokens at -inf have probability zero and are never returned.

    The inversion is two-level, in float64: over the sums of blocks of ``_BLOCK`` tokens, then within
    the chosen block, which avoids a sequential cumulative sum over the whole vocabulary.
    """
    B, V = logits.shape
    n_blocks = -(-V // _BLOCK)
    logits = logits.float()
    if n_blocks * _BLOCK != V:
        logits = F.pad(logits, (0, n_blocks * _BLOCK - V), value=float("-inf"))
    weights = torch.exp(logits - logits.amax(dim=-1, keepdim=True)).view(B, n_blocks, _BLOCK)  # top token: 1
    block_cdf = torch.cumsum(weights.sum(dim=-1, dtype=torch.float64), dim=-1)  # [B, n_blocks]
    total = block_cdf[:, -1:]
    target = torch.minimum(uniforms.double()[:, None] * total, total)  # [B, 1], > 0
    # The first block whose cumulative weight reaches the target: every block before it sums below it.
    block = torch.searchsorted(block_cdf, target).clamp(max=n_blocks - 1)  # [B, 1]
    before = torch.where(block > 0, block_cdf.gather(-1, (block - 1).clamp(min=0)), 0.0)
    inner_cdf = torch.cumsum(weights.gather(1, block[:, :, None].expand(B, 1, _BLOCK))[:, 0].double(), dim=-1)
    rest = torch.minimum(target - before, inner_cdf[:, -1:])  # > 0, so the index found has positive weight
    inner = torch.searchsorted(inner_cdf, rest).clamp(max=_BLOCK - 1)
    return (block * _BLOCK + inner)[:, 0]


def suppress_tokens(logits: torch.Tensor, token_ids: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor:
    """Set ``logits[b, token_ids]`` to -inf for the rows where ``rows [B]`` (bool) is True: EOS and stop
    tokens before ``min_new_tokens`` are reached."""
    if token_ids is None or token_ids.numel() == 0 or rows is None:
        return logits
    banned = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    banned[token_ids] = True
    return logits.masked_fill(rows[:, None] & banned[None, :], float("-inf"))


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float | torch.Tensor,
    top_k: int,
    top_p: float | torch.Tensor,
    keys: torch.Tensor,
    steps: torch.Tensor,
    suppress_ids: torch.Tensor | None = None,
    suppress_rows: torch.Tensor | None = None,
    greedy: bool | None = None,
) -> torch.Tensor:
    """Next token ``[B]`` from ``logits [B, V]``, in Hugging Face's order: suppression (min length),
    temperature, top-k, top-p, then a draw with the counter-based uniforms of ``(keys, steps)``.

    ``greedy`` (default: ``temperature == 0``) takes the argmax instead. Pass ``temperature`` /
    ``top_p`` as 0-d tensors to keep one compiled graph for every value.
    """
    if greedy is None:
        greedy = float(temperature) == 0.0
    logits = suppress_tokens(logits.float(), suppress_ids, suppress_rows)
    if greedy:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / temperature, top_k, top_p)
    return draw_tokens(logits, uniform_draws(keys, steps))

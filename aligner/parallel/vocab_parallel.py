"""Per-token log-probs, entropy and cross-entropy over vocab-sharded logits, without gathering them.

With ``loss_parallel`` the LM head returns logits as a DTensor sharded on the vocab dim: each tp rank
holds ``[B, T, V/tp]``. Gathering ``[B, T, V]`` on one rank costs ``tp`` times the memory (for a
128k vocabulary at 8k tokens, 4 GiB in float32 per sequence), so these functions combine per-rank
partial results instead: the log-normaliser from a max (all-reduce MAX) and a sum of exponentials
(all-reduce SUM), the label logit from the one rank whose slice holds the label. Each collective
moves ``[B, T]`` numbers. Backward needs no communication: every tp rank holds the same upstream
gradient and computes the gradient of its own vocab slice.

The same functions take plain ``[B, T, V]`` tensors (one rank, or gathered logits) and then equal
``log_softmax`` + ``gather``. They compute in float32 whatever the logits' dtype.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset


def _local_vocab_shard(logits: torch.Tensor):
    """(local ``[B, T, V_local]`` tensor, tp process group or None, global index of its first vocab entry)."""
    if not isinstance(logits, DTensor):
        return logits, None, 0
    vocab_dim = logits.ndim - 1
    group, mesh_dim = None, None
    for i, p in enumerate(logits.placements):
        if isinstance(p, Shard) and p.dim % logits.ndim == vocab_dim:
            mesh_dim = i
        elif not isinstance(p, Replicate):
            raise ValueError(
                f"vocab-parallel logits must be sharded on the vocab (last) dim and replicated otherwise; "
                f"got placements {logits.placements}. Build the LM head with apply_tensor_parallel(loss_parallel=True)"
            )
    if mesh_dim is None:  # fully replicated DTensor: every rank has the whole vocabulary
        return logits.to_local(), None, 0
    group = logits.device_mesh.get_group(mesh_dim)
    _, offset = compute_local_shape_and_global_offset(logits.shape, logits.device_mesh, logits.placements)
    # to_local is differentiable: the local gradient flows back into the sharded LM head.
    return logits.to_local(), group, offset[vocab_dim]


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(t, op=op, group=group)
    return t


def _log_normaliser(local: torch.Tensor, group) -> torch.Tensor:
    """``logsumexp`` over the full vocabulary ``[B, T]`` from the local slice ``[B, T, V_local]`` (float32)."""
    m = local.amax(dim=-1)  # [B, T]
    _all_reduce(m, dist.ReduceOp.MAX, group)
    s = torch.exp(local - m.unsqueeze(-1)).sum(dim=-1)
    _all_reduce(s, dist.ReduceOp.SUM, group)
    return m + torch.log(s)


def _label_logit(x: torch.Tensor, labels: torch.Tensor, vocab_start: int, group):
    """Each label's logit ``[B, T]`` from the one rank whose vocab slice ``x`` holds it, with the label's index in
    that slice (0 where not owned) and whether this rank owns it, for the backward's one-hot term."""
    idx = labels - vocab_start
    owned = (idx >= 0) & (idx < x.shape[-1])
    idx = torch.where(owned, idx, torch.zeros_like(idx))
    label_logit = torch.where(owned, torch.gather(x, -1, idx.unsqueeze(-1)).squeeze(-1), 0.0)
    return _all_reduce(label_logit, dist.ReduceOp.SUM, group), idx, owned  # exactly one rank contributes


def _logprob_grad(softmax: torch.Tensor, grad: torch.Tensor, idx: torch.Tensor, owned: torch.Tensor) -> torch.Tensor:
    """The logits' gradient of ``logp[label]`` times ``grad [B, T]`` on this rank's vocab slice:
    ``grad * (onehot(label) - softmax)``, computed in place in ``softmax`` (float32, this rank's slice)."""
    g = softmax.mul_(-grad.unsqueeze(-1))
    g.scatter_add_(-1, idx.unsqueeze(-1), (grad * owned).unsqueeze(-1))
    return g


class _TokenLogprob(torch.autograd.Function):
    """``log softmax(logits)[label]`` over vocab-sharded logits."""

    @staticmethod
    def forward(ctx, local, labels, group, vocab_start):
        x = local.float()  # [B, T, V_local]
        lse = _log_normaliser(x, group)  # [B, T]
        label_logit, idx, owned = _label_logit(x, labels, vocab_start, group)
        ctx.save_for_backward(local, lse, idx, owned)
        return label_logit - lse

    @staticmethod
    def backward(ctx, grad):  # grad [B, T]
        local, lse, idx, owned = ctx.saved_tensors
        g = _logprob_grad(torch.exp(local.float() - lse.unsqueeze(-1)), grad, idx, owned)
        return g.to(local.dtype), None, None, None


class _TokenLogprobEntropy(torch.autograd.Function):
    """``log softmax(logits)[label]`` (differentiable) and the entropy (not) over vocab-sharded logits."""

    @staticmethod
    def forward(ctx, local, labels, group, vocab_start):
        x = local.float()  # [B, T, V_local]
        m = _all_reduce(x.amax(dim=-1), dist.ReduceOp.MAX, group)
        p = torch.sub(x, m.unsqueeze(-1)).exp_()
        s = _all_reduce(p.sum(dim=-1), dist.ReduceOp.SUM, group)
        p.div_(s.unsqueeze(-1))  # this rank's slice of softmax(x)
        lse = m + torch.log(s)
        entropy = lse - _all_reduce(torch.linalg.vecdot(p, x), dist.ReduceOp.SUM, group)  # logsumexp - E_p[x]
        label_logit, idx, owned = _label_logit(x, labels, vocab_start, group)
        # The backward needs softmax(x): kept when it costs no more memory than the logits themselves;
        # for half-precision logits those are kept instead and the softmax recomputed.
        keep = p if local.dtype == torch.float32 else local
        ctx.save_for_backward(keep, lse, idx, owned)
        ctx.mark_non_differentiable(entropy)
        return label_logit - lse, entropy

    @staticmethod
    def backward(ctx, grad, _):
        kept, lse, idx, owned = ctx.saved_tensors
        softmax = kept.clone() if kept.dtype == torch.float32 else torch.exp(kept.float() - lse.unsqueeze(-1))
        g = _logprob_grad(softmax, grad, idx, owned)
        return g.to(kept.dtype), None, None, None  # the logits' dtype: softmax is kept only for float32


class _TokenEntropy(torch.autograd.Function):
    """``-sum_v p_v log p_v`` over vocab-sharded logits."""

    @staticmethod
    def forward(ctx, local, group):
        x = local.float()
        lse = _log_normaliser(x, group)
        neg_logp = lse.unsqueeze(-1) - x  # [B, T, V_local], >= 0
        # Summing non-negative terms p * (-log p) avoids the cancellation of logsumexp - E_p[x].
        entropy = (torch.exp(-neg_logp) * neg_logp).sum(dim=-1)
        _all_reduce(entropy, dist.ReduceOp.SUM, group)
        ctx.save_for_backward(local, lse, entropy)
        return entropy

    @staticmethod
    def backward(ctx, grad):
        local, lse, entropy = ctx.saved_tensors
        neg_logp = lse.unsqueeze(-1) - local.float()
        # dH/dx_v = -p_v (x_v - E_p[x]) = p_v (-log p_v - H)
        g = torch.exp(-neg_logp).mul_(neg_logp.sub_(entropy.unsqueeze(-1))).mul_(grad.unsqueeze(-1))
        return g.to(local.dtype), None


def _check_labels(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if isinstance(labels, DTensor):
        labels = labels.full_tensor()
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match logits {tuple(logits.shape)} without the "
            f"vocab dim; pass labels [B, T] aligned with the logits (shift them before calling)"
        )
    return labels


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each label under the logits: ``[B, T, V] x [B, T] -> [B, T]`` (float32).

    ``logits`` may be a plain tensor or a DTensor sharded on the vocab dim; labels must be valid ids
    (mask ignored positions after the call). The result is identical on every tp rank and differentiable.
    """
    labels = _check_labels(logits, labels)
    local, group, vocab_start = _local_vocab_shard(logits)
    return _TokenLogprob.apply(local, labels.long(), group, vocab_start)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the predicted distribution at each position: ``[B, T, V] -> [B, T]`` (float32)."""
    local, group, _ = _local_vocab_shard(logits)
    return _TokenEntropy.apply(local, group)


def token_logprobs_with_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`token_logprobs` and :func:`token_entropy` from one pass over the logits, ``[B, T]`` each.

    Only the log-probs are differentiable; the entropy is a metric (detached). One ``exp`` over
    ``[B, T, V]`` instead of three (log-probs, entropy, the log-probs' backward): with float32 logits the
    softmax is kept for the backward. The entropy is ``logsumexp - E_p[x]``, within ~1e-5 of
    :func:`token_entropy` for float32 logits of magnitude up to ~100.
    """
    labels = _check_labels(logits, labels)
    local, group, vocab_start = _local_vocab_shard(logits)
    return _TokenLogprobEntropy.apply(local, labels.long(), group, vocab_start)


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, reduction: str = "sum"
) -> torch.Tensor:
    """Cross-entropy of ``logits [B, T, V]`` against ``labels [B, T]``, as ``F.cross_entropy`` computes it.

    Positions whose label is ``ignore_index`` contribute nothing. ``reduction``: ``"sum"``, ``"mean"``
    (over non-ignored positions) or ``"none"`` (``[B, T]``, zeros where ignored).
    """
    if reduction not in ("sum", "mean", "none"):
        raise ValueError(f"cross_entropy reduction '{reduction}' is not one of sum, mean, none")
    labels = _check_labels(logits, labels)
    keep = labels != ignore_index
    nll = -token_logprobs(logits, torch.where(keep, labels, torch.zeros_like(labels)))
    nll = torch.where(keep, nll, torch.zeros_like(nll))
    if reduction == "none":
        return nll
    if reduction == "sum":
        return nll.sum()
    return nll.sum() / keep.sum()

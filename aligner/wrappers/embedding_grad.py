"""Gradient accumulation fused into the backward of an embedding tied to the LM head.

A tied embedding matrix (SmolLM2's ``[49152, 576]``, 113 MB in float32) receives two gradients per
micro-batch: the LM head's, a dense matrix from one matmul, and the lookup's, which is non-zero only in
the rows of the tokens looked up (a few hundred). Left to autograd, every micro-batch allocates the
head's gradient, a dense zero matrix for the lookup's rows, their sum (autograd does not add in place
into the view ``F.linear``'s backward returns) and, after the first micro-batch, adds that into
``.grad``: four passes over freshly allocated, page-faulted 113 MB buffers, 10% of an SFT step of
SmolLM2 on a CPU (bench/RESULTS.md, "SFT step").

Here the two backward functions add straight into the weight's ``.grad``, as Megatron-LM's gradient
accumulation fusion does for its linear layers: the head's weight gradient with one in-place
``addmm_`` (the first micro-batch of a step allocates it), the lookup's with an ``index_add_`` of its
rows. Autograd then sees no weight gradient from either (they return None for it). The values are the
same sums, up to float32 rounding order.

Consequences, why it is used only where it is:
* ``.grad`` is written by these functions, so only ``loss.backward()`` sees the gradient
  (``torch.autograd.grad`` would not); PolicyModel's training step is the only caller that turns it on.
* It needs the pair to be one plain tensor in one module: not under TP or FSDP (DTensor parameters,
  whose sharded gradients FSDP reduces through autograd's hooks) and not across pipeline stages (two
  copies), nor with a value head (no tie). Passes without gradients run the plain ops.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from aligner.models.transformer import vocab_projection


class _TiedHeadMatmul(torch.autograd.Function):
    """``F.linear(h, weight)``; the backward adds ``grad^T @ h`` into ``weight.grad``."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h, weight)
        return F.linear(h, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, weight = ctx.saved_tensors
        grad2d, h2d = grad.reshape(-1, grad.shape[-1]), h.reshape(-1, h.shape[-1])
        if weight.grad is None:
            weight.grad = grad2d.t().mm(h2d)
        else:
            weight.grad.addmm_(grad2d.t(), h2d)
        grad_h = (grad2d @ weight).view(h.shape) if ctx.needs_input_grad[0] else None
        return grad_h, None


class _TiedLookup(torch.autograd.Function):
    """``F.embedding(ids, weight)``; the backward adds the rows' gradients into ``weight.grad``."""

    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.weight = weight  # a parameter: held, not saved (saving a leaf that gets no gradient is fine too)
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (ids,) = ctx.saved_tensors
        weight = ctx.weight
        if weight.grad is None:  # a pass that never reached the head
            weight.grad = torch.zeros_like(weight)
        weight.grad.index_add_(0, ids.reshape(-1), grad.reshape(-1, grad.shape[-1]).to(weight.grad.dtype))
        return None, None


def _fused(module: nn.Module) -> bool:
    return torch.is_grad_enabled() and module.weight.requires_grad


def _head_forward(head: nn.Linear, h: torch.Tensor) -> torch.Tensor:
    return _TiedHeadMatmul.apply(h, head.weight) if _fused(head) else vocab_projection(h, head.weight)


def _lookup_forward(embed: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    return _TiedLookup.apply(ids, embed.weight) if _fused(embed) else F.embedding(ids, embed.weight)


def fuse_tied_gradient_accumulation(model: nn.Module) -> bool:
    """Make ``model``'s tied embedding and LM head accumulate their gradients into ``.grad`` themselves,
    where they are one plain tensor (see the module docstring). Returns whether it did."""
    embed, head = getattr(model, "tok_embeddings", None), getattr(model, "output", None)
    if not isinstance(embed, nn.Embedding) or not isinstance(head, nn.Linear) or head.weight is not embed.weight:
        return False
    if isinstance(embed.weight, DTensor) or head.bias is not None or embed.padding_idx is not None:
        return False
    if embed.max_norm is not None or embed.scale_grad_by_freq or embed.sparse:
        return False
    # Bound methods on the instances (they survive copy.deepcopy); the classes and parameter names stay.
    embed.forward = types.MethodType(_lookup_forward, embed)
    head.forward = types.MethodType(_head_forward, head)
    return True

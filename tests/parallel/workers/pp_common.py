"""Batches and losses shared by the pipeline-parallel workers and the single-process reference in
tests/parallel/test_pipeline.py, so both sides compute exactly the same thing."""
from __future__ import annotations

import torch
import torch.nn.functional as F

BATCH, SEQ, VOCAB = 8, 12, 128
N_MICROBATCHES = 4
LR = 1e-2
# Adam's first step is lr * g / (|g| + eps): with the default eps=1e-8 a gradient of 1e-8 turns a 1e-9 float32
# summation-order difference into a 1e-3 weight change. eps=1e-4 bounds the effect of a gradient difference d
# by lr * d / eps, so equal gradients (to 1e-8) must give weights equal to 1e-6.
ADAM_EPS = 1e-4


def build_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=LR, eps=ADAM_EPS)


def make_batch(seed: int, padded: bool = False) -> dict:
    """Random tokens ``[8, 12]``; ``padded`` left-pads rows with different amounts (0 to 7 tokens)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    attention_mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    if padded:
        for row in range(BATCH):
            attention_mask[row, :row] = 0
        tokens = tokens.masked_fill(attention_mask == 0, 0)
    loss_mask = attention_mask.clone()
    batch = {"tokens": tokens, "loss_mask": loss_mask,
             # The global normaliser travels whole (0-d) to every micro-batch.
             "num_loss_tokens": loss_mask[:, 1:].sum()}
    if padded:
        batch["attention_mask"] = attention_mask
    return batch


def token_loss_share(logits: torch.Tensor, mb: dict):
    """Next-token cross-entropy summed over this micro-batch's loss tokens, divided by the whole batch's
    count: the micro-batch's share of the token-mean loss. Also returns the summed token log-probs."""
    logp = F.log_softmax(logits.float(), dim=-1)[:, :-1]  # [b, T-1, V]
    token_logp = logp.gather(-1, mb["tokens"][:, 1:, None]).squeeze(-1)  # [b, T-1]
    mask = mb["loss_mask"][:, 1:].to(token_logp.dtype)
    loss = -(token_logp * mask).sum() / mb["num_loss_tokens"]
    return loss, {"sum_logp": (token_logp * mask).sum().detach()}


def token_logprobs(logits: torch.Tensor, mb: dict) -> torch.Tensor:
    """Per-token log-probs of the next token ``[b, T-1]`` (what a reference-policy forward returns)."""
    logp = F.log_softmax(logits.float(), dim=-1)[:, :-1]
    return logp.gather(-1, mb["tokens"][:, 1:, None]).squeeze(-1)


def model_kwargs(batch: dict) -> dict:
    return {k: batch[k] for k in ("attention_mask",) if k in batch}


def reference_step(model, batch: dict) -> dict:
    """Single process, whole batch: loss, metrics, gradients, log-probs, and weights and loss after one AdamW step."""
    logits = model(batch["tokens"], **model_kwargs(batch))
    loss, metrics = token_loss_share(logits, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        logprobs = token_logprobs(model(batch["tokens"], **model_kwargs(batch)), batch)
    build_optimizer(model.parameters()).step()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        loss_after, _ = token_loss_share(model(batch["tokens"], **model_kwargs(batch)), batch)
    return dict(loss=loss.detach(), metrics=metrics, grads=grads, logprobs=logprobs, weights=weights,
                loss_after=loss_after)


def token_loss_share_vocab_parallel(logits: torch.Tensor, mb: dict):
    """:func:`token_loss_share` through ``aligner.parallel.vocab_parallel``, so that logits may be a
    vocab-sharded DTensor (tensor parallel with loss_parallel); ``mb["loss_scale"]`` undoes FSDP's
    averaging of gradients over data-parallel ranks."""
    from aligner.parallel.vocab_parallel import token_logprobs as vp_token_logprobs

    token_logp = vp_token_logprobs(logits[:, :-1], mb["tokens"][:, 1:])  # [b, T-1]
    mask = mb["loss_mask"][:, 1:].to(token_logp.dtype)
    loss = -(token_logp * mask).sum() / mb["num_loss_tokens"] * mb.get("loss_scale", 1)
    return loss, {"sum_logp": (token_logp * mask).sum().detach()}


def token_logprobs_vocab_parallel(logits: torch.Tensor, mb: dict) -> torch.Tensor:
    from aligner.parallel.vocab_parallel import token_logprobs as vp_token_logprobs

    return vp_token_logprobs(logits[:, :-1], mb["tokens"][:, 1:]).detach()

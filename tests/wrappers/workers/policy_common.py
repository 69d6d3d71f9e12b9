"""Configs, batches and the loss shared by the PolicyModel tests and their torchrun worker, so the
single-process reference and the parallel runs compute exactly the same thing."""
from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from aligner.config import ArchConfig, ModelConfig, SFTJobConfig
from aligner.parallel import cross_entropy, token_logprobs

VOCAB, SEQ, GLOBAL_BATCH = 128, 16, 4
# Real lengths of the 4 rows of every batch (right padding after them) and prompt tokens without loss.
LENGTHS = (16, 5, 11, 8)
PROMPTS = (3, 1, 6, 2)


def job_config(layout: dict | None = None, micro_batch_size: int = 1, tied: bool = False, **parallel) -> SFTJobConfig:
    """A tiny 4-layer GQA model with random init, AdamW with weight decay, linear decay, active clipping."""
    cfg = SFTJobConfig()
    cfg.model = ModelConfig(arch=ArchConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied))
    for key, value in {**(layout or {}), **parallel}.items():
        setattr(cfg.parallel, key, value)
    cfg.trainer.global_batch_size = GLOBAL_BATCH
    cfg.trainer.micro_batch_size = micro_batch_size
    cfg.trainer.seed = 7
    cfg.optim.lr = 1e-3
    # Adam moves a weight by about lr * g / (|g| + eps); eps=1e-4 keeps float32 reduction-order noise in
    # the gradients (~1e-8) far below the 1e-5 tolerance, while every weight still moves by ~lr.
    cfg.optim.eps = 1e-4
    cfg.optim.weight_decay = 0.1
    cfg.optim.clip_grad = 1.0  # the tiny model's gradient norm is ~3, so clipping is active
    cfg.optim.sched.name = "linear"
    cfg.optim.sched.warmup_steps = 0
    return cfg


TOTAL_STEPS = 4


def make_batch(step: int) -> dict[str, torch.Tensor]:
    """The global batch of ``step``: 4 right-padded rows of different lengths, labels shifted, -100 on
    the prompt, the padding and the last real position."""
    gen = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(1, VOCAB, (GLOBAL_BATCH, SEQ), generator=gen)
    attention_mask = torch.zeros(GLOBAL_BATCH, SEQ, dtype=torch.long)
    labels = torch.full((GLOBAL_BATCH, SEQ), -100)
    for row, (length, prompt) in enumerate(zip(LENGTHS, PROMPTS)):
        attention_mask[row, :length] = 1
        tokens[row, length:] = 0
        labels[row, prompt:length - 1] = tokens[row, prompt + 1:length]
    return {"tokens": tokens, "labels": labels, "attention_mask": attention_mask}


def dp_share(batch: dict, dp_rank: int, dp_size: int) -> dict:
    """Rows of data-parallel rank ``dp_rank`` (contiguous shares)."""
    n = GLOBAL_BATCH // dp_size
    return {k: v[dp_rank * n:(dp_rank + 1) * n] for k, v in batch.items()}


class TokenLoss:
    """SFT's loss: summed token cross-entropy, over vocab-sharded logits too; metrics in two unit kinds."""

    def num_units(self, batch):
        return (batch["labels"] != -100).sum()

    def __call__(self, logits, batch):
        nll = cross_entropy(logits, batch["labels"], reduction="sum")
        rows = torch.tensor(float(batch["tokens"].shape[0]), device=nll.device)
        return nll, {"nll": nll.detach(), "rows": rows}


def run_steps(policy, steps: int = 2) -> list[dict[str, float]]:
    """``steps`` training steps on this rank's share of each step's global batch."""
    policy.set_total_steps(TOTAL_STEPS)
    return [policy.train_step(dp_share(make_batch(s), policy.dp_rank, policy.dp_size), TokenLoss())
            for s in range(steps)]


def evaluate(policy) -> dict:
    """eval_step on this rank's share of a held-out batch, and per-token log-probs of it via forward."""
    batch = dp_share(make_batch(9), policy.dp_rank, policy.dp_size)
    logprobs = policy.forward(batch, lambda logits, mb: token_logprobs(logits, mb["tokens"]))  # [n, T]
    return {"eval": policy.eval_step(batch, TokenLoss()), "logprobs": logprobs.cpu(), "dp_rank": policy.dp_rank,
            "dp_size": policy.dp_size}


def full_weights(policy) -> dict[str, torch.Tensor]:
    """This rank's parameters as full tensors (collective over their meshes: every rank calls it)."""
    out = {}
    for name, p in policy.model.named_parameters():
        t = p.detach()
        out[name] = (t.full_tensor() if isinstance(t, DTensor) else t).cpu().clone()
    return out


def state_dict_keys(policy) -> dict[str, list[str]]:
    sd = policy.state_dict()
    return {"model": sorted(sd["model"]), "optimizer": sorted(sd["optimizer"]), "scheduler": sorted(sd["scheduler"])}

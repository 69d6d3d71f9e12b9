"""A small training state for checkpoint tests: a tiny model (plain or parallel), AdamW, an LR schedule.

The app_state objects give DCP layout-independent names through torch's
``get_model_state_dict`` / ``get_optimizer_state_dict``, as the PolicyModel wrapper does.
"""
import random
import sys
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from helpers import tiny_config  # noqa: E402

# eps=1e-4: Adam's step sensitivity to gradient rounding is lr / eps, so float32 reduction-order noise
# between layouts cannot grow past 1e-5 in the weights after a step (see tests/parallel/workers).
ADAMW = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-4, weight_decay=0.1)
WARMUP_STEPS = 4


class ModelState:
    """``app_state["model"]``: the model's weights under names that do not depend on the layout."""

    def __init__(self, model):
        self.model = model
        self.config = model.config

    def state_dict(self):
        return get_model_state_dict(self.model)

    def load_state_dict(self, state):
        set_model_state_dict(self.model, state)


class OptimizerState:
    """``app_state["optimizer"]``: AdamW moments keyed by parameter name."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self):
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state):
        set_optimizer_state_dict(self.model, self.optimizer, state)


class PolicyState:
    """Model, optimizer and scheduler behind one name, as a trainer passes ``{"policy": policy}``."""

    def __init__(self, model, optimizer, scheduler):
        self.model_state, self.optim_state, self.scheduler = ModelState(model), OptimizerState(model, optimizer), scheduler
        self.config = model.config

    def state_dict(self):
        return {"model": self.model_state.state_dict(), "optimizer": self.optim_state.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state):
        self.model_state.load_state_dict(state["model"])
        self.optim_state.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def build_optimizer(model):
    """AdamW and a linear-warmup LambdaLR (the schedule changes the LR on every step tested)."""
    optimizer = torch.optim.AdamW(model.parameters(), **ADAMW)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / WARMUP_STEPS))
    return optimizer, scheduler


def app_state(model, optimizer, scheduler) -> dict:
    return {"model": ModelState(model), "optimizer": OptimizerState(model, optimizer), "scheduler": scheduler}


def make_batch(step: int, batch: int = 4, seq: int = 16) -> dict:
    """A fixed batch for ``step``: tokens [B, T] and next-token labels (-100 at the last position)."""
    gen = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, tiny_config().vocab_size, (batch, seq), generator=gen)
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, -1] = -100
    return {"tokens": tokens, "labels": labels}


def train_step(model, optimizer, scheduler, step: int, dp_rank: int = 0, dp: int = 1) -> float:
    """One step on this dp rank's rows of batch ``step``; the loss is the global token mean."""
    from aligner.parallel import cross_entropy

    batch = make_batch(step)
    rows = slice(dp_rank * 4 // dp, (dp_rank + 1) * 4 // dp)
    count = (batch["labels"] != -100).sum()
    logits = model(batch["tokens"][rows])
    local_sum = cross_entropy(logits, batch["labels"][rows], reduction="sum")
    (local_sum / count * dp).backward()  # FSDP averages gradients over dp ranks; undo it
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(local_sum.detach())


def full(t):
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def full_weights(model) -> dict:
    """Every parameter, gathered into a full plain tensor (collective under TP/FSDP)."""
    return {name: full(p) for name, p in model.named_parameters()}


def full_optimizer_state(model, optimizer) -> dict:
    """``{param name: {"exp_avg", "exp_avg_sq", "step"}}`` as full plain tensors (collective)."""
    names = {id(p): name for name, p in model.named_parameters()}
    return {names[id(p)]: {k: full(v) for k, v in state.items()} for p, state in optimizer.state.items()}


def random_draws() -> dict:
    """Next values of every generator a checkpoint restores (torch, Python, NumPy)."""
    return {"torch": torch.rand(5), "python": [random.random() for _ in range(3)], "numpy": np.random.rand(3).tolist()}

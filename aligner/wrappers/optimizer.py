"""AdamW, the learning-rate schedule, global gradient-norm clipping and optimizer-state offload.

Everything here works on any parallel layout: parameters and gradients may be DTensors sharded over
tensor- and data-parallel meshes, and under pipeline parallelism each rank holds only its stages.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Replicate

from aligner.config.schema import OptimConfig

SCHEDULES = ("constant", "linear", "cosine")


def build_optimizer(params: Iterable[torch.nn.Parameter], optim_cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over ``params`` as ``optim`` configures it (lr, betas, eps, weight_decay).

    Weight decay applies to matrices only: norm weights and biases (every 1-D parameter) form a second
    group without decay, the rule of Hugging Face's Trainer (and so TRL) for Llama-family models. The
    rule looks at the global shape, so it gives the same groups at every layout.
    """
    if optim_cfg.name != "adamw":
        raise ValueError(f"optim.name='{optim_cfg.name}' is not supported; use optim.name=adamw")
    if len(optim_cfg.betas) != 2:
        raise ValueError(f"optim.betas={list(optim_cfg.betas)} must hold two numbers, e.g. [0.9, 0.999]")
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("build_optimizer got no trainable parameters; is the model frozen (requires_grad=False)?")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": optim_cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel updates every tensor in one pass; PyTorch's default on CPU is a Python loop over the
    # parameters that costs ~2 s per step for a 135M model (bench/RESULTS.md, "SFT step"), 6x the fused one.
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=optim_cfg.lr,
                             betas=tuple(optim_cfg.betas), eps=optim_cfg.eps, fused=fused)


def lr_at(step: int, optim_cfg: OptimConfig, total_steps: int | None) -> float:
    """Learning rate of optimizer step ``step`` (0-based) in a run of ``total_steps`` steps.

    Linear warmup from 0 over ``sched.warmup_steps`` (``lr * step / warmup``, as Hugging Face's
    schedulers), then ``constant``, or ``linear`` / ``cosine`` decay from ``lr`` to ``sched.min_lr``,
    reached at ``total_steps``. ``total_steps`` is only needed once the decay starts.
    """
    sched = optim_cfg.sched
    if sched.name not in SCHEDULES:
        raise ValueError(f"optim.sched.name='{sched.name}' is not one of {', '.join(SCHEDULES)}")
    peak, warmup = optim_cfg.lr, sched.warmup_steps
    if step < warmup:
        return peak * step / warmup
    if sched.name == "constant" or step == warmup:
        return peak
    if total_steps is None or total_steps <= 0:
        raise ValueError(f"optim.sched.name={sched.name} decays over the run but the total number of steps is "
                         f"unknown; call set_total_steps(n) on the model before training (trainers do)")
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if sched.name == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return sched.min_lr + (peak - sched.min_lr) * factor


class LRSchedule:
    """Sets every param group's ``lr`` to :func:`lr_at` of the number of optimizer steps taken.

    Call :meth:`apply` before each ``optimizer.step()`` and :meth:`step` after it. Its state is the step
    count alone; ``total_steps`` comes from the current run (a resumed run that is given more steps
    decays over the new length).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, optim_cfg: OptimConfig, total_steps: int | None = None):
        self.optimizer = optimizer
        self.optim_cfg = optim_cfg
        self.total_steps = total_steps
        self.steps_taken = 0
        self.apply()

    @property
    def lr(self) -> float:
        """The learning rate of the next optimizer step."""
        return lr_at(self.steps_taken, self.optim_cfg, self.total_steps)

    def apply(self) -> float:
        """Write the next step's learning rate into every param group and return it."""
        lr = self.lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def step(self) -> None:
        """Count one optimizer step (the rate changes at the next :meth:`apply`)."""
        self.steps_taken += 1

    def state_dict(self) -> dict[str, Any]:
        return {"steps_taken": self.steps_taken}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps_taken = int(state_dict["steps_taken"])


def _squared_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """Squared L2 norm (float32, plain 0-d tensor) of the full tensors behind ``grads``, which share one
    layout: one collective for a group of DTensors, none for plain tensors."""
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()  # sums the shards' contributions over the mesh dims that shard them
    return norm.float() ** 2


@torch.no_grad()
def clip_grad_norm(
    parameters: Iterable[torch.Tensor],
    max_norm: float,
    pp_group: dist.ProcessGroup | None = None,
    *,
    tied_copies: Iterable[torch.Tensor] = (),
) -> float:
    """Scale gradients in place so that their global L2 norm is at most ``max_norm``; returns the norm
    before clipping, the same on every rank.

    The coefficient is ``min(1, max_norm / (norm + 1e-6))``, as ``torch.nn.utils.clip_grad_norm_``.

    Args:
        parameters: this rank's parameters (plain tensors or DTensors over tp/dp meshes; a plain tensor
            is a replica, counted once).
        max_norm: the bound; ``<= 0`` only measures.
        pp_group: under pipeline parallelism, the group of this rank's pipeline: stages hold different
            parameters, so their squared norms are summed over it.
        tied_copies: parameters whose gradient duplicates one counted on another stage (the last
            stage's LM head tied to the first stage's embedding): clipped, not counted.
    """
    parameters = [p for p in parameters if p.grad is not None]
    skip = {id(p) for p in tied_copies}
    groups: dict[Any, list[torch.Tensor]] = defaultdict(list)
    for p in parameters:
        if id(p) in skip:
            continue
        g = p.grad
        if isinstance(g, DTensor):
            if any(isinstance(pl, Partial) for pl in g.placements):
                # A norm of pending partial sums is not the norm of their sum: reduce first (a copy).
                g = g.redistribute(g.device_mesh, [Replicate() if isinstance(pl, Partial) else pl
                                                   for pl in g.placements])
            key = (g.device_mesh, tuple(g.placements), g.dtype)
        else:
            key = ("plain", g.device, g.dtype)
        groups[key].append(g)
    device = parameters[0].grad.device if parameters else torch.device("cpu")
    squares = [_squared_norm(grads).to(device) for grads in groups.values()]
    total_sq = torch.stack(squares).sum() if squares else torch.zeros((), device=device)
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(total_sq, group=pp_group)
    total = float(total_sq.sqrt())
    if max_norm > 0:
        coef = min(1.0, max_norm / (total + 1e-6))
        if coef < 1.0:
            for grads in _by_kind(p.grad for p in parameters):
                torch._foreach_mul_(grads, coef)
    return total


def _by_kind(tensors: Iterable[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Tensors grouped so that each group is all DTensors on one mesh, or all plain on one device."""
    groups: dict[Any, list[torch.Tensor]] = defaultdict(list)
    for t in tensors:
        key = (t.device_mesh, tuple(t.placements)) if isinstance(t, DTensor) else ("plain", t.device)
        groups[(key, t.dtype)].append(t)
    return list(groups.values())


@torch.no_grad()
def move_optimizer_state(optimizer: torch.optim.Optimizer, device: torch.device | str) -> None:
    """Move the per-parameter state tensors (AdamW's moments) to ``device``, DTensor layouts kept.

    The ``step`` counters stay where AdamW keeps them (a CPU scalar).
    """
    for state in optimizer.state.values():
        for key, value in state.items():
            if key != "step" and isinstance(value, torch.Tensor) and value.device != torch.device(device):
                state[key] = value.to(device)


def optimizer_state_devices(optimizer: torch.optim.Optimizer) -> set[str]:
    """Device types holding the moment tensors (``{"cpu"}`` once offloaded); empty before the first step."""
    return {value.device.type for state in optimizer.state.values()
            for key, value in state.items() if key != "step" and isinstance(value, torch.Tensor)}

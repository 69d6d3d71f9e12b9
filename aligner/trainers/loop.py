"""The loop machinery every trainer shares: start-up, the step loop, validation, checkpoints, preemption.

An algorithm's own file (``sft.py``, later ``dpo.py`` ...) builds its data and loss and hands them to
:func:`run_training`; everything here talks to the model only through the alignable interface.
"""
from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from aligner.checkpoint import find_resume_checkpoint, load_checkpoint, save_checkpoint
from aligner.config import save_resolved_config
from aligner.interface import Alignable, LossFn
from aligner.logging import MetricsLogger, ProgressBar
from aligner.parallel import ParallelDims, ParallelMesh, build_mesh, init_distributed
from aligner.parallel.collectives import any_rank, barrier


class BatchSource(Protocol):
    """Where the loop gets each step's batch: this data-parallel rank's share of the global batch."""

    steps_per_epoch: int

    def next_batch(self) -> dict[str, torch.Tensor]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class SamplerBatches:
    """The :class:`BatchSource` of every trainer: this rank's indices from a resumable sampler, turned into
    a batch by ``make_batch`` (SFT: collate; preference: collate plus reference log-probs; online RL: the
    prompt indices themselves). The sampler's position is the checkpointed state."""

    def __init__(self, sampler: Any, make_batch: Callable[[list[int]], Any] = lambda indices: indices):
        self.sampler, self.make_batch = sampler, make_batch
        self.steps_per_epoch = sampler.steps_per_epoch

    def next_batch(self) -> Any:
        return self.make_batch(self.sampler.next_batch())

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


class Preemption:
    """Turns SIGTERM / SIGUSR1 (Slurm's ``--signal``) into a request to save and exit 0 after this step."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def agreed(self) -> bool:
        """Whether any rank was signalled; every rank gets the same answer (one tiny all-reduce)."""
        return any_rank(self.requested)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class Run:
    """What a trainer needs from start-up: the config, the mesh, the output directory, this rank."""

    cfg: Any
    pmesh: ParallelMesh
    output_dir: Path
    rank: int
    preemption: Preemption = field(default_factory=Preemption)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def print(self, *args) -> None:
        """Print on rank 0 only."""
        if self.is_main:
            print(*args, flush=True)


def start_run(cfg: Any) -> Run:
    """Start the process group and the mesh from ``cfg.parallel``, seed the RNGs, make the output dir."""
    rank, world = init_distributed()
    p = cfg.parallel
    dims = ParallelDims(dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, pp=p.pp, tp=p.tp, world_size=world)
    pmesh = build_mesh(dims)
    torch.manual_seed(cfg.trainer.seed)
    output_dir = Path(cfg.trainer.output_dir)
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    return Run(cfg=cfg, pmesh=pmesh, output_dir=output_dir, rank=rank)


def total_steps_of(cfg: Any, steps_per_epoch: int) -> int:
    """``trainer.max_steps``, or ``max_epochs`` epochs of the data when it is -1."""
    if cfg.trainer.max_steps > 0:
        return cfg.trainer.max_steps
    return steps_per_epoch * cfg.trainer.max_epochs


@dataclass
class Hooks:
    """Algorithm-specific extras the loop calls: validation metrics and the sample table."""

    validate: Callable[[int], dict[str, float]] | None = None  # step -> {"val/...": value}
    samples: Callable[[int], None] | None = None  # step -> prints and saves a sample table
    step_tokens: Callable[[dict[str, torch.Tensor]], float] | None = None  # tokens in the global batch
    train_metrics: Callable[[dict[str, float]], dict[str, float]] | None = None  # finishes train_step's metrics
    # Online RL: a step is a rollout and several optimizer steps. ``step`` replaces ``policy.train_step(batch,
    # loss_fn)`` (it gets the batch and the step number), and the LR schedule spans this many optimizer steps
    # per loop step.
    step: Callable[[dict[str, Any], int], dict[str, float]] | None = None
    optimizer_steps_per_step: int = 1
    # More state that goes into every checkpoint beside the policy (PPO's critic, self-rewarding's reference).
    extra_models: dict[str, Any] = field(default_factory=dict)
    # Steps of the run when it is not trainer.max_steps / max_epochs of the data (self-rewarding's iterations).
    total_steps: int | None = None


def run_training(run: Run, policy: Alignable, batches: BatchSource, loss_fn: LossFn, hooks: Hooks,
                 model_dir: str | None = None) -> dict[str, float]:
    """Train until ``total_steps``, validating, checkpointing and honouring preemption; returns the last metrics.

    Resumes from ``trainer.resume`` first. Exits the process with status 0 after a preemption save.
    """
    cfg = run.cfg
    tcfg = cfg.trainer
    total = hooks.total_steps if hooks.total_steps is not None else total_steps_of(cfg, batches.steps_per_epoch)
    policy.set_total_steps(total * hooks.optimizer_steps_per_step)
    state = {"step": 0, "consumed_samples": 0}
    logger = MetricsLogger(run.output_dir, cfg.logger, run.rank, run_config=cfg)

    ckpt = find_resume_checkpoint(run.output_dir, tcfg.resume)
    if ckpt is not None:
        extra = load_checkpoint(ckpt, {"policy": policy, **hooks.extra_models})
        state.update(step=extra["step"], consumed_samples=extra["consumed_samples"])
        batches.load_state_dict(extra["batches"])
        logger.truncate_after(state["step"])
        run.print(f"resumed from {ckpt} at step {state['step']}")
    if run.is_main:
        save_resolved_config(cfg, run.output_dir / "config.yaml")

    def save(step: int) -> None:
        extra = {"step": step, "consumed_samples": state["consumed_samples"], "batches": batches.state_dict()}
        path = save_checkpoint(run.output_dir, step, {"policy": policy, **hooks.extra_models}, extra=extra,
                               keep_last=tcfg.save_top_k, model_dir=model_dir)
        run.print(f"saved checkpoint {path}")

    progress = ProgressBar(total, initial_step=state["step"], enabled=run.is_main and cfg.logger.progress_bar,
                           interval=cfg.logger.log_interval)
    metrics: dict[str, float] = {}
    if state["step"] == 0 and tcfg.val_check_interval > 0:
        # The "before" picture: validation and samples of the untrained model, logged as step 0.
        if hooks.validate is not None:
            metrics.update(hooks.validate(0))
            logger.log(0, metrics)
        if hooks.samples is not None:
            hooks.samples(0)
    saved_at = state["step"]
    policy.prepare_for_training()
    while state["step"] < total:
        # The clock includes making the batch: for DPO/KTO that holds reference and KL forwards.
        start = time.perf_counter()
        batch = batches.next_batch()
        if hooks.step is not None:
            train_metrics = hooks.step(batch, state["step"] + 1)
        else:
            train_metrics = policy.train_step(batch, loss_fn)
        elapsed = time.perf_counter() - start
        state["step"] += 1
        state["consumed_samples"] += tcfg.global_batch_size
        step = state["step"]
        tokens = hooks.step_tokens(batch) if hooks.step_tokens is not None else float("nan")
        if hooks.train_metrics is not None:
            train_metrics = hooks.train_metrics(train_metrics)
        # An online step names its metrics itself, as the RLOO reference page does ("objective/kl", "lr", "eps").
        metrics = dict(train_metrics) if hooks.step is not None else {f"train/{k}": v for k, v in train_metrics.items()}
        metrics["train/tokens_per_sec"] = tokens / elapsed if elapsed > 0 else math.nan
        metrics["train/consumed_samples"] = float(state["consumed_samples"])
        metrics["train/epoch"] = (step - 1) // max(1, batches.steps_per_epoch)
        last = step == total
        if hooks.validate is not None and tcfg.val_check_interval > 0 and (step % tcfg.val_check_interval == 0 or last):
            policy.finish_training()
            metrics.update(hooks.validate(step))
            if hooks.samples is not None:
                hooks.samples(step)
            policy.prepare_for_training()
        logger.log(step, metrics)
        progress.update(step, loss=metrics.get("train/loss", metrics.get("loss/policy_avg")),
                        lr=metrics.get("train/lr", metrics.get("lr")),
                        tokens_per_sec=metrics["train/tokens_per_sec"])
        preempted = run.preemption.agreed()
        if preempted or last or (tcfg.save_interval > 0 and step % tcfg.save_interval == 0):
            policy.finish_training()
            save(step)
            saved_at = step
            policy.prepare_for_training()
        if preempted:
            progress.close()
            logger.close()
            run.print(f"preempted: saved step {step}, exiting 0 (resume with trainer.resume=auto)")
            sys.exit(0)
    policy.finish_training()
    if saved_at != state["step"] and state["step"] > 0:
        save(state["step"])
    progress.close()
    logger.close()
    return metrics

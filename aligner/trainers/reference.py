"""The frozen reference model of DPO and KTO: the initial policy, evaluated without a second model in memory.

Two ways (``<algorithm>.reference``):

- ``precompute`` (default): before step 1, one no-grad pass of the initial weights over every row of the
  training and validation data; the summed response log-probs are kept in a table indexed by example
  (a few bytes per row). Each data-parallel rank computes a strided share and the shares are summed, so
  the pass costs ``1 / dp`` of the data per rank. Resuming recomputes it from ``model.path`` before the
  checkpoint is loaded, so the reference stays the initial model.
- ``on_the_fly``: the initial weights (this rank's shards only) are copied to CPU memory once; each step
  swaps them into the model for the reference forward and swaps the trained weights back. It needs
  no pass over the data but one more forward per step and two CPU copies of the local shards.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable

import torch
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.tensor import DTensor

from aligner.parallel.collectives import sum_over
from aligner.trainers.preference_losses import pair_logps, response_logps
from aligner.trainers.sft import validation_share

BatchFn = Callable[[list[int]], dict[str, torch.Tensor]]


def _row_logps(logits, mb: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed response log-probs: ``[b]``, one per row, or ``[b, 2]`` (chosen, rejected) per shared-prompt row."""
    if "branch_ids" in mb:
        chosen, rejected, _, _ = pair_logps(logits, mb)
        return torch.stack([chosen, rejected], dim=-1).float()
    return response_logps(logits, mb["labels"])[0].float()


_row_logps.logits_at_labels = True  # it reads logits at the labels only (see aligner.interface.LossFn)


def policy_logps(policy: Any, batch: dict[str, torch.Tensor], rows_per_example: int = 1) -> torch.Tensor:
    """Summed response log-probs of ``batch`` under the model's current weights, on CPU: ``[N]`` for ``N``
    rows, or ``[N, 2]`` for rows of shared-prompt pairs."""
    return policy.forward(batch, _row_logps, rows_per_example=rows_per_example).detach().cpu()


def dataset_logps(policy: Any, n: int, batch_fn: BatchFn, rows_per_example: int, chunk: int) -> torch.Tensor:
    """``[n, k]`` summed log-probs of every example's ``k`` responses (its rows, or the two branches of a
    shared-prompt pair row), the same table on every rank.

    Data-parallel ranks split the examples (strided, padded with repeats of example 0 so every rank runs
    the same number of forwards, which FSDP needs) and the tables are summed over the dp group.
    """
    share = validation_share(n, policy.dp_rank, policy.dp_size)
    table = None
    for start in range(0, len(share), chunk):
        part = share[start:start + chunk]
        logps = policy_logps(policy, batch_fn([max(i, 0) for i in part]), rows_per_example)
        logps = logps.double().reshape(len(part), -1)
        if table is None:
            table = torch.zeros(n, logps.shape[1], dtype=torch.float64)
        for row, i in zip(logps, part):
            if i >= 0:
                table[i] = row
    return sum_over(table, policy.pmesh["dp"]) if policy.dp_size > 1 else table


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if isinstance(p, DTensor) else p


class SwappedReference:
    """This rank's shards of the initial weights in CPU memory, swapped into the model for reference forwards."""

    def __init__(self, policy: Any):
        self.policy = policy
        self.params = [p for p in policy.model.parameters()]
        with torch.no_grad():
            self.initial = [_local(p).detach().to("cpu", copy=True) for p in self.params]
        self._trained = [torch.empty_like(t) for t in self.initial]

    @contextmanager
    def swapped_in(self):
        """Within the block the model holds the initial weights; the trained ones come back after."""
        with torch.no_grad():
            for p, keep, init in zip(self.params, self._trained, self.initial):
                local = _local(p)
                keep.copy_(local)
                local.copy_(init)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, keep in zip(self.params, self._trained):
                    _local(p).copy_(keep)

    def logps(self, batch: dict[str, torch.Tensor], rows_per_example: int = 1) -> torch.Tensor:
        """Summed response log-probs of ``batch``'s rows under the initial weights: ``[N]``."""
        with self.swapped_in():
            return policy_logps(self.policy, batch, rows_per_example)

    def capture(self) -> None:
        """Make the model's current weights the reference (self-rewarding: at the end of an iteration)."""
        with torch.no_grad():
            for p, init in zip(self.params, self.initial):
                init.copy_(_local(p))

    # A checkpoint holds the reference beside the policy when it is not the initial model any more
    # (self-rewarding): the same names and layout as the policy's weights, so it reshards like them.
    def state_dict(self) -> dict[str, Any]:
        """``{"model": ...}``: copies of the reference weights under the policy's full-model names."""
        with self.swapped_in():
            return {"model": {k: v.detach().clone() for k, v in get_model_state_dict(self.policy.model).items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the reference weights from a checkpoint; the model keeps its own (trained) weights."""
        with self.swapped_in():
            set_model_state_dict(self.policy.model, state["model"])
            self.capture()


class PrecomputedReference:
    """Per-example tables of reference log-probs, filled by :func:`dataset_logps` before training."""

    def __init__(self, tables: dict[str, torch.Tensor]):
        self.tables = tables  # name -> [n, k]

    def lookup(self, name: str, indices: list[int]) -> torch.Tensor:
        """The table rows of examples ``indices`` in batch order: ``[len(indices), k]``."""
        return self.tables[name][torch.tensor(indices, dtype=torch.long)].float()

"""The alignable interface: the only way trainers talk to models, whatever the TP/PP/DP layout.

A trainer hands a model batches and a loss function and gets back plain floats; micro-batching,
gradient accumulation, pipeline schedules, sharded optimizers and collectives stay behind it.

A batch is a dict of CPU tensors whose leading dim is the number of examples:

- ``tokens [N, T]`` long, right-padded; ``labels [N, T]`` long, already shifted (``labels[:, t]`` is the
  token predicted at position ``t``), ``-100`` where there is no loss;
- ``attention_mask [N, T]`` (1 real, 0 padding) for padded rows, or ``document_ids [N, T]`` for packed
  rows; optional ``position_ids [N, T]``;
- anything else a loss needs (reference log-probs ``[N, T]``, pair indices ...), per example along dim 0.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

import torch


@runtime_checkable
class LossFn(Protocol):
    """A loss as a sum over units (loss tokens for SFT, pairs for DPO); the model divides by their global count."""

    # Optional attribute ``rows_per_example`` (default 1): rows that form one example and must stay in one
    # micro-batch, e.g. 2 for a DPO pair (chosen and rejected rows interleaved). Micro-batch sizes count examples.
    # Optional attribute ``logits_at_labels`` (default False): the loss reads logits only where
    # ``labels != -100``. The model may then compute the logits of those positions only and call the loss with
    # ``logits [b, K, V]`` and the micro-batch with every per-token tensor (``[b, T, ...]``) taken at the same K
    # positions in order (a row with fewer labels is filled up with label -100), plus ``logit_positions [b, K]``
    # (where in the row each was), for a no-grad ``fn`` that puts per-token results back in ``[b, T]`` layout.
    # Optional attribute ``examples_per_row`` (default 1): each row holds this many examples (GRPO's samples of
    # one prompt sharing its prefix); a micro-batch then takes ``max(1, micro_batch_size // examples_per_row)`` rows.
    # Optional attribute ``token_level`` (default False): the loss is a sum over tokens that reads only ``tokens``
    # and ``labels``, so the model may lay a padded micro-batch's rows end to end in one row without padding
    # (``document_ids``) when that is cheaper; the loss then gets ``[1, S]`` tensors.

    def num_units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """How many units the loss averages over in ``batch`` (a micro-batch): a 0-d tensor,
        e.g. ``(batch["labels"] != -100).sum()``."""
        ...

    def __call__(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss summed over the micro-batch's units, {name: metric summed over the same units})``.

        ``logits [b, T, V]`` may be a DTensor sharded on the vocab dim (tensor parallelism): use
        ``aligner.parallel.cross_entropy`` / ``token_logprobs`` on it. Both results are 0-d tensors; the
        loss carries the graph, the metrics are detached.
        """
        ...


@runtime_checkable
class Alignable(Protocol):
    """A trainable model behind one parallel layout (implemented by ``aligner.wrappers.PolicyModel``).

    Every returned metric is already reduced over data-parallel ranks and identical on every rank.
    """

    dp_rank: int  # which share of the global batch this process feeds
    dp_size: int  # number of shares: a batch given to train_step holds global_batch_size / dp_size examples

    def set_total_steps(self, total_steps: int) -> None:
        """Length of the run in optimizer steps, which the LR schedule decays over."""
        ...

    def train_step(self, batch: dict[str, torch.Tensor], loss_fn: LossFn) -> dict[str, float]:
        """One optimizer step on this rank's share of the global batch.

        Splits it into micro-batches, accumulates gradients of ``loss_sum / N`` where ``N`` is
        ``loss_fn.num_units`` summed over the whole global batch (so nothing depends on the micro-batch
        size or the number of ranks), clips, steps the optimizer and the LR schedule.

        Returns:
            ``{"loss", "grad_norm" (before clipping), "lr" (of this step), <metric>: sum / N ...}``.
        """
        ...

    def eval_step(self, batch: dict[str, torch.Tensor], loss_fn: LossFn) -> dict[str, float]:
        """As :meth:`train_step` without gradients or updates: ``{"loss", <metric> ...}`` normalised the same way."""
        ...

    def forward(self, batch: dict[str, torch.Tensor], fn: Callable[[torch.Tensor, dict], Any], *,
                micro_batch_size: int | None = None) -> Any:
        """No-grad forward in eval mode; ``fn(logits [b, T, V], micro_batch)`` (cut to the labels' positions when
        ``fn.logits_at_labels``, as for a loss) returns per-example tensors
        (or a dict/tuple of them), concatenated over micro-batches along dim 0: ``[N, ...]``. Micro-batches
        hold ``micro_batch_size`` examples (None: ``trainer.micro_batch_size``)."""
        ...

    def prepare_for_training(self) -> None:
        """Bring optimizer state back to the accelerator (if it was offloaded); train mode."""
        ...

    def finish_training(self) -> None:
        """Offload optimizer state to CPU memory when ``parallel.optimizer_offload`` is set."""
        ...

    def generate(self, prompts: list[list[int]], sampling: Any = None) -> Any:
        """Sample responses to this rank's prompts (token ids) with the rollout engine on the current weights:
        an ``aligner.generation.Rollouts`` for ``SamplingParams`` ``sampling`` (default: the job's)."""
        ...

    def prepare_for_inference(self) -> None:
        """Eval mode; the rollout engine's memory back and its weights refit after training changed them."""
        ...

    def finish_inference(self) -> None:
        """Release the rollout engine's memory; back to train mode."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """``{"model", "optimizer", "scheduler"}`` with layout-independent keys, for DCP checkpoints."""
        ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` returned, possibly saved at another parallel layout."""
        ...

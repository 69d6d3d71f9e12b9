"""A data-parallel sampler whose position is part of the checkpoint, so a resumed run sees the same batches.

Epoch ``e`` visits the examples in a permutation seeded by ``(seed, e)`` (numpy's ``SeedSequence``, so
neighbouring seeds and epochs give unrelated orders). Global batch ``k`` of the epoch is
``perm[k * G : (k + 1) * G]`` for ``G = global_batch_size``, whatever the number of data-parallel ranks;
rank ``r`` of ``D`` takes the CONTIGUOUS slice ``[r * G/D : (r + 1) * G/D]`` of it. So dp=1 and dp=2 train
on the same examples at every step, only split differently.

``drop_last=True`` drops the ``num_examples % G`` examples left at the end of an epoch (they are different
ones each epoch). ``drop_last=False`` completes the last global batch with examples from the start of the
epoch's order, so every step has exactly ``G`` examples and every rank the same number.

The state is two integers, ``{"epoch", "step_in_epoch"}``: the next batch to hand out. A batch counts as
consumed once handed out; after the last batch of an epoch the state moves to the next epoch.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np


class ResumableDistributedSampler:
    """Hands out this data-parallel rank's share of each global batch, epoch after epoch; resumable."""

    def __init__(self, num_examples: int, dp_rank: int, dp_size: int, global_batch_size: int, seed: int,
                 shuffle: bool = True, drop_last: bool = True):
        if global_batch_size % dp_size:
            raise ValueError(f"trainer.global_batch_size={global_batch_size} is not divisible by the {dp_size} "
                             f"data-parallel ranks; make it a multiple of {dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is outside 0..{dp_size - 1}")
        if num_examples <= 0 or (drop_last and num_examples < global_batch_size):
            raise ValueError(f"the dataset has {num_examples} examples (rows, when packed), fewer than one global "
                             f"batch of {global_batch_size}; lower trainer.global_batch_size or add data")
        self.num_examples = num_examples
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.global_batch_size = global_batch_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch = 0
        self.step_in_epoch = 0
        self._order_epoch: int | None = None
        self._order: np.ndarray | None = None

    @property
    def steps_per_epoch(self) -> int:
        """Global batches (optimizer steps) in one epoch."""
        full, rest = divmod(self.num_examples, self.global_batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    @property
    def local_batch_size(self) -> int:
        """Examples this rank gets per step: global_batch_size / dp_size."""
        return self.global_batch_size // self.dp_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The order in which epoch ``epoch`` visits the examples (the same on every rank)."""
        if self._order_epoch != epoch:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
            else:
                self._order = np.arange(self.num_examples)
            self._order_epoch = epoch
        return self._order

    def global_batch(self, epoch: int, step: int) -> list[int]:
        """All example indices of global batch ``step`` of ``epoch`` (every rank's share, in rank order)."""
        order = self.epoch_order(epoch)
        G = self.global_batch_size
        picked = order[step * G:(step + 1) * G]
        if len(picked) < G:  # drop_last=False: complete the last batch from the start of the epoch's order
            picked = np.concatenate([picked, np.resize(order, G - len(picked))])
        return picked.tolist()

    def next_batch(self) -> list[int]:
        """This rank's example indices for the next step; moves the position on (to the next epoch at the end)."""
        B = self.local_batch_size
        indices = self.global_batch(self.epoch, self.step_in_epoch)[self.dp_rank * B:(self.dp_rank + 1) * B]
        self.step_in_epoch += 1
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        return indices

    def __iter__(self) -> Iterator[list[int]]:
        """The remaining batches of the current epoch (all of them at an epoch start)."""
        epoch = self.epoch
        while self.epoch == epoch:
            yield self.next_batch()

    def __len__(self) -> int:
        """Batches left in the current epoch."""
        return self.steps_per_epoch - self.step_in_epoch

    def state_dict(self) -> dict[str, int]:
        """The position (the next batch to hand out), JSON-able for the checkpoint's trainer state."""
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved position."""
        epoch, step = int(state["epoch"]), int(state["step_in_epoch"])
        if not 0 <= step < self.steps_per_epoch:
            raise ValueError(f"sampler state step_in_epoch={step} is outside this dataset's {self.steps_per_epoch} "
                             f"steps per epoch; the data or trainer.global_batch_size changed since the checkpoint")
        self.epoch, self.step_in_epoch = epoch, step

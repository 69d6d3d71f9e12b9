"""Build an SFT dataset from a file: read, validate every record, tokenize, truncate/drop, pack, cache.

    train, val = build_sft_datasets(cfg.data, tokenizer, cfg.trainer.max_seq_len, cfg.sft.packing, cfg.trainer.seed)
    log(train.describe())                        # path: N records -> M examples (k truncated, ...)
    sampler = ResumableDistributedSampler(len(train), dp_rank, dp_size, cfg.trainer.global_batch_size, seed)
    batch = train.batch(sampler.next_batch())    # the batch dict of the issue-3 contract

Every record is validated before anything is tokenized, so a bad record stops the run at start-up with
``file:line: field ...`` and nothing is half-written. A cache hit skips reading the file entirely (the key
covers the file's size and modification time).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aligner.data.cache import (
    cache_key,
    default_data_cache_dir,
    load_cached,
    save_cached,
    source_fingerprint,
    tokenizer_fingerprint,
)
from aligner.data.collate import collate
from aligner.data.errors import DataError
from aligner.data.example import TokenizedExample
from aligner.data.formats import Messages, sft_messages, validate_records
from aligner.data.packing import pack_examples
from aligner.data.readers import Records, read_records
from aligner.data.sft import SFTStats, tokenize_sft
from aligner.models.tokenizer import ChatTokenizer


@dataclass(frozen=True)
class HoldOut:
    """Which part of a seeded random split of a file's records to keep."""

    fraction: float  # share of the records in the held-out (validation) part
    seed: int
    part: str  # "train" (the rest) or "validation" (the held-out share)


@dataclass
class SFTData:
    """Tokenized SFT examples (or packed rows) of one data file, and how to batch them."""

    examples: list[TokenizedExample]
    stats: SFTStats
    pad_id: int
    packed: bool
    source: str  # the data path, for messages
    empty_response: str  # how the records were read, so prompts() finds the same ones
    holdout: HoldOut | None

    def __len__(self) -> int:
        return len(self.examples)

    def describe(self) -> str:
        """One log line: the path and what tokenization did (:meth:`SFTStats.summary`)."""
        return f"{self.source}: {self.stats.summary()}"

    def prompts(self, n: int) -> list[Messages]:
        """The first ``n`` records' conversations up to their first assistant turn (for sample tables).

        Reads the file again (the cache holds tokens, not text); meant for a handful of validation prompts.
        """
        if n <= 0:
            return []
        records, _ = validate_records(read_records(self.source), "sft", self.empty_response)
        if self.holdout is not None:
            records = split_records(records, self.holdout)
        out = []
        for record, _ in records[:n]:
            messages = sft_messages(record)
            first_reply = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
            out.append(messages[:first_reply])
        return out

    def batch(self, indices: list[int], pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
        """The batch dict of ``examples[indices]`` (see :func:`aligner.data.collate.collate`)."""
        return collate([self.examples[i] for i in indices], self.pad_id, pad_to_multiple_of)


def split_records(records: Records, holdout: HoldOut) -> Records:
    """The ``holdout.part`` of a seeded random split; both parts keep the file's order."""
    if not 0.0 < holdout.fraction < 1.0:
        raise DataError(f"data.validation_split={holdout.fraction} must be between 0 and 1 (exclusive)")
    n_val = max(1, round(holdout.fraction * len(records)))
    if n_val >= len(records):
        raise DataError(f"data.validation_split={holdout.fraction} of {len(records)} records leaves no training "
                        f"records; lower it or add data")
    held_out = set(np.random.default_rng([holdout.seed, len(records)]).permutation(len(records))[:n_val].tolist())
    want_held_out = holdout.part == "validation"
    return [r for i, r in enumerate(records) if (i in held_out) == want_held_out]


def build_sft_data(path: str | os.PathLike, tokenizer: ChatTokenizer, max_seq_len: int, overlong: str, packing: bool,
                   cache_dir: str | os.PathLike | None, empty_response: str,
                   holdout: HoldOut | None = None) -> SFTData:
    """Read, validate, tokenize (loss on assistant tokens), apply ``overlong``, optionally pack; cached on disk.

    ``cache_dir`` None means :func:`aligner.data.cache.default_data_cache_dir`. Raises :class:`DataError`
    for a bad file or record, and when no example is left to train on.
    """
    pad_id = tokenizer.pad_id
    if pad_id is None:
        raise DataError(f"the tokenizer of {tokenizer.source} has neither a pad nor an eos token; set pad_token "
                        f"in its tokenizer_config.json")
    if not Path(path).expanduser().exists():
        read_records(path)  # raises the reader's "no such file" error before fingerprinting
    key = cache_key(kind="sft", source=source_fingerprint(path), tokenizer=tokenizer_fingerprint(tokenizer),
                    max_seq_len=max_seq_len, overlong=overlong, packing=packing, empty_response=empty_response,
                    holdout=None if holdout is None else vars(holdout))
    file = Path(cache_dir if cache_dir is not None else default_data_cache_dir()).expanduser()
    file = file / f"sft-{Path(path).name}-{key[:20]}.pt"
    cached = load_cached(file, key)
    if cached is not None:
        examples, stats = cached
        stats = SFTStats(**{k: v for k, v in stats.items() if k != "n_dropped"})
        return SFTData(examples, stats, pad_id, packing, str(path), empty_response, holdout)

    records, n_skipped = validate_records(read_records(path), "sft", empty_response)
    if holdout is not None:
        records = split_records(records, holdout)
    examples, stats = tokenize_sft(records, tokenizer, max_seq_len, overlong)
    stats.n_skipped_empty = n_skipped
    if not examples:
        fix = "add records" if not records else "raise trainer.max_seq_len" + (
            " or set data.overlong=truncate" if overlong == "drop" else "")
        raise DataError(f"{path}: no example left to train on ({stats.summary()}); {fix}")
    if packing:
        examples = pack_examples(examples, max_seq_len, pad_id)
        stats.n_rows = len(examples)
    save_cached(file, key, examples, stats.as_dict())
    return SFTData(examples, stats, pad_id, packing, str(path), empty_response, holdout)


def build_sft_datasets(data: Any, tokenizer: ChatTokenizer, max_seq_len: int, packing: bool,
                       seed: int) -> tuple[SFTData, SFTData | None]:
    """The training and validation datasets of a job's ``data`` section (``aligner.config.DataConfig``).

    Validation comes from ``data.validation``, else from a seeded ``data.validation_split`` of ``data.train``,
    else there is none.
    """
    if not data.train:
        raise DataError("data.train is not set; pass data.train=path/to/train.jsonl (JSON Lines, Parquet or a "
                        "datasets directory)")
    if data.validation and data.validation_split:
        raise DataError(f"both data.validation ({data.validation}) and data.validation_split ({data.validation_split}) "
                        f"are set; keep one: a validation file, or a share of data.train held out")
    common = dict(tokenizer=tokenizer, max_seq_len=max_seq_len, overlong=data.overlong, packing=packing,
                  cache_dir=data.cache_dir, empty_response=data.empty_response)
    if data.validation_split:
        train = build_sft_data(data.train, holdout=HoldOut(data.validation_split, seed, "train"), **common)
        val = build_sft_data(data.train, holdout=HoldOut(data.validation_split, seed, "validation"), **common)
        return train, val
    train = build_sft_data(data.train, **common)
    return train, build_sft_data(data.validation, **common) if data.validation else None

"""Build preference and KTO datasets from files: read, validate every record, tokenize, truncate/drop, cache, batch.

    train, val = build_preference_datasets(cfg.data, tokenizer, cfg.trainer.max_seq_len, cfg.trainer.seed)
    log(train.describe())        # path: N records (...) -> M pairs (k truncated, ...)
    batch = train.batch(indices) # rows interleaved: 2i chosen, 2i+1 rejected of pair indices[i]
    batch = train.shared_prompt_batch(indices)  # one row per pair: [prompt | chosen | rejected]

    train, val = build_kto_datasets(cfg.data, tokenizer, cfg.trainer.max_seq_len, cfg.trainer.seed)
    batch, kl = train.batch(indices), train.kl_batch(indices)

The same rules as :func:`aligner.data.dataset.build_sft_datasets`: validation from ``data.validation``, else
a seeded ``data.validation_split`` of ``data.train``; every record is validated before anything is tokenized;
a cache hit skips reading the file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

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
from aligner.data.collate import collate, collate_shared_prompt
from aligner.data.dataset import HoldOut, split_records
from aligner.data.errors import DataError
from aligner.data.example import TokenizedExample
from aligner.data.formats import Messages, prompt_messages, validate_records
from aligner.data.preference import (
    KTOStats,
    PreferenceStats,
    join_examples,
    tokenize_kto,
    tokenize_preference,
)
from aligner.data.readers import Records, read_records
from aligner.data.sft import fit_to_length
from aligner.models.tokenizer import ChatTokenizer

PAD_TO_MULTIPLE_OF = 8  # batch length granularity: fits sequence parallelism at TP 2/4/8 and tensor-core tiles


def _read_prompts(source: str, fmt: str, empty_response: str, holdout: HoldOut | None,
                  record_index: list[int], n: int) -> list[Messages]:
    # The cache holds tokens, not text: read the file again, as it was read to build the dataset.
    if n <= 0:
        return []
    records, _ = validate_records(read_records(source), fmt, empty_response)
    if holdout is not None:
        records = split_records(records, holdout)
    return [prompt_messages(records[i][0]["prompt"]) for i in record_index[:n]]


@dataclass
class PreferenceData:
    """Tokenized preference pairs of one data file, and how to batch them."""

    rows: list[TokenizedExample]  # 2 per pair: rows[2k] prompt + chosen, rows[2k+1] prompt + rejected
    margins: torch.Tensor | None  # [N] float32: the records' `margin` (0 where absent); None: no record has one
    record_index: list[int]  # position of each pair's record among the file's valid (and split) records
    stats: PreferenceStats
    pad_id: int
    source: str  # the data path, for messages
    empty_response: str  # how the records were read, so prompts() finds the same ones
    holdout: HoldOut | None

    def __len__(self) -> int:
        return len(self.record_index)

    def describe(self) -> str:
        """One log line: the path and what tokenization did (:meth:`PreferenceStats.summary`)."""
        return f"{self.source}: {self.stats.summary()}"

    def prompts(self, n: int) -> list[Messages]:
        """The prompts of the first ``n`` pairs as message lists (for sample tables); reads the file again."""
        return _read_prompts(self.source, "preference", self.empty_response, self.holdout, self.record_index, n)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """The batch of pairs ``indices``, rows interleaved so a slice of whole pairs is a contiguous row range.

        Returns ``tokens``, ``labels`` (shifted, -100 on prompt and padding), ``attention_mask`` (all ``[2n, T]``
        int64, ``T`` the longest row rounded up to a multiple of 8), ``pair_index [2n]`` (the pair of each row),
        ``is_chosen [2n]`` bool, and ``margin [2n]`` float32 when the data has a margin column.
        """
        if not indices:
            raise ValueError("PreferenceData.batch got no indices; a batch needs at least one pair")
        rows = [row for i in indices for row in (self.rows[2 * i], self.rows[2 * i + 1])]
        batch = collate(rows, self.pad_id, PAD_TO_MULTIPLE_OF)
        pairs = torch.tensor(indices, dtype=torch.long)
        batch["pair_index"] = pairs.repeat_interleave(2)  # [2n]
        batch["is_chosen"] = torch.arange(2 * len(indices)) % 2 == 0  # [2n]
        if self.margins is not None:
            batch["margin"] = self.margins[pairs].repeat_interleave(2)  # [2n]
        return batch

    def shared_prompt_batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """The batch of pairs ``indices``, one row each: ``[prompt | chosen | rejected]``
        (:func:`aligner.data.collate.collate_shared_prompt`; ``data.shared_prompt``).

        Returns ``tokens``, ``labels``, ``attention_mask``, ``position_ids``, ``branch_ids`` (``[n, T]``),
        ``pair_index [n]``, and ``margin [n]`` when the data has a margin column.
        """
        if not indices:
            raise ValueError("PreferenceData.shared_prompt_batch got no indices; a batch needs at least one pair")
        batch = collate_shared_prompt([(self.rows[2 * i], self.rows[2 * i + 1]) for i in indices], self.pad_id,
                                      PAD_TO_MULTIPLE_OF)
        pairs = torch.tensor(indices, dtype=torch.long)
        batch["pair_index"] = pairs  # [n]
        if self.margins is not None:
            batch["margin"] = self.margins[pairs]  # [n]
        return batch


def seeded_derangement(n: int, seed: int) -> torch.Tensor:
    """A random permutation of ``range(n)`` with no fixed point (Sattolo's single cycle), seeded by (seed, n)."""
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 elements, got {n}")
    rng = np.random.default_rng([seed, n])
    perm = np.arange(n)
    for i in range(n - 1, 0, -1):
        j = int(rng.integers(0, i))  # j < i: every element moves, and the result is one n-cycle
        perm[i], perm[j] = perm[j], perm[i]
    return torch.from_numpy(perm).long()


@dataclass
class KTOData:
    """Tokenized KTO examples of one data file, their labels, and the fixed mismatched pairs for the KL term.

    KTO's reference point ``kl`` is estimated from rows that join a prompt to a completion written for another
    prompt. TRL builds them by shifting completions within each batch; here ``mismatch`` fixes them once per
    dataset (a seeded derangement: example ``i`` gets the completion of ``mismatch[i] != i``), so the KL row of
    an example is the same at every step and its reference log-probs can be computed once, before training,
    like those of the example rows.
    """

    parts: list[TokenizedExample]  # 2 per example: parts[2i] its prompt, parts[2i+1] its completion
    desirable: torch.Tensor  # [N] bool: the records' labels
    mismatch: torch.Tensor  # [N] long: the example whose completion the KL row of example i uses
    record_index: list[int]  # position of each example's record among the file's valid (and split) records
    stats: KTOStats
    pad_id: int
    max_seq_len: int  # KL rows are cut to it
    source: str
    empty_response: str
    holdout: HoldOut | None

    def __len__(self) -> int:
        return len(self.record_index)

    @property
    def n_desirable(self) -> int:
        """Examples labelled true."""
        return self.stats.n_desirable

    @property
    def n_undesirable(self) -> int:
        """Examples labelled false."""
        return self.stats.n_undesirable

    def describe(self) -> str:
        """One log line: the path and what tokenization did (:meth:`KTOStats.summary`)."""
        return f"{self.source}: {self.stats.summary()}"

    def prompts(self, n: int) -> list[Messages]:
        """The prompts of the first ``n`` examples as message lists (for sample tables); reads the file again."""
        return _read_prompts(self.source, "kto", self.empty_response, self.holdout, self.record_index, n)

    def _collate(self, indices: list[int], rows: list[TokenizedExample]) -> dict[str, torch.Tensor]:
        if not indices:
            raise ValueError("KTOData.batch got no indices; a batch needs at least one example")
        batch = collate(rows, self.pad_id, PAD_TO_MULTIPLE_OF)
        batch["example_index"] = torch.tensor(indices, dtype=torch.long)  # [n]
        batch["desirable"] = self.desirable[batch["example_index"]]  # [n]
        return batch

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """The examples ``indices``: ``tokens``, ``labels`` (shifted), ``attention_mask`` ``[n, T]`` int64
        (``T`` rounded up to a multiple of 8), ``example_index [n]``, ``desirable [n]`` bool."""
        return self._collate(indices, [join_examples(self.parts[2 * i], self.parts[2 * i + 1]) for i in indices])

    def kl_batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """The KL rows of examples ``indices`` (prompt of ``i`` + completion of ``mismatch[i]``, cut to
        ``max_seq_len``), with the same keys as :meth:`batch`; ``example_index`` and ``desirable`` are ``i``'s."""
        rows = []
        for i in indices:
            joined = join_examples(self.parts[2 * i], self.parts[2 * int(self.mismatch[i]) + 1])
            # Always truncated, never dropped: every example needs its KL row. Example i's prompt left room
            # for a completion token (else it was dropped), so the cut row keeps at least one loss token.
            rows.append(fit_to_length(joined, self.max_seq_len, "truncate")[0])
        return self._collate(indices, rows)


def _prepare(path: str | os.PathLike, tokenizer: ChatTokenizer, kind: str, **settings: Any) -> tuple[int, Path, str]:
    """The pad id, the cache file and its key of a dataset to build."""
    pad_id = tokenizer.pad_id
    if pad_id is None:
        raise DataError(f"the tokenizer of {tokenizer.source} has neither a pad nor an eos token; set pad_token "
                        f"in its tokenizer_config.json")
    if not Path(path).expanduser().exists():
        read_records(path)  # raises the reader's "no such file" error before fingerprinting
    holdout = settings.pop("holdout")
    cache_dir = settings.pop("cache_dir")
    key = cache_key(kind=kind, source=source_fingerprint(path), tokenizer=tokenizer_fingerprint(tokenizer),
                    holdout=None if holdout is None else vars(holdout), **settings)
    folder = Path(cache_dir if cache_dir is not None else default_data_cache_dir()).expanduser()
    return pad_id, folder / f"{kind}-{Path(path).name}-{key[:20]}.pt", key


def _read_valid(path: str | os.PathLike, fmt: str, empty_response: str, holdout: HoldOut | None) -> tuple[Records, int]:
    records, n_skipped = validate_records(read_records(path), fmt, empty_response)
    return (split_records(records, holdout) if holdout is not None else records), n_skipped


def _nothing_left(path: str | os.PathLike, what: str, summary: str, records: Records, overlong: str) -> DataError:
    fix = "add records" if not records else "raise trainer.max_seq_len" + (
        " or set data.overlong=truncate" if overlong == "drop" else "")
    return DataError(f"{path}: no {what} left to train on ({summary}); {fix}")


def build_preference_data(path: str | os.PathLike, tokenizer: ChatTokenizer, max_seq_len: int, overlong: str,
                          cache_dir: str | os.PathLike | None, empty_response: str, identical_pairs: str,
                          holdout: HoldOut | None = None) -> PreferenceData:
    """Read, validate, tokenize and apply ``overlong`` to a preference file; cached on disk.

    Raises :class:`DataError` for a bad file or record, an identical pair (``identical_pairs="error"``), and
    when no pair is left to train on.
    """
    pad_id, file, key = _prepare(path, tokenizer, "preference", max_seq_len=max_seq_len, overlong=overlong,
                                 empty_response=empty_response, identical_pairs=identical_pairs, holdout=holdout,
                                 cache_dir=cache_dir)
    cached = load_cached(file, key)
    if cached is not None:
        rows, meta = cached
    else:
        records, n_skipped = _read_valid(path, "preference", empty_response, holdout)
        rows, margins, record_index, stats = tokenize_preference(records, tokenizer, max_seq_len, overlong,
                                                                 identical_pairs)
        stats.n_skipped_empty = n_skipped
        if not rows:
            raise _nothing_left(path, "pair", stats.summary(), records, overlong)
        has_margin = any("margin" in r and r["margin"] is not None for r, _ in records)
        meta = {"stats": stats.as_dict(), "margins": margins if has_margin else None, "record_index": record_index}
        save_cached(file, key, rows, meta)
    stats = PreferenceStats(**{k: v for k, v in meta["stats"].items() if k != "n_dropped"})
    margins = None if meta["margins"] is None else torch.tensor(meta["margins"], dtype=torch.float32)
    return PreferenceData(rows, margins, list(meta["record_index"]), stats, pad_id, str(path), empty_response, holdout)


def build_kto_data(path: str | os.PathLike, tokenizer: ChatTokenizer, max_seq_len: int, overlong: str,
                   cache_dir: str | os.PathLike | None, empty_response: str, seed: int,
                   holdout: HoldOut | None = None) -> KTOData:
    """Read, validate, tokenize and apply ``overlong`` to a KTO file (cached on disk); fix the KL mismatch by ``seed``.

    Raises :class:`DataError` for a bad file or record, and when fewer than 2 examples are left (the KL rows
    need another example's completion).
    """
    pad_id, file, key = _prepare(path, tokenizer, "kto", max_seq_len=max_seq_len, overlong=overlong,
                                 empty_response=empty_response, holdout=holdout, cache_dir=cache_dir)
    cached = load_cached(file, key)
    if cached is not None:
        parts, meta = cached
    else:
        records, n_skipped = _read_valid(path, "kto", empty_response, holdout)
        parts, desirable, record_index, stats = tokenize_kto(records, tokenizer, max_seq_len, overlong)
        stats.n_skipped_empty = n_skipped
        if not parts:
            raise _nothing_left(path, "example", stats.summary(), records, overlong)
        meta = {"stats": stats.as_dict(), "desirable": desirable, "record_index": record_index}
        save_cached(file, key, parts, meta)
    stats = KTOStats(**{k: v for k, v in meta["stats"].items() if k != "n_dropped"})
    if stats.n_examples < 2:
        raise DataError(f"{path}: {stats.summary()}; KTO needs at least 2 examples, because the KL reference point "
                        f"pairs each prompt with another example's completion; add records")
    return KTOData(parts, torch.tensor(meta["desirable"], dtype=torch.bool), seeded_derangement(stats.n_examples, seed),
                   list(meta["record_index"]), stats, pad_id, max_seq_len, str(path), empty_response, holdout)


def _train_and_validation(data: Any, seed: int, build: Callable[..., Any]) -> tuple[Any, Any]:
    # The split rules of build_sft_datasets, for any format.
    if not data.train:
        raise DataError("data.train is not set; pass data.train=path/to/train.jsonl (JSON Lines, Parquet or a "
                        "datasets directory)")
    if data.validation and data.validation_split:
        raise DataError(f"both data.validation ({data.validation}) and data.validation_split ({data.validation_split}) "
                        f"are set; keep one: a validation file, or a share of data.train held out")
    if data.validation_split:
        return (build(data.train, HoldOut(data.validation_split, seed, "train")),
                build(data.train, HoldOut(data.validation_split, seed, "validation")))
    return build(data.train, None), build(data.validation, None) if data.validation else None


def build_preference_datasets(data: Any, tokenizer: ChatTokenizer, max_seq_len: int,
                              seed: int) -> tuple[PreferenceData, PreferenceData | None]:
    """The training and validation preference datasets of a job's ``data`` section (``aligner.config.DataConfig``)."""
    return _train_and_validation(data, seed, lambda path, holdout: build_preference_data(
        path, tokenizer, max_seq_len, data.overlong, data.cache_dir, data.empty_response, data.identical_pairs,
        holdout))


def build_kto_datasets(data: Any, tokenizer: ChatTokenizer, max_seq_len: int,
                       seed: int) -> tuple[KTOData, KTOData | None]:
    """The training and validation KTO datasets of a job's ``data`` section (``aligner.config.DataConfig``)."""
    return _train_and_validation(data, seed, lambda path, holdout: build_kto_data(
        path, tokenizer, max_seq_len, data.overlong, data.cache_dir, data.empty_response, seed, holdout))

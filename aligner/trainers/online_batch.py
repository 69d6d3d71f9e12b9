"""What the online loop trains on: prompt records in, rollouts turned into the batch dict of the interface.

A rollout row is ``prompt + response``, right-padded. Every per-token tensor of the batch is aligned with
``labels`` (already shifted: ``labels[:, t]`` is the token predicted at position ``t``), so response token
``j`` of a row whose prompt has ``P`` tokens sits at column ``P - 1 + j``. Only response tokens carry a label.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from aligner.data import DataError, pad_rows, read_records, validate_records
from aligner.generation.cli import prompt_token_ids, response_text
from aligner.generation.engine import Rollouts, SamplingParams

ROW_MULTIPLE = 8  # rollout rows are padded to a multiple of this: a few shapes rather than one per batch


@dataclass
class PromptData:
    """Validated prompt records and their chat-template token ids (the assistant turn opened)."""

    records: list[dict[str, Any]]
    token_ids: list[list[int]]
    source: str
    n_dropped: int = 0  # prompts too long to leave room for a response
    n_truncated: int = 0  # prompts cut from the left to leave room for a response

    def __len__(self) -> int:
        return len(self.records)

    def describe(self) -> str:
        """One log line: the path and what was dropped or truncated."""
        return (f"{self.source}: {len(self.records)} prompts ({self.n_truncated} truncated from the left, "
                f"{self.n_dropped} dropped as over-long)")

    def columns(self, indices: list[int]) -> dict[str, list[Any]]:
        """The records' extra columns (everything but ``prompt``) as lists aligned with ``indices``;
        a column missing from a record is None there."""
        names = sorted({k for i in indices for k in self.records[i] if k != "prompt"})
        return {name: [self.records[i].get(name) for i in indices] for name in names}


def build_prompt_data(path: str, tokenizer: Any, max_prompt_len: int, overlong: str) -> PromptData:
    """Read and validate ``{"prompt": ..., <extra columns>}`` records; prompts over ``max_prompt_len`` tokens
    are cut from the left (``overlong=truncate``, keeping the end where the question usually is) or dropped."""
    if not path:
        raise DataError("data.train is not set; pass data.train=prompts.jsonl ({\"prompt\": ..., <extra columns>} "
                        "per line)")
    records, _ = validate_records(read_records(path), "prompt")
    data = PromptData([], [], str(path))
    for (record, _), ids in zip(records, prompt_token_ids([r for r, _ in records], tokenizer)):
        if len(ids) > max_prompt_len:
            if overlong == "drop":
                data.n_dropped += 1
                continue
            ids = ids[-max_prompt_len:]
            data.n_truncated += 1
        data.records.append(record)
        data.token_ids.append(ids)
    if not data.records:
        raise DataError(f"{path}: no prompt left ({data.describe()}); raise trainer.max_seq_len or shorten the "
                        f"response length")
    return data


def rollout_batch(rollouts: Rollouts, pad_id: int) -> dict[str, torch.Tensor]:
    """The batch dict of ``rollouts`` (rows in the rollouts' order): ``tokens``, ``attention_mask``, ``labels``
    ``[N, T]`` and ``engine_logps [N, T]`` (the engine's log-prob of each response token, at its label column)."""
    rows = []
    for prompt, response, logps in zip(rollouts.prompt_token_ids, rollouts.response_token_ids, rollouts.logprobs):
        p = len(prompt)
        # Response token j is predicted at column p - 1 + j; the prompt and the last position carry no label.
        rows.append({
            "tokens": torch.tensor(list(prompt) + list(response), dtype=torch.long),
            "labels": torch.tensor([-100] * (p - 1) + list(response) + [-100], dtype=torch.long),
            "engine_logps": torch.tensor([0.0] * (p - 1) + list(logps) + [0.0], dtype=torch.float32),
        })
    return pad_rows(rows, {"tokens": pad_id, "labels": -100, "engine_logps": 0.0}, ROW_MULTIPLE)


def response_texts(rollouts: Rollouts, sampling: SamplingParams, tokenizer: Any, eos_ids: list[int]) -> list[str]:
    """Each response as text, as ``aligner generate`` writes it: without the EOS or stop token that ended it,
    and cut before a stop string."""
    return [response_text(ids, reason, sampling, tokenizer, eos_ids)
            for ids, reason in zip(rollouts.response_token_ids, rollouts.finish_reasons)]


def group_rows(batch: dict[str, torch.Tensor], prompt_lengths: list[int], k: int,
               pad_id: int) -> dict[str, torch.Tensor]:
    """The rollout rows of ``batch`` (prompt-major: rows ``g * k .. g * k + k - 1`` are the ``k`` samples of
    prompt ``g``) as one row per prompt: ``[prompt | sample 1 | ... | sample k]``, the prompt run once.

    As in the shared-prompt preference rows (``aligner.data.collate.collate_shared_prompt``), the shared prefix
    stops one token short of the prompt: its last token starts every branch, since that position predicts the
    branch's first response token. ``branch_ids`` (0 prefix, j for sample j) keep each sample from attending to
    the others and ``position_ids`` repeat the sample's own positions, so every label gets the logits its own
    row gives. Returns ``tokens``, ``labels``, ``attention_mask``, ``position_ids``, ``branch_ids`` and
    ``sequence_ids`` (the sample's row in ``batch`` at each of its labels, -1 elsewhere) ``[N / k, T']``.
    """
    n = batch["tokens"].shape[0]
    if n % k or len(prompt_lengths) != n:
        raise ValueError(f"group_rows: {n} rows and {len(prompt_lengths)} prompt lengths for groups of {k}")
    rows = []
    for g in range(n // k):
        first = g * k
        p = prompt_lengths[first]
        prefix = batch["tokens"][first, :p - 1]
        parts = {"tokens": [prefix], "labels": [torch.full_like(prefix, -100)], "position_ids": [torch.arange(p - 1)],
                 "branch_ids": [torch.zeros_like(prefix)], "sequence_ids": [torch.full_like(prefix, -1)]}
        for j in range(k):
            i = first + j
            if prompt_lengths[i] != p or not torch.equal(batch["tokens"][i, :p - 1], prefix):
                raise ValueError(f"group_rows: row {i} does not share the prompt of row {first}")
            end = int(batch["attention_mask"][i].sum())
            labels = batch["labels"][i, p - 1:end]
            parts["tokens"].append(batch["tokens"][i, p - 1:end])
            parts["labels"].append(labels)
            parts["position_ids"].append(torch.arange(p - 1, end))
            parts["branch_ids"].append(torch.full_like(labels, j + 1))
            parts["sequence_ids"].append(torch.where(labels != -100, i, -1))
        rows.append({key: torch.cat(v) for key, v in parts.items()})
    return pad_rows(rows, {"tokens": pad_id, "labels": -100, "position_ids": 0, "branch_ids": 0, "sequence_ids": -1},
                    ROW_MULTIPLE)


def to_group_layout(values: torch.Tensor, batch: dict[str, torch.Tensor],
                    grouped: dict[str, torch.Tensor]) -> torch.Tensor:
    """A per-token tensor ``[N, T]`` of the rollout rows (its values at their labels) laid out as ``grouped``
    (:func:`group_rows`); 0 where there is no label. Both layouts list the labels in the same order (row by row,
    sample after sample), which is what the boolean-mask assignment relies on."""
    out = values.new_zeros(grouped["labels"].shape)
    out[grouped["labels"] != -100] = values[batch["labels"] != -100]
    return out


def from_group_layout(values: torch.Tensor, batch: dict[str, torch.Tensor],
                      grouped: dict[str, torch.Tensor]) -> torch.Tensor:
    """The inverse of :func:`to_group_layout`: a per-token tensor of the grouped rows back in rollout rows."""
    out = values.new_zeros(batch["labels"].shape)
    out[batch["labels"] != -100] = values[grouped["labels"] != -100]
    return out

"""Tokenize preference pairs (prompt, chosen, rejected) and KTO completions (prompt, completion, label).

A response is rendered as the conversation ``prompt_messages(prompt) + response`` (a string response is one
assistant turn, a message list is appended as is) and split with :func:`aligner.data.sft.assistant_segments`,
so the loss tokens are exactly those SFT would train on: each assistant answer of the response through its
end-of-turn token (``<|im_end|>``). Assistant turns inside a multi-turn *prompt* carry no loss. The prompt
part (everything up to and including the generation prompt ``<|im_start|>assistant\\n``) and the response
part are tokenized separately, so a chosen and a rejected row share their prompt tokens exactly and a KTO
prompt can be joined to another record's completion (the KL rows).

Over-long rows keep their whole prompt and lose the end of the response (``overlong="truncate"``); a row
whose prompt leaves no room for a response token is dropped, as is a pair with either row dropped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch

from aligner.data.errors import DataError, json_type_name
from aligner.data.example import TokenizedExample
from aligner.data.formats import Messages, prompt_messages
from aligner.data.readers import Records
from aligner.data.sft import _tokenize_pieces, assistant_segments, fit_to_length
from aligner.models.tokenizer import ChatTokenizer

IDENTICAL_PAIRS = ("error", "skip")
Pieces = list[tuple[str, bool]]


def _counts(stats: Any) -> dict[str, int]:
    return {**{f.name: getattr(stats, f.name) for f in fields(stats)}, "n_dropped": stats.n_dropped}


def _summary_tail(stats: Any) -> str:
    return (f"{stats.n_truncated} truncated, {stats.n_dropped_overlong} dropped as over-long, "
            f"{stats.n_dropped_no_loss} dropped with no response token left")


@dataclass
class PreferenceStats:
    """Counts of what tokenization did to a preference dataset; the trainer logs them at start-up."""

    n_records: int = 0  # records read and valid
    n_skipped_empty: int = 0  # records with an empty chosen or rejected, skipped (data.empty_response=skip)
    n_skipped_identical: int = 0  # pairs whose chosen and rejected render the same, skipped (data.identical_pairs=skip)
    n_truncated: int = 0  # pairs with a row cut to max_seq_len (data.overlong=truncate)
    n_dropped_overlong: int = 0  # pairs with a row over max_seq_len, dropped (data.overlong=drop)
    n_dropped_no_loss: int = 0  # pairs whose prompt leaves no room for a response token
    n_pairs: int = 0  # pairs kept
    n_tokens: int = 0  # real tokens of both rows of the kept pairs
    n_loss_tokens: int = 0  # of which carry loss

    @property
    def n_dropped(self) -> int:
        """Pairs dropped for any reason (over-long, or no response token left)."""
        return self.n_dropped_overlong + self.n_dropped_no_loss

    def as_dict(self) -> dict[str, int]:
        """The counts as a JSON-able dict (``n_dropped`` included)."""
        return _counts(self)

    def summary(self) -> str:
        """One line for the log: records, skipped, pairs, what was truncated or dropped, tokens."""
        return (f"{self.n_records} records ({self.n_skipped_empty} skipped with an empty response, "
                f"{self.n_skipped_identical} skipped as identical chosen/rejected) -> {self.n_pairs} pairs "
                f"({_summary_tail(self)}); {self.n_tokens} tokens, {self.n_loss_tokens} with loss")


@dataclass
class KTOStats:
    """Counts of what tokenization did to a KTO dataset; the trainer logs them at start-up."""

    n_records: int = 0  # records read and valid
    n_skipped_empty: int = 0  # records with an empty completion, skipped (data.empty_response=skip)
    n_truncated: int = 0  # examples cut to max_seq_len (data.overlong=truncate)
    n_dropped_overlong: int = 0  # examples over max_seq_len, dropped (data.overlong=drop)
    n_dropped_no_loss: int = 0  # examples whose prompt leaves no room for a completion token
    n_examples: int = 0  # examples kept
    n_desirable: int = 0  # kept examples labelled true
    n_undesirable: int = 0  # kept examples labelled false
    n_tokens: int = 0  # real tokens of the kept examples (KL rows not counted)
    n_loss_tokens: int = 0  # of which carry loss

    @property
    def n_dropped(self) -> int:
        """Examples dropped for any reason (over-long, or no completion token left)."""
        return self.n_dropped_overlong + self.n_dropped_no_loss

    def as_dict(self) -> dict[str, int]:
        """The counts as a JSON-able dict (``n_dropped`` included)."""
        return _counts(self)

    def summary(self) -> str:
        """One line for the log: records, skipped, examples (desirable / undesirable), truncated, dropped, tokens."""
        return (f"{self.n_records} records ({self.n_skipped_empty} skipped with an empty completion) -> "
                f"{self.n_examples} examples ({self.n_desirable} desirable, {self.n_undesirable} undesirable; "
                f"{_summary_tail(self)}); {self.n_tokens} tokens, {self.n_loss_tokens} with loss")


def response_messages(response: str | Messages) -> Messages:
    """A response as messages: a string becomes one assistant turn."""
    return [{"role": "assistant", "content": response}] if isinstance(response, str) else list(response)


def check_pair_records(records: Records, fmt: str) -> None:
    """What :func:`aligner.data.formats.validate_records` leaves to this format: a response message list starts
    with the assistant's reply, and an optional ``margin`` (preference) is a number.

    Raises :class:`DataError` naming the first bad record's ``file:line`` and field.
    """
    keys = ("chosen", "rejected") if fmt == "preference" else ("completion",)
    for record, where in records:
        for key in keys:
            response = record[key]
            if isinstance(response, list) and response[0]["role"] != "assistant":
                raise DataError(f"{where}: field '{key}[0].role': the response starts with a '{response[0]['role']}' "
                                f"turn; start it with the assistant's reply and move earlier turns into 'prompt'")
        margin = record.get("margin") if fmt == "preference" else None
        if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))
                                   or not math.isfinite(margin)):
            raise DataError(f"{where}: field 'margin': expected a finite number, got {json_type_name(margin)} "
                            f"{margin!r}; write the margin as a JSON number or leave it out")


def split_prompt_response(prompt: str | Messages, response: str | Messages, tokenizer: ChatTokenizer,
                          where: str) -> tuple[Pieces, Pieces]:
    """The rendered ``prompt + response`` as (prompt pieces, response pieces); only the response's answers have loss.

    The prompt pieces end with the generation prompt, the response pieces start with the first answer.
    """
    prompt_msgs = prompt_messages(prompt)
    pieces = assistant_segments(prompt_msgs + response_messages(response), tokenizer, where)
    # assistant_segments gives (gap, answer) per assistant turn: the first 2k+1 pieces are the prompt's
    # k assistant turns and the gap up to the response's first answer.
    n_prompt = 2 * sum(m["role"] == "assistant" for m in prompt_msgs) + 1
    return [(text, False) for text, _ in pieces[:n_prompt]], pieces[n_prompt:]


def join_examples(prompt: TokenizedExample, response: TokenizedExample) -> TokenizedExample:
    """One row: prompt tokens followed by response tokens."""
    return TokenizedExample(torch.cat([prompt.input_ids, response.input_ids]),
                            torch.cat([prompt.loss_mask, response.loss_mask]))


def _count(stats: Any, status: str) -> None:
    if status != "kept":
        setattr(stats, f"n_{status}", getattr(stats, f"n_{status}") + 1)


def _first_failure(failures: list[str], problem: str, fix: str) -> DataError:
    more = f"\n({len(failures) - 1} more such records: {', '.join(failures[1:6])}" \
           f"{', ...' if len(failures) > 6 else ''})" if len(failures) > 1 else ""
    return DataError(f"{failures[0]}: {problem}; {fix}{more}")


def tokenize_preference(records: Records, tokenizer: ChatTokenizer, max_seq_len: int, overlong: str,
                        identical_pairs: str) -> tuple[list[TokenizedExample], list[float], list[int], PreferenceStats]:
    """Tokenize validated preference records: (rows, margins, record_index, stats).

    ``rows`` holds two rows per kept pair, chosen then rejected (prompt + response, over-long policy applied);
    ``margins`` one float per kept pair (a record's ``margin``, 0 when absent); ``record_index`` the position
    in ``records`` of each kept pair. Identical pairs raise :class:`DataError` (``identical_pairs="error"``)
    or are skipped and counted (``"skip"``).
    """
    if identical_pairs not in IDENTICAL_PAIRS:
        raise ValueError(f"identical_pairs is '{identical_pairs}'; use one of {', '.join(IDENTICAL_PAIRS)}")
    check_pair_records(records, "preference")
    stats = PreferenceStats(n_records=len(records))
    pieces: list[Pieces] = []  # prompt, chosen, rejected pieces of each pair to tokenize
    kept_records: list[int] = []
    identical: list[str] = []
    for i, (record, where) in enumerate(records):
        prompt, chosen = split_prompt_response(record["prompt"], record["chosen"], tokenizer, where)
        prompt_r, rejected = split_prompt_response(record["prompt"], record["rejected"], tokenizer, where)
        if prompt != prompt_r:  # a template whose rendering of the prompt depends on the reply that follows
            raise DataError(f"{where}: the chat template of {tokenizer.source or 'the tokenizer'} renders the prompt "
                            f"differently before chosen and before rejected, so the pair has no common prompt; use a "
                            f"template whose prompt rendering does not depend on the reply")
        if "".join(t for t, _ in chosen) == "".join(t for t, _ in rejected):
            identical.append(where)
            continue
        pieces += [prompt, chosen, rejected]
        kept_records.append(i)
    if identical and identical_pairs == "error":
        raise _first_failure(identical, "chosen and rejected are identical (the same text after the chat template), "
                             "so the pair teaches nothing", "fix or remove the record, or set "
                             "data.identical_pairs=skip to skip such pairs")
    stats.n_skipped_identical = len(identical)
    encoded = _tokenize_pieces(pieces, tokenizer)
    rows: list[TokenizedExample] = []
    margins: list[float] = []
    record_index: list[int] = []
    for k, i in enumerate(kept_records):
        prompt, chosen, rejected = encoded[3 * k:3 * k + 3]
        chosen, status_c = fit_to_length(join_examples(prompt, chosen), max_seq_len, overlong)
        rejected, status_r = fit_to_length(join_examples(prompt, rejected), max_seq_len, overlong)
        statuses = {status_c, status_r}
        # A pair counts once, by its worst row: dropped (no loss left) > dropped (over-long) > truncated.
        status = next(s for s in ("dropped_no_loss", "dropped_overlong", "truncated", "kept") if s in statuses)
        _count(stats, status)
        if chosen is None or rejected is None:
            continue
        rows += [chosen, rejected]
        margins.append(float(records[i][0].get("margin") or 0.0))
        record_index.append(i)
        stats.n_tokens += len(chosen) + len(rejected)
        stats.n_loss_tokens += chosen.num_loss_tokens + rejected.num_loss_tokens
    stats.n_pairs = len(record_index)
    return rows, margins, record_index, stats


def tokenize_kto(records: Records, tokenizer: ChatTokenizer, max_seq_len: int,
                 overlong: str) -> tuple[list[TokenizedExample], list[bool], list[int], KTOStats]:
    """Tokenize validated KTO records: (parts, desirable, record_index, stats).

    ``parts`` holds two pieces per kept example, its prompt then its completion (cut so that together they fit
    ``max_seq_len``), so the trainer can join a prompt to another example's completion; ``desirable`` is each
    kept example's label; ``record_index`` its position in ``records``.
    """
    check_pair_records(records, "kto")
    pieces: list[Pieces] = []
    for record, where in records:
        pieces += split_prompt_response(record["prompt"], record["completion"], tokenizer, where)
    encoded = _tokenize_pieces(pieces, tokenizer)
    stats = KTOStats(n_records=len(records))
    parts: list[TokenizedExample] = []
    desirable: list[bool] = []
    record_index: list[int] = []
    for i, (record, _) in enumerate(records):
        prompt = encoded[2 * i]
        row, status = fit_to_length(join_examples(prompt, encoded[2 * i + 1]), max_seq_len, overlong)
        _count(stats, status)
        if row is None:
            continue
        parts += [prompt, TokenizedExample(row.input_ids[len(prompt):], row.loss_mask[len(prompt):])]
        desirable.append(record["label"])
        record_index.append(i)
        stats.n_tokens += len(row)
        stats.n_loss_tokens += row.num_loss_tokens
    stats.n_examples = len(record_index)
    stats.n_desirable = sum(desirable)
    stats.n_undesirable = stats.n_examples - stats.n_desirable
    return parts, desirable, record_index, stats

"""Tokenize SFT conversations with the model's chat template; the loss falls on assistant tokens only.

For every assistant turn ``i`` the template renders ``messages[:i]`` with the generation prompt (the text
the model sees before it answers) and ``messages[:i+1]`` (with the answer). The characters between the
two are the answer as the template writes it: the content and the end-of-turn token (``<|im_end|>``).
Text after the end-of-turn token (ChatML's newline) is the next turn's preamble and carries no loss.
This needs the template to be *prefix-stable*: each render must be a string prefix of the longer one;
a template that is not (e.g. one that rewrites earlier turns) is reported with the record that shows it.

The text is tokenized piece by piece (prompt pieces and answer pieces separately), so the loss tokens
are exactly the tokens of the answer, never a token that straddles prompt and answer. For ChatML
templates the pieces meet at special tokens and the result equals tokenizing the whole string.
Text after the last assistant turn is dropped: nothing there is trained on.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from aligner.data.errors import DataError
from aligner.data.example import TokenizedExample
from aligner.data.formats import Messages, sft_messages
from aligner.data.readers import Records
from aligner.models.tokenizer import ChatTokenizer

OVERLONG = ("truncate", "drop")


@dataclass
class SFTStats:
    """Counts of what tokenization did to a dataset; the trainer logs them at start-up."""

    n_records: int = 0  # records read and valid
    n_skipped_empty: int = 0  # records with an empty response, skipped (data.empty_response=skip)
    n_truncated: int = 0  # examples cut to max_seq_len tokens (data.overlong=truncate)
    n_dropped_overlong: int = 0  # examples longer than max_seq_len, dropped (data.overlong=drop)
    n_dropped_no_loss: int = 0  # examples with no assistant token left after truncation
    n_examples: int = 0  # examples kept
    n_rows: int = 0  # packed rows (sft.packing) or n_examples
    n_tokens: int = 0  # real tokens kept (padding not counted)
    n_loss_tokens: int = 0  # tokens that carry loss

    @property
    def n_dropped(self) -> int:
        """Examples dropped for any reason (over-long, or no loss token left)."""
        return self.n_dropped_overlong + self.n_dropped_no_loss

    def as_dict(self) -> dict[str, int]:
        """The counts as a JSON-able dict (``n_dropped`` included)."""
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "n_dropped": self.n_dropped}

    def summary(self) -> str:
        """One line for the log: records, examples, what was truncated or dropped, tokens."""
        skipped = f", {self.n_skipped_empty} skipped (empty response)" if self.n_skipped_empty else ""
        return (f"{self.n_records} records{skipped} -> {self.n_examples} examples ({self.n_truncated} truncated, "
                f"{self.n_dropped_overlong} dropped as over-long, {self.n_dropped_no_loss} dropped with no assistant "
                f"token left) in {self.n_rows} rows; {self.n_tokens} tokens, {self.n_loss_tokens} with loss")


def _render(tokenizer: ChatTokenizer, messages: Messages, where: str, add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja2 TemplateError from raise_exception(), or a template bug
        raise DataError(f"{where}: the chat template of {tokenizer.source or 'the tokenizer'} rejects this "
                        f"conversation: {e}; change the record to the shape the template expects") from None


def assistant_segments(messages: Messages, tokenizer: ChatTokenizer, where: str = "") -> list[tuple[str, bool]]:
    """The rendered conversation as ``[(text, is_loss), ...]`` pieces, in order; loss pieces are the answers."""
    full = _render(tokenizer, messages, where, add_generation_prompt=False)
    pieces: list[tuple[str, bool]] = []
    pos = 0  # characters of `full` already assigned to a piece
    eos = tokenizer.eos_token
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], where, add_generation_prompt=True)
        after = _render(tokenizer, messages[:i + 1], where, add_generation_prompt=False)
        if not (after.startswith(before) and full.startswith(after) and len(before) >= pos):
            a, b = (before, after) if not after.startswith(before) else (after, full)
            at = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            raise DataError(
                f"{where}: the chat template of {tokenizer.source or 'the tokenizer'} is not prefix-stable at "
                f"messages[{i}]: the render up to that turn is not the start of the longer render (they differ at "
                f"character {at}: {a[at:at + 30]!r} vs {b[at:at + 30]!r}), so the assistant tokens cannot be located; "
                f"use a template that appends each turn without rewriting earlier ones (or starts the "
                f"conversation with a user or system turn)")
        answer = after[len(before):]
        content_at = answer.find(message["content"])
        end_of_turn = answer.find(eos, max(content_at, 0) + len(message["content"])) if eos else -1
        # The loss covers the answer through its end-of-turn token; what follows belongs to the next turn.
        loss_len = end_of_turn + len(eos) if end_of_turn >= 0 else len(answer.rstrip())
        pieces.append((full[pos:len(before)], False))
        pieces.append((answer[:loss_len], True))
        pos = len(before) + loss_len
    return pieces


def tokenize_conversation(messages: Messages, tokenizer: ChatTokenizer, where: str = "") -> TokenizedExample:
    """Token ids and loss mask of one conversation, not truncated."""
    return _tokenize_pieces([assistant_segments(messages, tokenizer, where)], tokenizer)[0]


def _tokenize_pieces(conversations: list[list[tuple[str, bool]]], tokenizer: ChatTokenizer) -> list[TokenizedExample]:
    texts = [text for pieces in conversations for text, _ in pieces]
    encoded = iter(tokenizer.encode_batch(texts))  # one call: `tokenizers` parallelises the batch
    examples = []
    for pieces in conversations:
        ids: list[int] = []
        mask: list[bool] = []
        for _, is_loss in pieces:
            piece_ids = next(encoded)
            ids += piece_ids
            mask += [is_loss] * len(piece_ids)
        examples.append(TokenizedExample(torch.tensor(ids, dtype=torch.int32), torch.tensor(mask, dtype=torch.bool)))
    return examples


def fit_to_length(example: TokenizedExample, max_seq_len: int, overlong: str) -> tuple[TokenizedExample | None, str]:
    """Apply the over-long policy: return (the example or None, one of "kept", "truncated", "dropped_overlong",
    "dropped_no_loss"). ``truncate`` keeps the first ``max_seq_len`` tokens."""
    if overlong not in OVERLONG:
        raise ValueError(f"overlong is '{overlong}'; use one of {', '.join(OVERLONG)}")
    if len(example) <= max_seq_len:
        return example, "kept"
    if overlong == "drop":
        return None, "dropped_overlong"
    cut = TokenizedExample(example.input_ids[:max_seq_len].clone(), example.loss_mask[:max_seq_len].clone())
    if cut.num_loss_tokens == 0:  # the answer started past the cut: no target left to learn
        return None, "dropped_no_loss"
    return cut, "truncated"


def tokenize_sft(records: Records, tokenizer: ChatTokenizer, max_seq_len: int,
                 overlong: str) -> tuple[list[TokenizedExample], SFTStats]:
    """Tokenize validated SFT records and apply the over-long policy; returns the examples and the counts."""
    conversations = [assistant_segments(sft_messages(record), tokenizer, where) for record, where in records]
    stats = SFTStats(n_records=len(records))
    kept = []
    for example in _tokenize_pieces(conversations, tokenizer):
        example, status = fit_to_length(example, max_seq_len, overlong)
        if status == "truncated":
            stats.n_truncated += 1
        elif status == "dropped_overlong":
            stats.n_dropped_overlong += 1
        elif status == "dropped_no_loss":
            stats.n_dropped_no_loss += 1
        if example is not None:
            kept.append(example)
            stats.n_tokens += len(example)
            stats.n_loss_tokens += example.num_loss_tokens
    stats.n_examples = stats.n_rows = len(kept)
    return kept, stats

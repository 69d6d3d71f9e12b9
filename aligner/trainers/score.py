"""``aligner score``: a reward model's score for each record of a JSON Lines / Parquet file.

    aligner score outputs/rm/hf data.jsonl                  # -> data.scored.jsonl
    aligner score RM_DIR generations.jsonl -o scored.jsonl --batch-size 16

Records are any of (the first shape that fits is used):

- ``{"messages": [..., {"role": "assistant", ...}]}``          -> adds ``score``
- ``{"prompt": str | messages, "response": str}`` (``aligner generate``'s output) -> adds ``score``
- ``{"prompt": ..., "completion": str}``                       -> adds ``score``
- ``{"prompt": ..., "chosen": ..., "rejected": ...}``          -> adds ``score_chosen`` and ``score_rejected``

The conversation goes through the model's chat template as in reward-model training, and the score is the
value head's output at the last token. Every record is checked before the model loads; the output is
written under a temporary name and renamed when complete. Conversations longer than ``--max-seq-len``
keep their last tokens (the reply's end, where the score is read) and are counted in the summary.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch

from aligner.algorithms import last_token_values
from aligner.data import DataError, prompt_messages, read_records
from aligner.data.formats import validate_record

SCORE_FIELDS = {"score", "score_chosen", "score_rejected"}


def conversations_of(record: dict[str, Any], where: str) -> dict[str, list[dict[str, Any]]]:
    """``{output field: conversation}`` of one record; a :class:`DataError` names the record when no shape fits."""
    taken = SCORE_FIELDS & set(record)
    if taken:
        raise DataError(f"{where}: column '{sorted(taken)[0]}' would be overwritten by the score; rename it")
    if "messages" in record:
        validate_record(record, where, "sft")
        if record["messages"][-1]["role"] != "assistant":
            raise DataError(f"{where}: field 'messages': the conversation ends with a '{record['messages'][-1]['role']}'"
                            f" turn; a reward model scores an assistant reply, so end with one")
        return {"score": record["messages"]}
    if "chosen" in record or "rejected" in record:
        validate_record(record, where, "preference")
        return {f"score_{side}": _with_reply(record["prompt"], record[side]) for side in ("chosen", "rejected")}
    for key in ("response", "completion"):
        if key in record:
            validate_record({"prompt": record.get("prompt"), "completion": record[key]} if "prompt" in record
                            else {"completion": record[key]}, where, "sft")
            return {"score": _with_reply(record["prompt"], record[key])}
    have = ", ".join(sorted(record)) or "no keys"
    raise DataError(f"{where}: nothing to score (the record has: {have}); give 'messages', 'prompt' with 'response' "
                    f"or 'completion', or 'prompt' with 'chosen' and 'rejected'")


def _with_reply(prompt: Any, reply: Any) -> list[dict[str, Any]]:
    if isinstance(reply, list):
        return prompt_messages(prompt) + reply
    return prompt_messages(prompt) + [{"role": "assistant", "content": reply}]


@torch.no_grad()
def score_token_ids(model: torch.nn.Module, rows: list[list[int]], pad_id: int, batch_size: int) -> list[float]:
    """The value head's output at the last token of each row (rows sorted by length into right-padded batches)."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    scores = [0.0] * len(rows)
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        part = order[start:start + batch_size]
        width = max(len(rows[i]) for i in part)
        tokens = torch.full((len(part), width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(part), width, dtype=torch.long)
        for j, i in enumerate(part):
            tokens[j, :len(rows[i])] = torch.tensor(rows[i])
            mask[j, :len(rows[i])] = 1
        values = model(tokens.to(device), attention_mask=mask.to(device))  # [b, T, 1]
        for j, value in zip(part, last_token_values(values.float().cpu(), mask).tolist()):
            scores[j] = value
    return scores


def score_file(model_dir: str, data: str, output: str | None = None, batch_size: int = 8,
               max_seq_len: int = 2048, dtype: str = "float32") -> tuple[Path, int, int]:
    """Score every record of ``data`` with the reward model at ``model_dir``; returns (output path, records,
    conversations cut to ``max_seq_len``)."""
    from aligner.models import from_pretrained
    from aligner.models.fetch import resolve_model_path
    from aligner.models.heads import has_value_head
    from aligner.models.tokenizer import load_tokenizer

    records = read_records(data)
    conversations = [conversations_of(record, where) for record, where in records]  # all checked first
    model_dir = str(resolve_model_path(model_dir))
    tokenizer = load_tokenizer(model_dir)
    model = from_pretrained(model_dir, dtype=dtype).eval()
    if not has_value_head(model):
        raise ValueError(f"{model_dir} is not a reward model (no value_head.safetensors beside the weights); "
                         f"train one with `aligner train rm` and export it with `aligner export-hf`")
    keys = [(i, field) for i, conv in enumerate(conversations) for field in conv]
    texts = [tokenizer.apply_chat_template(conversations[i][field]) for i, field in keys]
    rows = tokenizer.encode_batch(texts)
    cut = sum(len(r) > max_seq_len for r in rows)
    rows = [r[-max_seq_len:] for r in rows]
    scores = score_token_ids(model, rows, tokenizer.pad_id, batch_size)
    out = Path(output) if output else Path(data).with_name(Path(data).stem + ".scored.jsonl")
    tmp = out.with_name(out.name + ".tmp")
    scored = [dict(record) for record, _ in records]
    for (i, field), score in zip(keys, scores):
        scored[i][field] = score
    with open(tmp, "w") as f:
        for record in scored:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    return out, len(records), cut


def main(argv: list[str] | None = None) -> int:
    """``aligner score MODEL_DIR DATA [-o OUT] [--batch-size N] [--max-seq-len N] [--dtype D]``."""
    p = argparse.ArgumentParser(prog="aligner score", description="Add a reward model's score to each record of "
                                "a JSON Lines / Parquet file (see aligner/trainers/score.py for the record shapes).")
    p.add_argument("model", help="a reward-model directory (with value_head.safetensors), e.g. an export of "
                   "`aligner train rm`")
    p.add_argument("data", help="records to score (.jsonl, .parquet or a datasets directory)")
    p.add_argument("-o", "--output", default=None, help="file to write (default: DATA.scored.jsonl beside it)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args(argv)
    out, n, cut = score_file(args.model, args.data, args.output, args.batch_size, args.max_seq_len, args.dtype)
    print(f"scored {n} records -> {out}" + (f" ({cut} conversations kept only their last {args.max_seq_len} tokens)"
                                            if cut else ""))
    return 0

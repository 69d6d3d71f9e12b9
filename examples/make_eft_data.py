"""Make judge-training (EFT) SFT data from human-scored responses, for self-rewarding training.

Self-rewarding training asks the policy to act as its own judge. A model that has never seen the judge
prompt grades poorly; the self-rewarding paper first fine-tunes it on examples of the judge task
("evaluation fine-tuning", EFT). This script turns responses that people have scored into such examples:

    python examples/make_eft_data.py --input examples/data/eft_example.jsonl --output eft_train.jsonl
    python examples/train_sft.py data.train=eft_train.jsonl ...   # then fine-tune on it (mixed with IFT data)

Input: JSON Lines, one record per line:

    {"prompt": "...", "response": "...", "score": 4, "judgement": "optional written rationale"}

``prompt`` is a string or a chat message list; ``score`` is a number in ``[--low, --high]``. Output: one SFT
record per input record (the ``messages`` format of docs/data.md), whose user turn is the judge prompt
rendered with ``--template`` (the built-in judge template by default; use the same one the self-rewarding
run will use) and whose assistant turn is the rationale, if any, then the line ``Score: N``. A bad record
stops the script with ``file:line: field '...': what is wrong`` and nothing is written; the output appears
only once it is complete. See docs/judges.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from aligner.data import DataError, validate_record
from aligner.data.errors import json_type_name
from aligner.data.readers import read_jsonl
from aligner.judges import JudgeTemplate, TemplateError, load_template, render_judge_prompt


def format_score(score: float) -> str:
    """``4.0`` -> ``"4"``, ``3.5`` -> ``"3.5"``: what the judge is taught to write after ``Score:``."""
    return str(int(score)) if float(score).is_integer() else repr(float(score))


def eft_record(record: dict[str, Any], where: str, template: JudgeTemplate, low: float, high: float) -> dict[str, Any]:
    """The SFT record (``{"messages": [user, assistant]}``) for one scored response; DataError if it is bad."""
    validate_record(record, where, "prompt")  # prompt: a non-empty string or a valid message list
    if "response" not in record:
        raise DataError(f"{where}: field 'response': missing; every record needs the response that was scored")
    response = record["response"]
    if not isinstance(response, str) or not response.strip():
        got = "an empty string" if isinstance(response, str) else json_type_name(response)
        raise DataError(f"{where}: field 'response': expected a non-empty string, got {got}; write the "
                        f"scored response as a JSON string")
    if "score" not in record:
        raise DataError(f"{where}: field 'score': missing; add the human score, a number in [{low:g}, {high:g}]")
    score = record["score"]
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise DataError(f"{where}: field 'score': expected a number, got {json_type_name(score)} {score!r}; "
                        f"write the score as a JSON number in [{low:g}, {high:g}]")
    if not low <= score <= high:
        raise DataError(f"{where}: field 'score': {score!r} is outside [{low:g}, {high:g}]; fix the score or "
                        f"pass --low/--high for this scale")
    judgement = record.get("judgement")
    if judgement is not None and not isinstance(judgement, str):
        raise DataError(f"{where}: field 'judgement': expected a string, got {json_type_name(judgement)}; write "
                        f"the rationale as a JSON string or leave the field out")
    answer = f"Score: {format_score(score)}"
    if judgement and judgement.strip():
        answer = f"{judgement.strip()}\n{answer}"
    try:
        question = render_judge_prompt(template, record["prompt"], response)
    except TemplateError:
        raise
    except ValueError as e:  # a message list with no user turn
        raise DataError(f"{where}: field 'prompt': {e}") from None
    out = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
    validate_record(out, where, "sft")
    return out


def write_atomically(path: Path, lines: list[str]) -> None:
    """Write ``lines`` to a temporary file beside ``path`` and rename it, so ``path`` is never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(lines)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, type=Path, help="JSONL of {prompt, response, score[, judgement]}")
    parser.add_argument("--output", required=True, type=Path, help="JSONL of SFT {messages} records to write")
    parser.add_argument("--template", default=None, help="judge template (Jinja); default: the built-in one")
    parser.add_argument("--low", type=float, default=0.0, help="lowest valid score")
    parser.add_argument("--high", type=float, default=5.0, help="highest valid score")
    args = parser.parse_args(argv)
    if not args.low < args.high:
        parser.error(f"--low {args.low:g} must be below --high {args.high:g}")
    try:
        template = load_template(args.template, "judge")
        records = read_jsonl(args.input) if args.input.is_file() else None
        if records is None:
            raise DataError(f"{args.input}: no such file; check --input")
        if not records:
            raise DataError(f"{args.input}: no records; write one JSON object per line")
        lines = [json.dumps(eft_record(r, where, template, args.low, args.high), ensure_ascii=False) + "\n"
                 for r, where in records]
    except (DataError, TemplateError) as e:
        print(f"make_eft_data: error: {e}", file=sys.stderr)
        return 1
    write_atomically(args.output, lines)
    print(f"wrote {len(lines)} judge-training records to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

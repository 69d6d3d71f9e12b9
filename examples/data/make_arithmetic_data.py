"""Write the shipped arithmetic prompt sets for online RL (deterministic; no downloads).

    python examples/data/make_arithmetic_data.py   # -> examples/data/arithmetic_{train,val}.jsonl

Each record is ``{"prompt": "Calculate 12 + 7. Reply with only the result.", "solution": "19"}``: addition
of two whole numbers from 0 to 20, or subtraction with a result of 0 or more, verifiable with
``aligner.algorithms.rewards:accuracy`` (the last number of the reply against ``solution``) and
``aligner.algorithms.rewards:format_reward`` (the reply is the number alone, as the prompt asks).

The problems are easy enough that SmolLM2-135M-Instruct solves some of them and hard enough that it
misses most when sampling at temperature 1, which is where GRPO and RLOO can raise the mean reward in
a short CPU run. The base model's measured accuracy is in ``docs/debugging-rl.md``. Train and
validation problems are disjoint (no problem appears in both files).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 20240606
N_TRAIN, N_VAL = 500, 100
MAX_OPERAND = 20
PROMPT = "Calculate {a} {op} {b}. Reply with only the result."
HERE = Path(__file__).resolve().parent


def all_problems() -> list[tuple[int, str, int, int]]:
    """Every ``(a, op, b, answer)``: ``a + b`` and ``a - b`` (answer >= 0) for operands 0..MAX_OPERAND."""
    problems = []
    for a in range(MAX_OPERAND + 1):
        for b in range(MAX_OPERAND + 1):
            problems.append((a, "+", b, a + b))
            if b <= a:
                problems.append((a, "-", b, a - b))
    return problems


def record(problem: tuple[int, str, int, int]) -> dict[str, str]:
    """One prompt record with its ``solution`` column (a string, as a data set read from text would have)."""
    a, op, b, answer = problem
    return {"prompt": PROMPT.format(a=a, op=op, b=b), "solution": str(answer)}


def write_jsonl(path: Path, records: list[dict[str, str]]) -> None:
    """Write one JSON object per line."""
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main() -> None:
    """Shuffle every problem once with ``SEED``; the first ``N_VAL`` are validation, the next ``N_TRAIN`` train."""
    problems = all_problems()
    random.Random(SEED).shuffle(problems)
    if len(problems) < N_TRAIN + N_VAL:
        raise SystemExit(f"only {len(problems)} distinct problems for {N_TRAIN} + {N_VAL} records; raise MAX_OPERAND")
    val, train = problems[:N_VAL], problems[N_VAL:N_VAL + N_TRAIN]
    write_jsonl(HERE / "arithmetic_train.jsonl", [record(p) for p in train])
    write_jsonl(HERE / "arithmetic_val.jsonl", [record(p) for p in val])
    print(f"wrote {len(train)} train and {len(val)} validation prompts to {HERE}")


if __name__ == "__main__":
    main()

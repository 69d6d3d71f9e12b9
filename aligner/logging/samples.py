"""Sample tables: generated responses shown as a plain-text grid and kept as ``samples/step_N.jsonl``.

The grid is for eyes (console, Slurm output files): fixed width, long text wrapped inside its
column, newlines in a prompt kept. The JSONL file is for tools: one object per row, keyed by the
column headers.
"""
from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SAMPLES_DIR = "samples"
MIN_COLUMN_WIDTH = 8


def _column_widths(natural: list[int], available: int) -> list[int]:
    """Share ``available`` characters: narrow columns get what they need, wide ones split the rest."""
    widths = [0] * len(natural)
    left, columns_left = available, len(natural)
    for i in sorted(range(len(natural)), key=lambda i: natural[i]):
        share = left // columns_left
        widths[i] = max(min(natural[i], share), 1)
        left -= widths[i]
        columns_left -= 1
    return widths


def _wrap(text: str, width: int) -> list[str]:
    """Lines of ``text`` at most ``width`` long: its own newlines kept, long words broken."""
    lines = []
    for paragraph in text.expandtabs(4).split("\n"):
        lines.extend(textwrap.wrap(paragraph, width, break_long_words=True, break_on_hyphens=False) or [""])
    return lines


def format_sample_table(rows: Sequence[Sequence[Any]], headers: Sequence[str] = ("prompt", "response"),
                        width: int = 100) -> str:
    """A fixed-width plain-text table of ``rows`` under ``headers``, each cell wrapped in its column.

    ``width`` is the whole table's width including borders (at least ``MIN_COLUMN_WIDTH`` per column
    is kept). Cells are converted with ``str``. Returns the table without a trailing newline.
    """
    cells = []
    for index, row in enumerate(rows):
        if len(row) != len(headers):
            raise ValueError(f"format_sample_table: row {index} has {len(row)} cells but there are "
                             f"{len(headers)} headers {tuple(headers)}; give one value per column")
        cells.append([str(c) for c in row])
    header_cells = [str(h) for h in headers]
    n = len(header_cells)
    available = max(width - (3 * n + 1), MIN_COLUMN_WIDTH * n)  # "| " + " | " between + " |"
    natural = [max(len(line) for text in [header_cells[i]] + [row[i] for row in cells]
                   for line in text.expandtabs(4).split("\n")) for i in range(n)]
    widths = _column_widths(natural, available)

    def rule(char: str) -> str:
        return "+" + "+".join(char * (w + 2) for w in widths) + "+"

    def text_rows(row: list[str]) -> list[str]:
        wrapped = [_wrap(text, w) for text, w in zip(row, widths)]
        height = max(len(lines) for lines in wrapped)
        out = []
        for k in range(height):
            parts = [(lines[k] if k < len(lines) else "").ljust(w) for lines, w in zip(wrapped, widths)]
            out.append("| " + " | ".join(parts) + " |")
        return out

    out = [rule("-"), *text_rows(header_cells), rule("=")]
    for row in cells:
        out.extend(text_rows(row))
        out.append(rule("-"))
    return "\n".join(out)


def save_samples(output_dir: str | os.PathLike, step: int, rows: Sequence[Sequence[Any]],
                 headers: Sequence[str] = ("prompt", "response")) -> Path:
    """Write ``rows`` to ``<output_dir>/samples/step_<step>.jsonl`` (one object per row); returns the path.

    Call on rank 0 only. The file is written under a temporary name and renamed, so it is complete or absent.
    """
    for index, row in enumerate(rows):
        if len(row) != len(headers):
            raise ValueError(f"save_samples: row {index} has {len(row)} cells but there are {len(headers)} "
                             f"headers {tuple(headers)}; give one value per column")
    path = Path(output_dir) / SAMPLES_DIR / f"step_{step}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(dict(zip(headers, row)), ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, path)
    return path

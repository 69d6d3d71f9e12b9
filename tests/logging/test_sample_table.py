"""Sample tables: fixed-width wrapping and alignment against exact strings; samples/step_N.jsonl contents."""
from __future__ import annotations

import json

import pytest

from aligner.logging import format_sample_table, save_samples

ROWS = [
    ("What is 2+2?", "4"),
    ("Name three colours.\nOne per line.", "red\ngreen\nblue"),
    ("x", "supercalifragilisticexpialidocious is a long word that must break"),
]


def test_wraps_long_text_keeps_newlines_and_fits_the_width():
    table = format_sample_table(ROWS, width=50)
    assert table == "\n".join([
        "+---------------------+--------------------------+",
        "| prompt              | response                 |",
        "+=====================+==========================+",
        "| What is 2+2?        | 4                        |",
        "+---------------------+--------------------------+",
        "| Name three colours. | red                      |",
        "| One per line.       | green                    |",
        "|                     | blue                     |",
        "+---------------------+--------------------------+",
        "| x                   | supercalifragilisticexpi |",
        "|                     | alidocious is a long     |",
        "|                     | word that must break     |",
        "+---------------------+--------------------------+",
    ])
    assert {len(line) for line in table.splitlines()} == {50}


def test_two_long_columns_share_the_width_and_short_tables_stay_narrow():
    long_prompt, long_response = "a " * 40, "b " * 40
    lines = format_sample_table([(long_prompt.strip(), long_response.strip())], width=41).splitlines()
    assert lines[0] == "+" + "-" * 19 + "+" + "-" * 19 + "+"  # 41 - 7 border characters = 17 + 17
    assert lines[3] == "| a a a a a a a a a | b b b b b b b b b |"
    assert len(lines) == 3 + 5 + 1  # header block, ceil(40 / 9) = 5 wrapped lines, closing rule

    narrow = format_sample_table([("hi", "there", 0.5)], headers=("prompt", "response", "reward"), width=100)
    assert narrow == "\n".join([
        "+--------+----------+--------+",
        "| prompt | response | reward |",
        "+========+==========+========+",
        "| hi     | there    | 0.5    |",
        "+--------+----------+--------+",
    ])


def test_row_with_wrong_number_of_cells_names_the_row():
    with pytest.raises(ValueError, match=r"row 1 has 1 cells but there are 2 headers"):
        format_sample_table([("a", "b"), ("c",)])


def test_save_samples_writes_one_object_per_row(tmp_path):
    path = save_samples(tmp_path, 40, ROWS)
    assert path == tmp_path / "samples" / "step_40.jsonl"
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert records == [{"prompt": p, "response": r} for p, r in ROWS]
    path = save_samples(tmp_path, 50, [("héllo", "wörld", 0.25)], headers=("prompt", "response", "reward"))
    assert json.loads(path.read_text(encoding="utf-8")) == {"prompt": "héllo", "response": "wörld", "reward": 0.25}
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_40.jsonl", "step_50.jsonl"]

"""Readers: JSON Lines, Parquet and datasets directories give records with their file:line; errors name the spot."""
import json
import re

import pytest

from aligner.data import DataError, read_records

CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
PAIR = {"prompt": "2 + 2?", "completion": "4."}


def test_jsonl_records_carry_their_line_numbers_and_blank_lines_are_skipped(write_jsonl):
    path = write_jsonl("train.jsonl", [CHAT, "", "   ", PAIR])
    records = read_records(path)
    assert records == [(CHAT, f"{path}:1"), (PAIR, f"{path}:4")]


def test_broken_json_names_line_and_column(write_jsonl):
    path = write_jsonl("train.jsonl", [CHAT, CHAT, '{"prompt": "x", "completion": "y"'])
    with pytest.raises(DataError) as e:
        read_records(path)
    assert str(e.value) == (f"{path}:3: invalid JSON: Expecting ',' delimiter (column 34); fix the line or delete it")
    assert "\n" not in str(e.value) and isinstance(e.value, ValueError)


def test_a_json_array_file_gets_a_hint(write_jsonl):
    path = write_jsonl("train.json", ['[{"prompt": "x",', ' "completion": "y"}]'])
    with pytest.raises(DataError, match=r":1: invalid JSON: .*write one JSON object per line"):
        read_records(path)


def test_a_line_that_is_not_an_object(write_jsonl):
    path = write_jsonl("train.jsonl", [CHAT, [1, 2]])
    with pytest.raises(DataError) as e:
        read_records(path)
    assert str(e.value).startswith(f"{path}:2: expected a JSON object per line, got list;")


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(json.dumps(CHAT).encode() + b"\n" + b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=re.escape(f"{path}:2: not valid UTF-8")):
        read_records(path)


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(DataError) as e:
        read_records(tmp_path / "nope.jsonl")
    assert str(e.value).startswith(f"{tmp_path / 'nope.jsonl'}: no such file or directory; check the path")
    (tmp_path / "train.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"train.csv: unknown file type '.csv'; use JSON Lines"):
        read_records(tmp_path / "train.csv")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match=r"folder: a directory, but not one written by datasets' save_to_disk"):
        read_records(tmp_path / "folder")


def test_parquet_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([CHAT, CHAT, {"messages": [{"role": "user", "content": "x"},
                                                                   {"role": "assistant", "content": "y"}]}]), path)
    records = read_records(path)
    assert [where for _, where in records] == [f"{path}:row 0", f"{path}:row 1", f"{path}:row 2"]
    assert records[0][0] == CHAT and records[2][0]["messages"][1] == {"role": "assistant", "content": "y"}
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"broken.parquet: cannot read as Parquet"):
        read_records(tmp_path / "broken.parquet")


def test_datasets_directory_rows(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([PAIR, {"prompt": "3 + 3?", "completion": "6."}]).save_to_disk(tmp_path / "ds")
    records = read_records(tmp_path / "ds")
    assert records == [(PAIR, f"{tmp_path / 'ds'}:row 0"), ({"prompt": "3 + 3?", "completion": "6."},
                                                            f"{tmp_path / 'ds'}:row 1")]
    datasets.DatasetDict({"train": datasets.Dataset.from_list([PAIR])}).save_to_disk(tmp_path / "dd")
    with pytest.raises(DataError, match=r"dd: is a DatasetDict with splits train; point the data path at one split"):
        read_records(tmp_path / "dd")

"""Read dataset records from JSON Lines, Parquet or a ``datasets`` ``save_to_disk`` directory.

Every reader returns ``[(record, where), ...]``: the record as a plain ``dict`` and where it came from,
``"path:line"`` for JSON Lines (1-based line numbers, as editors show them) and ``"path:row N"`` for
Parquet and ``datasets`` directories (0-based, as ``table[N]`` / ``dataset[N]`` index them). The
``where`` strings start every validation error, so a user can open the file at the bad record.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from aligner.data.errors import DataError, json_type_name

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
Records = list[tuple[dict[str, Any], str]]


def read_jsonl(path: str | os.PathLike) -> Records:
    """Records of a JSON Lines file: one JSON object per line; blank lines are skipped."""
    records: Records = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start + 1} of the line); "
                                f"re-save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line.rstrip("\r\n"))  # else an unclosed object is reported at "line 2 column 1"
            except json.JSONDecodeError as e:
                hint = "fix the line or delete it"
                if lineno == 1 and line.lstrip().startswith("["):
                    hint = "the file looks like one JSON array; write one JSON object per line (JSON Lines)"
                raise DataError(f"{where}: invalid JSON: {e.msg} (column {e.colno}); {hint}") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object per line, got {json_type_name(record)}; "
                                f"write each record as {{\"key\": value, ...}}")
            records.append((record, where))
    return records


def read_parquet(path: str | os.PathLike) -> Records:
    """Records of a Parquet file, one per row."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow; run `pip install pyarrow` "
                        f"(or convert the file to JSON Lines)") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types (ArrowInvalid, OSError) for a bad file
        raise DataError(f"{path}: cannot read as Parquet: {e}; check that the file is a complete Parquet "
                        f"file") from None
    return [(row, f"{path}:row {i}") for i, row in enumerate(rows)]


def read_datasets_dir(path: str | os.PathLike) -> Records:
    """Records of a directory written by ``datasets.Dataset.save_to_disk``, one per row."""
    folder = Path(path)
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        raise DataError(f"{path}: is a DatasetDict with splits {', '.join(splits)}; point the data path at one "
                        f"split's directory, e.g. {folder / (splits[0] if splits else 'train')}")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading a `datasets` directory needs the datasets package; run "
                        f"`pip install datasets` (or export the data to JSON Lines)") from None
    try:
        dataset = datasets.load_from_disk(str(folder))
    except Exception as e:  # datasets raises FileNotFoundError / ValueError / arrow errors for bad folders
        raise DataError(f"{path}: cannot load with datasets.load_from_disk: {e}; the directory must be written by "
                        f"Dataset.save_to_disk") from None
    return [(row, f"{path}:row {i}") for i, row in enumerate(dataset.with_format(None).to_list())]


def read_records(path: str | os.PathLike) -> Records:
    """Records of ``path``: ``*.jsonl`` / ``*.json`` (JSON Lines), ``*.parquet``, or a ``datasets`` directory."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{p}: no such file or directory; check the path (data.train / data.validation)")
    if p.is_dir():
        if not any((p / name).is_file() for name in ("state.json", "dataset_info.json", "dataset_dict.json")):
            raise DataError(f"{p}: a directory, but not one written by datasets' save_to_disk (no state.json); "
                            f"point the data path at a .jsonl or .parquet file or a save_to_disk directory")
        return read_datasets_dir(p)
    suffix = p.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return read_jsonl(p)
    if suffix in PARQUET_SUFFIXES:
        return read_parquet(p)
    raise DataError(f"{p}: unknown file type '{suffix}'; use JSON Lines (.jsonl), Parquet (.parquet) or a "
                    f"datasets save_to_disk directory")

"""On-disk cache of tokenized datasets, keyed by everything that changes the tokens.

The key hashes the data source's identity (absolute path, size and modification time of the file, or of
every file of a ``datasets`` directory), the tokenizer (``tokenizer.json`` content, special tokens, chat
template), the settings (max_seq_len, overlong, packing, empty_response, split) and
:data:`CACHE_FORMAT_VERSION`. Editing the file, switching models or changing a setting makes a new key;
old entries are never read again (delete the folder to reclaim the space).

An entry is one ``torch.save`` file of flat tensors, written under a temporary name and renamed into
place, so a crash or a concurrent writer (several ranks) never leaves a partial file under the final
name. A file that cannot be read (truncated disk, other version) is ignored and rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from aligner.data.example import TokenizedExample
from aligner.models.tokenizer import ChatTokenizer

CACHE_FORMAT_VERSION = 1  # bump when tokenization or the file layout changes, so old entries are not reused
log = logging.getLogger(__name__)


def default_data_cache_dir() -> Path:
    """``$ALIGNER_CACHE/data``, else ``~/.cache/aligner/data`` (the model cache's sibling)."""
    from aligner.models.fetch import default_cache_dir

    return default_cache_dir() / "data"


def source_fingerprint(path: str | os.PathLike) -> list[Any]:
    """Absolute path, size and mtime_ns of a file, or of every file under a directory."""
    p = Path(path).expanduser().resolve()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def tokenizer_fingerprint(tokenizer: ChatTokenizer) -> str:
    """sha256 of the tokenizer's vocabulary and rules, special tokens and chat template."""
    digest = hashlib.sha256(tokenizer.tokenizer.to_str().encode())
    digest.update(json.dumps([tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token,
                              tokenizer.pad_token]).encode())
    return digest.hexdigest()


def cache_key(**parts: Any) -> str:
    """sha256 of the JSON of ``parts`` (plus the cache format version)."""
    blob = json.dumps({"version": CACHE_FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def save_cached(file: Path, key: str, examples: list[TokenizedExample], stats: dict[str, int]) -> None:
    """Write ``examples`` and ``stats`` to ``file`` atomically (temporary file, then rename)."""
    packed = bool(examples) and examples[0].document_ids is not None
    empty_i32 = torch.zeros(0, dtype=torch.int32)
    blob = {
        "key": key,
        "stats": stats,
        "lengths": torch.tensor([len(e) for e in examples], dtype=torch.long),
        "input_ids": torch.cat([e.input_ids for e in examples]) if examples else empty_i32,
        "loss_mask": torch.cat([e.loss_mask for e in examples]) if examples else torch.zeros(0, dtype=torch.bool),
        "document_ids": torch.cat([e.document_ids for e in examples]) if packed else None,
    }
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{file.name}.", suffix=".tmp", dir=file.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(blob, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_cached(file: Path, key: str) -> tuple[list[TokenizedExample], dict[str, int]] | None:
    """The examples and stats stored in ``file`` under ``key``; None when absent, unreadable or another key."""
    if not file.is_file():
        return None
    try:
        blob = torch.load(file, map_location="cpu", weights_only=True)
        if blob["key"] != key:
            return None
        lengths = blob["lengths"].tolist()
        if not lengths:
            return [], dict(blob["stats"])
        ids = torch.split(blob["input_ids"], lengths)
        mask = torch.split(blob["loss_mask"], lengths)
        docs = torch.split(blob["document_ids"], lengths) if blob["document_ids"] is not None else [None] * len(ids)
        if not (len(ids) == len(mask) == len(docs) == len(lengths)):
            raise ValueError("inconsistent lengths")
        return [TokenizedExample(i, m, d) for i, m, d in zip(ids, mask, docs)], dict(blob["stats"])
    except Exception as e:  # a truncated or foreign file: rebuild rather than fail the run
        log.warning("ignoring unreadable data cache %s (%s); rebuilding it", file, e)
        return None

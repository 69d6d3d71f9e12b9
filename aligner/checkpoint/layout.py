"""The checkpoint directory: names, the ``latest`` pointer, completeness, resume lookup and pruning.

Layout under ``<output_dir>/checkpoints/``::

    step_N/                 a complete checkpoint (never anything else under this exact name)
    step_N.tmp-<id>/        a save in progress, or left by a save that crashed; deleted by the next save
    step_N.old-<id>/        step_N moved aside while a re-save of step N replaces it
    step_N.deleting-<id>/   a pruned checkpoint being deleted (renamed first, so a half-deleted
                            directory never looks like a checkpoint)
    latest                  text file naming the newest complete checkpoint (``step_N``)

Every state change is a ``rename`` (atomic on POSIX file systems), so a process killed at any
moment leaves ``latest`` naming a complete checkpoint, or naming one that :func:`find_resume_checkpoint`
can recover. Only rank 0 changes the directory; these functions do no collectives.
"""
from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
DCP_METADATA_FILE = ".metadata"  # written by DCP last, once every rank's data is on disk
TRAINER_STATE_FILE = "trainer_state.json"

_COMPLETE = re.compile(r"step_(\d+)")
_MOVED_ASIDE = re.compile(r"step_(\d+)\.old-[\w.-]+")
_GARBAGE = re.compile(r"step_\d+\.(tmp|old|deleting)-[\w.-]+")


def _crash_point(name: str) -> None:
    """Called between the steps of a save; does nothing. Crash-safety tests replace it to kill the process there."""


def checkpoints_dir(output_dir: str | os.PathLike) -> Path:
    """``<output_dir>/checkpoints``."""
    return Path(output_dir).expanduser() / CHECKPOINTS_DIR


def step_dir_name(step: int) -> str:
    """``step_N``: the name of step ``step``'s complete checkpoint."""
    return f"step_{int(step)}"


def unique_suffix() -> str:
    """A fresh ``<pid>-<random>`` tag for temporary names (made on rank 0 and shared)."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path`` holds DCP's ``.metadata`` (written last by DCP) and ``trainer_state.json``."""
    path = Path(path)
    return (path / DCP_METADATA_FILE).is_file() and (path / TRAINER_STATE_FILE).is_file()


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step a checkpoint directory was saved at, from its name (``step_12`` or ``step_12.old-...``)."""
    name = Path(path).name
    m = _COMPLETE.fullmatch(name) or _MOVED_ASIDE.fullmatch(name)
    if m is None:
        raise ValueError(f"{path} is not named like a checkpoint (step_N)")
    return int(m.group(1))


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or file creation inside directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_durably(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` and fsync it (the caller fsyncs the directory)."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_latest(ckpt_root: Path, name: str) -> None:
    """Point ``latest`` at ``name`` atomically: write ``latest.tmp``, then ``os.replace`` it over ``latest``."""
    tmp = ckpt_root / f"{LATEST_FILE}.tmp"
    write_file_durably(tmp, name + "\n")
    os.replace(tmp, ckpt_root / LATEST_FILE)
    fsync_dir(ckpt_root)


def read_latest(ckpt_root: Path) -> str | None:
    """The name ``latest`` holds, or None when there is no (readable) pointer."""
    try:
        name = (ckpt_root / LATEST_FILE).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    # Only a bare directory name is trusted: the pointer never leads outside checkpoints/.
    return name if name and "/" not in name and name not in (".", "..") else None


def _complete_by_step(ckpt_root: Path) -> dict[int, Path]:
    """Step -> complete checkpoint; a ``step_N.old-*`` copy stands in when ``step_N`` itself is missing."""
    found: dict[int, Path] = {}
    aside: dict[int, Path] = {}
    if not ckpt_root.is_dir():
        return found
    for entry in ckpt_root.iterdir():
        if not entry.is_dir() or not is_complete_checkpoint(entry):
            continue
        if m := _COMPLETE.fullmatch(entry.name):
            found[int(m.group(1))] = entry
        elif m := _MOVED_ASIDE.fullmatch(entry.name):
            aside[int(m.group(1))] = entry
    for step, path in aside.items():
        found.setdefault(step, path)  # a crash between the two renames of a re-save left only this copy
    return found


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of ``output_dir``, oldest step first."""
    found = _complete_by_step(checkpoints_dir(output_dir))
    return [found[s] for s in sorted(found)]


def find_resume_checkpoint(output_dir: str | os.PathLike, resume: str) -> Path | None:
    """The checkpoint a run should continue from, by ``trainer.resume``.

    Args:
        output_dir: the run's output directory (checkpoints live in ``<output_dir>/checkpoints``).
        resume: ``never`` -> None; ``auto`` -> the checkpoint ``latest`` names if it is complete, else
            the complete checkpoint with the highest step, else None (a fresh run); any other value is
            the path of a checkpoint directory, which must be complete.

    Read-only, so every rank may call it at start-up.
    """
    if resume == "never":
        return None
    if resume == "auto":
        ckpt_root = checkpoints_dir(output_dir)
        found = _complete_by_step(ckpt_root)
        latest = read_latest(ckpt_root)
        if latest is not None:
            if is_complete_checkpoint(ckpt_root / latest):
                return ckpt_root / latest
            m = _COMPLETE.fullmatch(latest)
            if m and int(m.group(1)) in found:
                return found[int(m.group(1))]  # its re-save was interrupted: the moved-aside copy
        return found[max(found)] if found else None
    if not resume:
        raise ValueError("trainer.resume is empty; use auto, never, or the path of a checkpoint directory")
    path = Path(resume).expanduser()
    if is_complete_checkpoint(path):
        return path
    raise not_a_checkpoint_error(path, "trainer.resume")


def not_a_checkpoint_error(path: Path, context: str) -> FileNotFoundError:
    """An error saying why ``path`` is not a complete checkpoint, listing the checkpoints it contains."""
    if not path.exists():
        what = "does not exist"
    elif not path.is_dir():
        what = "is a file, not a checkpoint directory"
    else:
        missing = [f for f in (DCP_METADATA_FILE, TRAINER_STATE_FILE) if not (path / f).is_file()]
        what = f"is not a complete checkpoint (no {' or '.join(missing)}; an interrupted save?)"
    hint = "pass a checkpoint directory such as OUTPUT_DIR/checkpoints/step_N"
    for root in (path / CHECKPOINTS_DIR, path):  # an output directory or a checkpoints/ directory
        candidates = sorted(_complete_by_step(root).items()) if path.is_dir() else []
        if candidates:
            names = ", ".join(str(p) for _, p in candidates[-3:])
            hint = f"it contains complete checkpoints: {names}; pass one of them"
            break
    return FileNotFoundError(f"{context}: {path} {what}; {hint}")


def _remove_tree(ckpt_root: Path, entry: Path) -> None:
    """Rename ``entry`` to a ``.deleting-`` name, then delete it: a crash mid-delete leaves only garbage."""
    if ".deleting-" not in entry.name:
        doomed = ckpt_root / f"{entry.name.split('.')[0]}.deleting-{unique_suffix()}"
        os.rename(entry, doomed)
        entry = doomed
        _crash_point("pruning")
    shutil.rmtree(entry, ignore_errors=True)


def publish_checkpoint(ckpt_root: Path, tmp_dir: Path, step: int) -> Path:
    """Rename the finished ``tmp_dir`` to ``step_N`` (moving an existing ``step_N`` aside first).

    The old ``step_N`` is deleted only after the new one is in place; :func:`find_resume_checkpoint`
    uses the moved-aside copy if the process dies between the two renames.
    """
    final = ckpt_root / step_dir_name(step)
    moved_aside = None
    if final.exists():
        moved_aside = ckpt_root / f"{final.name}.old-{unique_suffix()}"
        os.rename(final, moved_aside)
        _crash_point("moved_aside")
    os.rename(tmp_dir, final)
    fsync_dir(ckpt_root)
    if moved_aside is not None:
        _remove_tree(ckpt_root, moved_aside)
    return final


def prune_checkpoints(ckpt_root: Path, keep_last: int, keep: Path) -> list[Path]:
    """Delete complete checkpoints beyond the ``keep_last`` highest steps, and leftovers of crashed saves.

    ``keep`` (the checkpoint just written, which ``latest`` names) is never deleted, even when older
    checkpoints have higher steps (a run resumed from an earlier step). ``keep_last=-1`` keeps all.
    Returns the checkpoints deleted.
    """
    # A step_N.old-* whose step_N is gone is the only copy of step N: put it back before judging.
    for entry in sorted(ckpt_root.iterdir()):
        m = _MOVED_ASIDE.fullmatch(entry.name)
        if m and not (ckpt_root / step_dir_name(int(m.group(1)))).exists() and is_complete_checkpoint(entry):
            os.rename(entry, ckpt_root / step_dir_name(int(m.group(1))))
    complete = {s: p for s, p in _complete_by_step(ckpt_root).items() if p.name == step_dir_name(s)}
    deleted = []
    if keep_last != -1:
        others = sorted((s for s, p in complete.items() if p != keep), reverse=True)
        for step in others[max(keep_last - 1, 0):]:
            _remove_tree(ckpt_root, complete[step])
            deleted.append(complete[step])
    for entry in ckpt_root.iterdir():
        if entry.is_dir() and _GARBAGE.fullmatch(entry.name):
            _remove_tree(ckpt_root, entry)
    return deleted

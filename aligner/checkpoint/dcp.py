"""Save and load training checkpoints with ``torch.distributed.checkpoint`` (DCP).

A checkpoint holds the DCP files of every object in ``app_state`` (model, optimizer, scheduler, or
a wrapper such as PolicyModel that returns all three), ``trainer_state.json`` (step, consumed
samples, sampler position: the trainer's JSON-able ``extra``), ``rng/rank_<R>.pt`` for every rank,
``model_config.json`` (the Hugging Face config, so ``aligner export-hf`` needs no source directory)
and the tokenizer files of the model directory.

DCP stores every tensor by its fully qualified name and global shape, and each rank writes only the
shards it owns; loading reads whatever slices the current layout needs, so a checkpoint saved at one
parallel layout (TP=2) loads at another (TP=1, FSDP). Use layout-independent names for the state
(``torch.distributed.checkpoint.state_dict.get_model_state_dict`` / ``get_optimizer_state_dict``).

Works with and without an initialised process group; with one, every rank must call these functions.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException

from aligner.checkpoint import layout
from aligner.checkpoint.layout import (
    TRAINER_STATE_FILE, checkpoints_dir, fsync_dir, is_complete_checkpoint, prune_checkpoints, publish_checkpoint,
    step_dir_name, unique_suffix, write_file_durably, write_latest,
)
from aligner.checkpoint.rng import RNG_DIR, restore_rng_state, save_rng_state
from aligner.models.args import TransformerConfig, config_to_hf
from aligner.models.hf import CONFIG_FILE, GENERATION_CONFIG_FILE, TOKENIZER_FILES

MODEL_CONFIG_FILE = "model_config.json"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)


def _raise_if_any_rank_failed(error: BaseException | None, what: str) -> None:
    """Collective: every rank raises if any rank's ``error`` is set (instead of others hanging in a barrier)."""
    if not _distributed():
        if error is not None:
            raise error
        return
    errors: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
    if failed:
        rank, message = failed[0]
        raise RuntimeError(f"{what} failed on rank {rank}: {message}")


@contextlib.contextmanager
def _single_process_quietly():
    """DCP warns that it "assumes" a single process even when told so with ``no_dist=True``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _describe(error: BaseException) -> str:
    """One line per failing rank for DCP's CheckpointException (which carries full tracebacks)."""
    if isinstance(error, CheckpointException):
        return "; ".join(f"rank {rank}: {type(exc).__name__}: {exc}" for rank, (exc, _) in error.failures.items())
    return f"{type(error).__name__}: {error}"


def _shared_suffix() -> str:
    """One temporary-name tag for all ranks, made on rank 0."""
    suffix = [unique_suffix()]
    if _distributed():
        dist.broadcast_object_list(suffix, src=0)
    return suffix[0]


def _find_model_config(app_state: dict[str, Any]) -> TransformerConfig | None:
    """The ``.config`` of the first app_state object that has a TransformerConfig (a Transformer, PolicyModel)."""
    for obj in app_state.values():
        config = getattr(obj, "config", None)
        if isinstance(config, TransformerConfig):
            return config
    return None


def _write_rank0_files(tmp: Path, trainer_state: dict, model_config: TransformerConfig | None,
                       model_dir: Path | None) -> None:
    """trainer_state.json, model_config.json and the tokenizer files (fsynced)."""
    write_file_durably(tmp / TRAINER_STATE_FILE, json.dumps(trainer_state, indent=2, sort_keys=True))
    if model_config is not None:
        write_file_durably(tmp / MODEL_CONFIG_FILE, json.dumps(config_to_hf(model_config), indent=2))
    elif model_dir is not None and (model_dir / CONFIG_FILE).is_file():
        shutil.copyfile(model_dir / CONFIG_FILE, tmp / MODEL_CONFIG_FILE)
    if model_dir is not None:
        for name in TOKENIZER_FILES + (GENERATION_CONFIG_FILE,):
            if (model_dir / name).is_file():
                shutil.copyfile(model_dir / name, tmp / name)


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    app_state: dict[str, Any],
    extra: dict[str, Any],
    keep_last: int,
    model_dir: str | os.PathLike | None = None,
    *,
    model_config: TransformerConfig | None = None,
) -> Path:
    """Write ``<output_dir>/checkpoints/step_<step>/`` and point ``checkpoints/latest`` at it. Collective.

    Written under ``step_N.tmp-<id>/`` and renamed once every rank's part is on disk; a process killed
    at any moment leaves the previous checkpoint loadable and ``latest`` naming a complete one.

    Args:
        output_dir: the run's output directory.
        step: the optimizer step just completed.
        app_state: name -> object with ``state_dict()`` / ``load_state_dict()`` (nested dicts of
            tensors, DTensors and picklable values), e.g. ``{"model": ..., "optimizer": ...}`` or
            ``{"policy": policy_model}``. The names prefix the tensor keys inside the checkpoint.
        extra: JSON-able trainer state (consumed samples, epoch, sampler position, ...), written to
            ``trainer_state.json`` with ``step`` added; :func:`load_checkpoint` returns it.
        keep_last: how many complete checkpoints to keep (the highest steps, and always this one);
            -1 keeps all.
        model_dir: the model's Hugging Face directory: its tokenizer files (and config.json, unless
            ``model_config`` is known) are copied in, so the checkpoint exports on its own.
        model_config: written as ``model_config.json``; default: the ``.config`` of the first
            ``app_state`` object that has a TransformerConfig.

    Returns:
        The checkpoint directory ``<output_dir>/checkpoints/step_<step>``.
    """
    if keep_last == 0 or keep_last < -1:
        raise ValueError(f"keep_last={keep_last} (trainer.save_top_k): keep at least 1 checkpoint, or -1 for all")
    if "step" in extra and extra["step"] != step:
        raise ValueError(f"extra['step']={extra['step']} disagrees with step={step} in save_checkpoint")
    trainer_state = {**extra, "step": int(step)}
    try:
        json.dumps(trainer_state)
    except (TypeError, ValueError) as e:
        raise TypeError(f"save_checkpoint: the trainer state must be JSON-able ({e}); convert tensors with "
                        f".item()/.tolist() before passing them in extra") from None
    rank, world = _rank_and_world()
    model_config = model_config if model_config is not None else _find_model_config(app_state)
    model_dir = Path(model_dir).expanduser() if model_dir is not None else None

    ckpt_root = checkpoints_dir(output_dir)
    tmp = ckpt_root / f"{step_dir_name(step)}.tmp-{_shared_suffix()}"
    error = None
    if rank == 0:
        try:
            tmp.mkdir(parents=True)
        except Exception as e:  # noqa: BLE001 -- reported to every rank below
            error = e
    _raise_if_any_rank_failed(error, f"creating {tmp}")
    layout._crash_point("tmp_created")

    # All ranks: each writes the shards it owns; rank 0 writes .metadata last, after every rank's data.
    try:
        with _single_process_quietly():
            dcp.save(dict(app_state), storage_writer=FileSystemWriter(tmp, sync_files=True), no_dist=not _distributed())
    except CheckpointException as e:  # raised on every rank; the tmp directory is removed by the next save
        raise RuntimeError(f"saving checkpoint {tmp} failed: {_describe(e)}") from e
    layout._crash_point("dcp_saved")
    error = None
    try:
        save_rng_state(tmp, rank, world)
        if rank == 0:
            _write_rank0_files(tmp, trainer_state, model_config, model_dir)
    except Exception as e:  # noqa: BLE001 -- reported to every rank below
        error = e
    # Doubles as the barrier: nothing is renamed before every rank's files are durable.
    _raise_if_any_rank_failed(error, f"writing {tmp}")
    layout._crash_point("files_written")

    final = ckpt_root / step_dir_name(step)
    error = None
    if rank == 0:
        try:
            # The directory entries every rank created, made durable before the rename publishes them.
            fsync_dir(tmp / RNG_DIR)
            fsync_dir(tmp)
            final = publish_checkpoint(ckpt_root, tmp, step)
            layout._crash_point("renamed")
            write_latest(ckpt_root, final.name)
            layout._crash_point("latest_written")
            prune_checkpoints(ckpt_root, keep_last, keep=final)
        except Exception as e:  # noqa: BLE001 -- reported to every rank below
            error = e
    # Every rank returns only once the checkpoint is published (a caller may exit right after).
    _raise_if_any_rank_failed(error, f"publishing {final}")
    return final


def read_trainer_state(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``trainer_state.json`` of a checkpoint (the ``extra`` it was saved with, plus ``step``)."""
    with open(Path(checkpoint_dir) / TRAINER_STATE_FILE) as f:
        return json.load(f)


def load_checkpoint(path: str | os.PathLike, app_state: dict[str, Any]) -> dict[str, Any]:
    """Load a checkpoint into ``app_state`` in place, at the current layout, and restore this rank's RNG.

    Collective when a process group is initialised. DCP reads from every saved shard the slices that
    this rank's (possibly differently sharded) tensors need. RNG: this rank's saved state when the
    saved run had this rank; otherwise a deterministic reseed (see ``aligner.checkpoint.rng``).

    Args:
        path: a complete checkpoint directory (from :func:`find_resume_checkpoint`).
        app_state: the same names as at save time, with objects built for the current layout.

    Returns:
        The trainer state saved with it (``extra`` plus ``step``).
    """
    path = Path(path).expanduser()
    if not is_complete_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (it needs .metadata and {TRAINER_STATE_FILE}); "
                                f"pass a directory such as OUTPUT_DIR/checkpoints/step_N")
    rank, _ = _rank_and_world()
    try:
        with _single_process_quietly():
            dcp.load(dict(app_state), storage_reader=FileSystemReader(path), no_dist=not _distributed())
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        raise RuntimeError(f"loading checkpoint {path} into {sorted(app_state)} failed: {_describe(e)} (the model "
                           f"shapes, parameter names and optimizer must match the saved run; only the parallel "
                           f"layout may change)") from e
    restore_rng_state(path, rank)
    return read_trainer_state(path)

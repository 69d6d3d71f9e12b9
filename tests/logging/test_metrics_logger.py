"""MetricsLogger: metrics.jsonl lines, resume truncation, rank-0-only writing, TensorBoard and wandb offline."""
from __future__ import annotations

import glob
import importlib.util
import json
import math
import struct

import pytest
import torch

from aligner.config import ConfigError, LoggerConfig, WandbConfig, load_config
from aligner.logging import MetricsLogger


def _cfg(**kw) -> LoggerConfig:
    wandb_mode = kw.pop("wandb_mode", "disabled")
    return LoggerConfig(wandb=WandbConfig(mode=wandb_mode), **kw)


def _log_steps(logger: MetricsLogger, steps) -> None:
    for step in steps:
        logger.log(step, {"train/loss": 10.0 / step, "train/lr": 1e-5 * step,
                          "train/consumed_samples": 8 * step, "train/grad_norm": torch.tensor(0.5 * step)})


def _read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_one_line_per_log_with_step_keys_and_values(tmp_path):
    with MetricsLogger(tmp_path, _cfg(), rank=0) as logger:
        _log_steps(logger, range(1, 6))
        logger.log(5, {"val/loss": 1.25})
    lines = _read_lines(tmp_path / "metrics.jsonl")
    assert len(lines) == 6
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 5]
    assert list(lines[0]) == ["step", "train/loss", "train/lr", "train/consumed_samples", "train/grad_norm"]
    assert lines[3]["train/loss"] == 2.5 and lines[3]["train/lr"] == pytest.approx(4e-5, rel=1e-12)
    assert lines[3]["train/grad_norm"] == 2.0 and isinstance(lines[3]["train/grad_norm"], float)
    assert lines[3]["train/consumed_samples"] == 32 and isinstance(lines[3]["train/consumed_samples"], int)
    assert lines[5] == {"step": 5, "val/loss": 1.25}


def test_each_line_is_on_disk_before_close(tmp_path):
    logger = MetricsLogger(tmp_path, _cfg(), rank=0)
    _log_steps(logger, [1, 2, 3])
    # Not closed: a process killed now has left these three lines behind.
    assert [line["step"] for line in _read_lines(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    logger.close()


def test_nan_is_kept_and_text_is_refused(tmp_path):
    with MetricsLogger(tmp_path, _cfg(), rank=0) as logger:
        logger.log(1, {"train/loss": float("nan")})
        with pytest.raises(TypeError, match="metric 'train/note' is str"):
            logger.log(2, {"train/note": "hello"})
    lines = _read_lines(tmp_path / "metrics.jsonl")
    assert len(lines) == 1 and math.isnan(lines[0]["train/loss"])


def test_truncate_after_keeps_steps_up_to_the_checkpoint(tmp_path):
    with MetricsLogger(tmp_path, _cfg(), rank=0) as logger:
        _log_steps(logger, range(1, 8))
        logger.log(4, {"val/loss": 3.0})
    # A kill mid-write leaves a line without its newline.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "train/lo')
    # The resumed run: reopen, cut back to the checkpoint of step 4, log the steps again.
    with MetricsLogger(tmp_path, _cfg(), rank=0) as logger:
        dropped = logger.truncate_after(4)
        assert dropped == 3  # steps 5, 6, 7 (the partial line was already cut when the file was opened)
        _log_steps(logger, range(5, 7))
    lines = _read_lines(tmp_path / "metrics.jsonl")
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 4, 5, 6]
    assert lines[4] == {"step": 4, "val/loss": 3.0}
    assert lines[-1]["train/loss"] == pytest.approx(10.0 / 6)
    assert not list(tmp_path.glob("metrics.jsonl.tmp-*"))


def test_other_ranks_write_nothing(tmp_path):
    with MetricsLogger(tmp_path / "out", _cfg(tensorboard=True, wandb_mode="offline"), rank=1) as logger:
        _log_steps(logger, range(1, 4))
        assert logger.truncate_after(1) == 0
        logger.log_table(3, "samples", [("a", "b")], ("prompt", "response"))
    assert not (tmp_path / "out").exists()


def test_log_interval_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="logger.log_interval=0"):
        MetricsLogger(tmp_path, _cfg(log_interval=0), rank=0)


@pytest.mark.parametrize("rank", [0, 3])
def test_missing_packages_name_the_key_and_the_extra_on_every_rank(tmp_path, monkeypatch, rank):
    real_find_spec = importlib.util.find_spec
    missing = ("wandb", "tensorboard")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"logger.wandb.mode=offline .*pip install aligner\[wandb\]"):
        MetricsLogger(tmp_path, _cfg(wandb_mode="offline"), rank=rank)
    with pytest.raises(ConfigError, match=r"logger.tensorboard=true .*pip install aligner\[tensorboard\]"):
        MetricsLogger(tmp_path, _cfg(tensorboard=True), rank=rank)
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed")
def test_tensorboard_scalars_every_log_interval_and_purged_on_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_config = load_config("sft", ["trainer.max_steps=8"])
    with MetricsLogger(tmp_path, _cfg(tensorboard=True, log_interval=2), rank=0, run_config=run_config) as logger:
        _log_steps(logger, range(1, 9))
        logger.log(3, {"val/loss": 1.5})  # val/ metrics are forwarded at any step
    with MetricsLogger(tmp_path, _cfg(tensorboard=True, log_interval=2), rank=0) as logger:
        logger.truncate_after(4)
        for step in (5, 6):
            logger.log(step, {"train/loss": 100.0 + step})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "val/loss"} <= set(events.Tags()["scalars"])
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    # Steps 2 and 4 from the first run; its 6 and 8 are purged; 6 again from the resumed run.
    assert [s for s, _ in loss] == [2, 4, 6]
    assert loss[0][1] == pytest.approx(5.0) and loss[1][1] == pytest.approx(2.5) and loss[2][1] == pytest.approx(106.0)
    assert [(e.step, e.value) for e in events.Scalars("val/loss")] == [(3, 1.5)]
    assert events.Scalars("train/grad_norm")[1].value == pytest.approx(2.0)
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(config_text.strip("`\n"))["trainer"]["max_steps"] == 8


def _wandb_history(run_file: str) -> list[dict]:
    """History rows of a .wandb file: a LevelDB-style log of 32 KiB blocks holding protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data = open(run_file, "rb").read()
    assert data[:4] == b":W&B"
    pos, chunk, rows, block = 7, b"", [], 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST piece of a record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb not installed")
def test_wandb_offline_run_holds_the_values(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run_config = {"trainer": {"max_steps": 4}, "optim": {"lr": 1e-5}}
    with MetricsLogger(tmp_path, _cfg(wandb_mode="offline", log_interval=2), rank=0, run_config=run_config) as logger:
        _log_steps(logger, range(1, 4))
        logger.log(3, {"val/loss": 1.5})  # wandb steps must not go back: validation comes before step 4
        _log_steps(logger, [4])
    run_files = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(run_files) == 1
    run_id = (tmp_path / "wandb" / "aligner_run_id").read_text().strip()
    assert run_files[0].endswith(f"run-{run_id}.wandb")
    rows = [r for r in _wandb_history(run_files[0]) if any(k.startswith(("train/", "val/")) for k in r)]
    assert [r["_step"] for r in rows] == [2, 3, 4]
    assert rows[0]["train/loss"] == 5.0 and rows[1] == {**rows[1], "val/loss": 1.5}
    assert rows[2]["train/consumed_samples"] == 32 and rows[2]["train/grad_norm"] == 2.0

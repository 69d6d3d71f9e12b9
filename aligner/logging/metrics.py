"""Training metrics: ``metrics.jsonl`` on every logged step, plus TensorBoard and wandb when configured.

``metrics.jsonl`` is the record a run leaves behind: one JSON object per :meth:`MetricsLogger.log`
call, ``{"step": 12, "train/loss": 2.31, ...}``, flushed line by line so that a killed run keeps
everything it logged. TensorBoard and wandb are views of the same numbers, fed every
``logger.log_interval`` steps (and whenever validation metrics arrive). Only global rank 0 writes;
on every other rank the logger does nothing, so trainers call it unconditionally.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from aligner.config.errors import ConfigError

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
WANDB_RUN_ID_FILE = "wandb/aligner_run_id"  # under output_dir, beside wandb's own run folders


def _as_number(key: str, value: Any) -> float | int:
    """A metric value as a JSON number: ints stay ints (counters), everything else becomes a float."""
    if hasattr(value, "item"):  # 0-d tensors and numpy scalars
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"MetricsLogger.log: metric '{key}' is {type(value).__name__} {value!r}; metrics must be numbers "
            f"(log text with save_samples / format_sample_table)"
        )
    return value if isinstance(value, int) else float(value)


def config_as_dict(run_config: Any) -> dict[str, Any]:
    """The run's config as plain nested dicts (for wandb's config panel and TensorBoard's text tab)."""
    if run_config is None:
        return {}
    if dataclasses.is_dataclass(run_config) and not isinstance(run_config, type):
        return dataclasses.asdict(run_config)
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(run_config):
            return OmegaConf.to_container(run_config, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a core dependency
        pass
    if isinstance(run_config, Mapping):
        return dict(run_config)
    raise TypeError(f"MetricsLogger: run_config is a {type(run_config).__name__}; pass a job config dataclass, "
                    f"a DictConfig or a dict")


def _read_records(path: Path) -> list[tuple[str, dict]]:
    """The complete, parseable lines of a metrics file with their decoded objects."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break  # a line cut short by a kill mid-write
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append((line, record))
    return records


def _drop_partial_last_line(path: Path) -> None:
    """Cut a trailing line that a killed writer left without its newline, so appends start clean."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)


def check_logger_packages(logger_cfg: Any) -> None:
    """Fail on every rank, before training, when a configured sink's package is not installed."""
    if logger_cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "logger.tensorboard=true needs the `tensorboard` package, which is not installed: run "
            "`pip install aligner[tensorboard]` (or set logger.tensorboard=false)"
        )
    if logger_cfg.wandb.mode != "disabled" and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            f"logger.wandb.mode={logger_cfg.wandb.mode} needs the `wandb` package, which is not installed: run "
            f"`pip install aligner[wandb]` (or set logger.wandb.mode=disabled)"
        )


def _open_tensorboard(log_dir: Path, run_config: Any, purge_step: Optional[int] = None):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
    config = config_as_dict(run_config)
    if config and purge_step is None:
        writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)
    return writer


def _wandb_run_id(output_dir: Path) -> str:
    """The wandb run id of this output directory, created once, so a requeued job continues the same run."""
    path = output_dir / WANDB_RUN_ID_FILE
    if path.exists():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


def _open_wandb(output_dir: Path, wandb_cfg: Any, run_config: Any):
    import wandb

    # dir=output_dir keeps offline runs (`wandb sync <output_dir>/wandb/offline-run-*`) with the checkpoints.
    return wandb.init(project=wandb_cfg.project, name=wandb_cfg.name, mode=wandb_cfg.mode, dir=str(output_dir),
                      config=config_as_dict(run_config), id=_wandb_run_id(output_dir), resume="allow")


class MetricsLogger:
    """Writes metrics of a run: ``metrics.jsonl`` always, TensorBoard / wandb as ``logger_cfg`` asks.

    Args:
        output_dir: the run's ``trainer.output_dir``.
        logger_cfg: the job's ``logger`` section (``aligner.config.LoggerConfig``).
        rank: global rank of this process; only rank 0 writes anything.
        run_config: the whole job config, shown in wandb's config panel and TensorBoard's text tab.
    """

    def __init__(self, output_dir: str | os.PathLike, logger_cfg: Any, rank: int, run_config: Any = None) -> None:
        if logger_cfg.log_interval < 1:
            raise ConfigError(f"logger.log_interval={logger_cfg.log_interval} must be >= 1 (steps between "
                              f"console / TensorBoard / wandb points)")
        # On every rank: an error on rank 0 alone would leave the others waiting in a collective.
        check_logger_packages(logger_cfg)
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / METRICS_FILE
        self.log_interval = logger_cfg.log_interval
        self.enabled = rank == 0
        self._run_config = run_config
        self._file = None
        self._tensorboard = None
        self._wandb_run = None
        if not self.enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        _drop_partial_last_line(self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        if logger_cfg.tensorboard:
            self._tensorboard = _open_tensorboard(self.output_dir / TENSORBOARD_DIR, run_config)
        if logger_cfg.wandb.mode != "disabled":
            self._wandb_run = _open_wandb(self.output_dir, logger_cfg.wandb, run_config)

    def should_forward(self, step: int, keys: Sequence[str]) -> bool:
        """Whether TensorBoard / wandb get this call: every ``log_interval`` steps, and always for val/ etc."""
        return step % self.log_interval == 0 or any(not k.startswith("train/") for k in keys)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append ``{"step": step, **metrics}`` to metrics.jsonl and forward to TensorBoard / wandb.

        Keys are full names such as ``train/loss`` or ``val/loss``; values are numbers (0-d tensors are
        accepted). Non-finite values are kept (JSON ``NaN`` / ``Infinity``, which Python reads back).
        """
        if not self.enabled:
            return
        if "step" in metrics:
            raise ValueError("MetricsLogger.log: 'step' is passed as the first argument, not as a metric key")
        values = {key: _as_number(key, value) for key, value in metrics.items()}
        self._file.write(json.dumps({"step": int(step), **values}) + "\n")
        self._file.flush()  # to the OS: a killed process keeps every line it logged
        if not self.should_forward(step, list(values)):
            return
        if self._tensorboard is not None:
            for key, value in values.items():
                if math.isfinite(value):
                    self._tensorboard.add_scalar(key, value, step)
            self._tensorboard.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=int(step))

    def log_table(self, step: int, name: str, rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> None:
        """Forward a table (e.g. generated samples) to TensorBoard's text tab and wandb; metrics.jsonl skips it."""
        if not self.enabled:
            return
        if self._tensorboard is not None:
            lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
            for row in rows:
                cells = [str(c).replace("|", "\\|").replace("\n", "<br>") for c in row]
                lines.append("| " + " | ".join(cells) + " |")
            self._tensorboard.add_text(name, "\n".join(lines), step)
            self._tensorboard.flush()
        if self._wandb_run is not None:
            import wandb

            table = wandb.Table(columns=list(headers), data=[[str(c) for c in row] for row in rows])
            self._wandb_run.log({name: table}, step=int(step))

    def truncate_after(self, step: int) -> int:
        """Drop everything logged after ``step`` (call on resume from the checkpoint of ``step``).

        metrics.jsonl is rewritten atomically keeping the lines with ``"step" <= step``; TensorBoard
        hides its later points (a purge marker). wandb keeps its history: it ignores points at steps
        below the last one it has, until the resumed run passes it. Returns the number of lines dropped.
        """
        if not self.enabled:
            return 0
        self._file.close()
        records = _read_records(self.path)
        kept = [line for line, record in records if record["step"] <= step]
        with open(self.path, encoding="utf-8") as f:
            total_lines = sum(1 for _ in f)
        tmp = self.path.with_name(f"{METRICS_FILE}.tmp-{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)  # a kill now leaves either the old file or the new one, never half
        self._file = open(self.path, "a", encoding="utf-8")
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = _open_tensorboard(self.output_dir / TENSORBOARD_DIR, self._run_config,
                                                  purge_step=step + 1)
        return total_lines - len(kept)

    def close(self) -> None:
        """Flush and close every sink; safe to call twice."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb_run is not None:
            import wandb

            self._wandb_run.finish()
            # finish() can return while wandb's service still buffers the run file; teardown writes it out.
            wandb.teardown()
            self._wandb_run = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

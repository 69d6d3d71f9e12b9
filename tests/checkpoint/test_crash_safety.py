"""SIGKILL at any moment, also in the middle of a save: the previous checkpoint stays loadable.

A subprocess saves checkpoints and is killed (``kill -9``) at each named step of a save, and at
arbitrary moments of a run that saves in a loop; ``find_resume_checkpoint(auto)`` must then return a
complete checkpoint whose content is the step it is named after, and the next save cleans up.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO

from aligner.checkpoint import (
    checkpoint_step, find_resume_checkpoint, is_complete_checkpoint, load_checkpoint, save_checkpoint,
)
from aligner.checkpoint.layout import read_latest

WORKER = Path(__file__).parent / "workers" / "crash_save.py"


class Values:
    def __init__(self, numel: int = 1024):
        self.w = torch.full((numel,), -1.0)

    def state_dict(self):
        return {"w": self.w}

    def load_state_dict(self, state):
        self.w = state["w"]


def start(*args) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, str(WORKER), *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_when(proc: subprocess.Popen, marker: Path, delay: float = 0.0, timeout: float = 120.0) -> None:
    """SIGKILL ``proc`` ``delay`` seconds after ``marker`` appears."""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"worker exited {proc.returncode} before the kill:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("worker never reached the crash point")
        time.sleep(0.02)
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


def load_value(path, numel=1024) -> tuple[float, int]:
    """(the tensor's value, the step in trainer_state.json), checking the tensor is uniform."""
    values = Values(numel)
    extra = load_checkpoint(path, {"values": values})
    assert torch.equal(values.w, torch.full_like(values.w, values.w[0]))  # every byte written
    return float(values.w[0]), extra["step"]


# crash point -> (checkpoint resume=auto must pick, its value, checkpoints kept by the next save of step 4)
POINTS = {
    "tmp_created": ("step_2", 2.0, ["step_2", "step_4"]),
    "dcp_saved": ("step_2", 2.0, ["step_2", "step_4"]),
    "files_written": ("step_2", 2.0, ["step_2", "step_4"]),
    "renamed": ("step_2", 2.0, ["step_3", "step_4"]),  # step_3 complete, but `latest` still names step_2
    "latest_written": ("step_3", 3.0, ["step_3", "step_4"]),
    "pruning": ("step_3", 3.0, ["step_3", "step_4"]),  # killed after renaming step_1 for deletion
    "moved_aside": ("step_2.old-", 2.0, ["step_2", "step_4"]),  # re-save of step 2 with value 20
}


@pytest.mark.parametrize("point", list(POINTS))
def test_kill_at_each_step_of_a_save(tmp_path, point):
    out, marker = tmp_path / "run", tmp_path / "marker"
    kill_when(start("point", out, point, marker, *(["resave"] if point == "moved_aside" else [])), marker)
    want_name, want_value, kept_after = POINTS[point]
    ckpts = out / "checkpoints"
    resume = find_resume_checkpoint(out, "auto")
    assert resume.name.startswith(want_name) and is_complete_checkpoint(resume)
    assert load_value(resume) == (want_value, 2 if want_value == 2.0 else 3)
    latest = read_latest(ckpts)
    if point != "moved_aside":  # the one instant `latest` names a missing directory (docs/checkpoints.md)
        assert is_complete_checkpoint(ckpts / latest)
    # The next save cleans every leftover (tmp, old, deleting) and prunes to keep_last=2.
    save_checkpoint(out, 4, {"values": Values()}, {}, keep_last=2)
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest"] + kept_after
    assert read_latest(ckpts) == "step_4"


def test_kill_at_arbitrary_moments_of_a_saving_run(tmp_path):
    """A run saving in a loop (a save takes ~0.1 s), killed 3 times at different delays and resumed."""
    out = tmp_path / "run"
    previous = 0
    for i, delay in enumerate([0.03, 0.16, 0.29]):
        marker = tmp_path / f"marker{i}"
        kill_when(start("loop", out, marker), marker, delay=delay)
        resume = find_resume_checkpoint(out, "auto")
        assert is_complete_checkpoint(resume)
        assert is_complete_checkpoint(out / "checkpoints" / read_latest(out / "checkpoints"))
        value, step = load_value(resume, numel=1 << 20)
        assert value == step == checkpoint_step(resume)
        assert step > previous  # each run saved at least once and nothing went backwards
        previous = step

"""Subprocess for crash-safety tests: saves checkpoints until the parent kills it with SIGKILL.

``crash_save.py point OUT POINT MARKER [resave]``: saves steps 1 and 2, then saves step 3 (or step 2
again with another value, ``resave``) and stops at the crash point POINT of that save: it writes
MARKER and sleeps until killed.

``crash_save.py loop OUT MARKER``: resumes from OUT (resume=auto) and saves step after step, keeping
2; writes MARKER after its first save. Each checkpoint's tensor holds its step number.
"""
import sys
import time
from pathlib import Path

import torch

from aligner.checkpoint import find_resume_checkpoint, layout, load_checkpoint, save_checkpoint


class Values:
    """One tensor filled with a number (the step that wrote it); big enough that a save takes a while."""

    def __init__(self, value: float, numel: int):
        self.w = torch.full((numel,), float(value))

    def state_dict(self):
        return {"w": self.w}

    def load_state_dict(self, state):
        self.w = state["w"]


def save(out, step, value=None, numel=1024):
    save_checkpoint(out, step, {"values": Values(step if value is None else value, numel)},
                    {"consumed_samples": 4 * step}, keep_last=2)


def stop_at(point: str, marker: Path):
    def crash_point(name):
        if name == point:
            marker.write_text(name)
            time.sleep(600)  # the parent kills the process here
    return crash_point


def main():
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "point":
        point, marker, resave = sys.argv[3], Path(sys.argv[4]), sys.argv[5:] == ["resave"]
        save(out, 1)
        save(out, 2)
        layout._crash_point = stop_at(point, marker)
        if resave:
            save(out, 2, value=20)
        else:
            save(out, 3)
        raise SystemExit(f"crash point {point} was never reached")
    marker = Path(sys.argv[3])
    resume = find_resume_checkpoint(out, "auto")
    step = 0
    if resume is not None:
        step = load_checkpoint(resume, {"values": Values(0, 1 << 20)})["step"]
    for step in range(step + 1, step + 10_000):
        save(out, step, numel=1 << 20)  # 4 MiB of data per checkpoint
        marker.touch()


if __name__ == "__main__":
    main()

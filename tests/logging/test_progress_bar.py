"""ProgressBar: plain lines at the right interval with step/total, loss, LR, tokens/s and ETA; in-place on a TTY."""
from __future__ import annotations

import io

import pytest

from aligner.logging import ProgressBar, format_duration


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_format_duration():
    assert [format_duration(s) for s in (0, 59.4, 75, 3599, 3725, 36000)] == [
        "00:00", "00:59", "01:15", "59:59", "1:02:05", "10:00:00"]


def test_plain_lines_every_interval_with_eta_from_this_run():
    clock, out = FakeClock(), io.StringIO()
    # A resumed run: starts at step 20 of 50, two seconds per step.
    bar = ProgressBar(total_steps=50, initial_step=20, stream=out, interval=5, clock=clock)
    for step in range(21, 31):
        clock.now += 2.0
        bar.update(step, loss=3.0 - 0.1 * (step - 20), lr=2e-5, tokens_per_sec=12345.6)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines == [
        "step 25/50 | loss 2.5000 | lr 2.00e-05 | 12,346 tok/s | elapsed 00:10 | ETA 00:50",
        "step 30/50 | loss 2.0000 | lr 2.00e-05 | 12,346 tok/s | elapsed 00:20 | ETA 00:40",
    ]
    assert "\r" not in out.getvalue()


def test_plain_mode_prints_the_last_step_and_the_stopped_step():
    clock, out = FakeClock(), io.StringIO()
    bar = ProgressBar(total_steps=7, stream=out, interval=5, clock=clock)
    for step in range(1, 8):
        clock.now += 1.0
        bar.update(step, loss=1.0)
    bar.close()
    assert [line.split(" | ")[0] for line in out.getvalue().splitlines()] == ["step 5/7", "step 7/7"]
    assert out.getvalue().splitlines()[-1].endswith("ETA 00:00")

    out = io.StringIO()
    bar = ProgressBar(total_steps=100, stream=out, interval=5, clock=clock)
    for step in range(1, 8):  # stopped at step 7 (a preemption signal)
        clock.now += 1.0
        bar.update(step, loss=1.0)
    bar.close()
    assert [line.split(" | ")[0] for line in out.getvalue().splitlines()] == ["step 5/100", "step 7/100"]


def test_eta_unknown_before_the_first_step_and_fields_optional():
    clock = FakeClock()
    bar = ProgressBar(total_steps=10, initial_step=3, stream=io.StringIO(), clock=clock)
    assert bar.eta_seconds(3) is None
    assert bar.render(3) == "step 3/10 | elapsed 00:00 | ETA ?"
    clock.now += 30.0
    assert bar.eta_seconds(6) == pytest.approx(40.0)  # 10 s per step, 4 steps left


def test_terminal_redraws_one_line_in_place():
    clock, out = FakeClock(), FakeTerminal()
    bar = ProgressBar(total_steps=4, stream=out, interval=100, clock=clock)
    for step in (1, 2):
        clock.now += 1.5
        bar.update(step, loss=10.0 / step, lr=1e-4, tokens_per_sec=900.0)
    bar.write("val/loss 1.23")
    clock.now += 1.5
    bar.update(3, loss=1.0)
    bar.close()
    text = out.getvalue()
    first = "\r[#####---------------]  25% step 1/4 | loss 10.0000 | lr 1.00e-04 | 900 tok/s | elapsed 00:02 | ETA 00:04"
    second = "\r[##########----------]  50% step 2/4 | loss 5.0000 | lr 1.00e-04 | 900 tok/s | elapsed 00:03 | ETA 00:03"
    # Step 2's line is one character shorter than step 1's: a space covers the leftover character.
    assert text.startswith(first + second + " ")
    assert text.count("\n") == 2  # the written message and the final newline: progress never adds lines
    # write() blanks the bar, prints the message on its own line and redraws the bar under it.
    assert second + " \r" + " " * (len(second) - 1) + "\rval/loss 1.23\n" + second + "\r" in text
    third = "[###############-----]  75% step 3/4 | loss 1.0000 | elapsed 00:04 | ETA 00:02"
    assert text.endswith("\r" + third + " " * (len(second) - 1 - len(third)) + "\n")


def test_disabled_bar_writes_nothing():
    out = FakeTerminal()
    bar = ProgressBar(total_steps=4, enabled=False, stream=out)
    bar.update(1, loss=1.0)
    bar.write("hello")
    bar.close()
    assert out.getvalue() == ""

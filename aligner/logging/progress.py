"""The training progress line: step/total, loss, LR, tokens/s and ETA.

On a terminal it is one line redrawn in place with a bar; anywhere else (CI logs, Slurm output
files) it prints a plain line every ``interval`` steps, since carriage returns would pile up there.
The ETA comes from the steps done in this process, so a resumed run does not count the time the
earlier run spent.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Optional, TextIO

BAR_WIDTH = 20


def format_duration(seconds: float) -> str:
    """``75`` -> ``01:15``; ``3725`` -> ``1:02:05``."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class ProgressBar:
    """Progress of a training run on rank 0's stderr.

    Args:
        total_steps: the step the run ends at (``trainer.max_steps``, or the steps of all epochs).
        initial_step: the step the run starts from (the resumed checkpoint's step, else 0).
        enabled: false on ranks other than 0 or with ``logger.progress_bar=false``; then nothing is written.
        stream: where to write (default ``sys.stderr``).
        interval: steps between plain lines when ``stream`` is not a terminal (``logger.log_interval``).
        clock: seconds as a float; the tests pass a fake one.
    """

    def __init__(self, total_steps: int, initial_step: int = 0, enabled: bool = True,
                 stream: Optional[TextIO] = None, interval: int = 10,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if interval < 1:
            raise ValueError(f"ProgressBar: interval={interval} must be >= 1 (logger.log_interval)")
        self.total_steps = total_steps
        self.initial_step = initial_step
        self.enabled = enabled
        self.stream = sys.stderr if stream is None else stream
        self.interval = interval
        self._clock = clock
        self._start = clock()
        isatty = getattr(self.stream, "isatty", None)
        self.is_tty = bool(isatty and isatty())
        self._line = ""  # the last rendered line
        self._drawn_width = 0  # characters of the line now on screen (TTY mode)
        self._last_step: Optional[int] = None
        self._last_printed_step: Optional[int] = None

    def eta_seconds(self, step: int) -> Optional[float]:
        """Seconds left at the rate of the steps done since this bar started; None before the first."""
        done = step - self.initial_step
        if done <= 0:
            return None
        return (self._clock() - self._start) / done * max(self.total_steps - step, 0)

    def render(self, step: int, loss: Optional[float] = None, lr: Optional[float] = None,
               tokens_per_sec: Optional[float] = None) -> str:
        """The text of one progress line (without the bar, which only the terminal mode draws)."""
        parts = [f"step {step}/{self.total_steps}"]
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        if lr is not None:
            parts.append(f"lr {lr:.2e}")
        if tokens_per_sec is not None:
            parts.append(f"{tokens_per_sec:,.0f} tok/s")
        parts.append(f"elapsed {format_duration(self._clock() - self._start)}")
        eta = self.eta_seconds(step)
        parts.append(f"ETA {format_duration(eta) if eta is not None else '?'}")
        return " | ".join(parts)

    def _bar(self, step: int) -> str:
        fraction = min(max(step / self.total_steps, 0.0), 1.0) if self.total_steps > 0 else 0.0
        filled = int(fraction * BAR_WIDTH)
        return f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {fraction * 100:3.0f}%"

    def _draw(self) -> None:
        # Pad with spaces over a longer previous line instead of relying on terminal escape codes.
        pad = " " * max(self._drawn_width - len(self._line), 0)
        self.stream.write("\r" + self._line + pad)
        self.stream.flush()
        self._drawn_width = len(self._line)

    def update(self, step: int, loss: Optional[float] = None, lr: Optional[float] = None,
               tokens_per_sec: Optional[float] = None) -> None:
        """Report that ``step`` is done, with its loss, learning rate and throughput."""
        if not self.enabled:
            return
        self._last_step = step
        if self.is_tty:
            self._line = f"{self._bar(step)} {self.render(step, loss, lr, tokens_per_sec)}"
            self._draw()
            return
        self._line = self.render(step, loss, lr, tokens_per_sec)
        if step % self.interval == 0 or step == self.total_steps:
            self._print_line()

    def _print_line(self) -> None:
        self.stream.write(self._line + "\n")
        self.stream.flush()
        self._last_printed_step = self._last_step

    def write(self, text: str) -> None:
        """Print ``text`` (a validation result, a sample table) without breaking the progress line."""
        if not self.enabled:
            return
        if self.is_tty and self._drawn_width:
            self.stream.write("\r" + " " * self._drawn_width + "\r")
            self._drawn_width = 0
        self.stream.write(text.rstrip("\n") + "\n")
        if self.is_tty and self._line:
            self._draw()
        self.stream.flush()

    def close(self) -> None:
        """End the progress line; in plain mode, print the last step if its line was not printed yet."""
        if not self.enabled or self._last_step is None:
            return
        if self.is_tty:
            if self._drawn_width:
                self.stream.write("\n")
                self.stream.flush()
                self._drawn_width = 0
        elif self._last_printed_step != self._last_step:
            self._print_line()
        self._last_step = None

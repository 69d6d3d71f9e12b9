"""Step-by-step lockstep of two training libraries, each in its own process, for speed benchmarks.

A benchmark script runs itself twice as a child (``--child aligner`` / ``--child trl``); the driver here
starts both, lets them load side by side, then lets them take optimizer steps in turns: a child blocks
before each step until the driver says go and reports when the step is over, and the driver alternates
which library goes first. Step ``i`` of one library therefore runs next to step ``i`` of the other (the
same examples), so load from other processes on the machine hits both alike, and their thread pools and
allocator caches never share a process.

Child protocol (lines on stdout that start with :data:`PROTOCOL`; anything else is ignored):
``ready`` once loaded; then per step: wait for go, run the step, ``step``; then wait for go once more (so
that winding down never overlaps the other library's last step) and send ``result``: a dict with the
per-step lists ``seconds``, ``tokens`` (real, non-pad tokens processed) and ``loss_tokens``, plus
``mean_loss``, ``setup`` (one line on the library's optimizer and precision) and ``peak_rss_gib``.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIBRARIES = ("aligner", "trl")
PROTOCOL = "@@ "
PER_STEP = ("seconds", "tokens", "loss_tokens")


class Turn:
    """The child's side of the lockstep: wait for the driver's go before a step, report after it."""

    @staticmethod
    def send(kind: str, payload=None) -> None:
        print(PROTOCOL + kind + " " + json.dumps(payload), flush=True)

    @staticmethod
    def wait() -> None:
        if sys.stdin.readline().strip() != "go":
            raise SystemExit("the benchmark driver went away")


def peak_rss_gib() -> float:
    """This process's peak resident memory (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's processor string elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def environment(threads: int) -> str:
    """One line on what the numbers were measured with: library versions, CPU, threads, load."""
    import torch
    import transformers
    import trl

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; "
            f"{cpu_name()}, {os.cpu_count()} cores, {threads} torch threads per library; load average {load}; "
            f"{time.strftime('%Y-%m-%d %H:%M')}")


class Child:
    """A library's process running ``script --child library child_args``, driven over its stdin/stdout."""

    def __init__(self, script: str, library: str, child_args: list[str]):
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
                   TQDM_DISABLE="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        self.library = library
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, script, "--child", library, *child_args], cwd=REPO, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True)

    def expect(self, kind: str):
        """Read stdout up to the next protocol line, which must be ``kind``; returns its payload."""
        for line in self.proc.stdout:
            if line.startswith(PROTOCOL):
                got, payload = line[len(PROTOCOL):].split(" ", 1)
                if got != kind:
                    raise RuntimeError(f"the {self.library} child sent '{got}' where the driver expected '{kind}'; "
                                       f"its step hooks no longer match the library's training loop")
                return json.loads(payload)
        self.proc.wait()
        self.stderr.seek(0)
        sys.stderr.write(self.stderr.read()[-8000:])
        raise SystemExit(f"the {self.library} child exited with status {self.proc.returncode} before sending "
                         f"'{kind}'; its stderr is above")

    def go(self, expect: str):
        """Let the child go on; returns the payload of the ``expect`` line it answers with."""
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return self.expect(expect)


def paired_run(script: str, child_args: list[str], warmup: int, steps: int, repeat: int) -> dict[str, dict]:
    """Both libraries side by side, taking turns step by step; each one's result with the warm-up steps cut
    from its per-step lists."""
    children = {lib: Child(script, lib, child_args) for lib in LIBRARIES}
    try:
        for c in children.values():
            c.expect("ready")  # no step starts while the other library is still loading
        for step in range(warmup + steps):
            for lib in (LIBRARIES if (step + repeat) % 2 == 0 else LIBRARIES[::-1]):
                children[lib].go("step")
        results = {lib: c.go("result") for lib, c in children.items()}
        for c in children.values():
            c.proc.wait()
    finally:
        for c in children.values():
            if c.proc.poll() is None:
                c.proc.kill()
    for lib, r in results.items():
        for key in PER_STEP:
            if len(r[key]) != warmup + steps:
                raise RuntimeError(f"the {lib} child reported {len(r[key])} values of '{key}' for {warmup + steps} "
                                   f"steps")
            r[key] = r[key][warmup:]
    return results


def compare(runs: list[dict[str, dict]], title: str) -> dict[str, float]:
    """Print the table of ``runs`` (results of :func:`paired_run`) under ``title``; returns the ratios.

    Per library: median s/step and tokens/s over every timed step of every run, the best step's tokens/s
    (the least disturbed one), peak RSS and mean real tokens per step. The ratio is the median over steps of
    (aligner tokens/s) / (TRL tokens/s) of the same step of the same run; also given: their range, and best
    step against best step.
    """
    def pooled(lib: str, key: str) -> list[float]:
        return [x for run in runs for x in run[lib][key]]

    rate = {lib: [n / t for n, t in zip(pooled(lib, "tokens"), pooled(lib, "seconds"))] for lib in LIBRARIES}
    paired = [a / t for a, t in zip(rate["aligner"], rate["trl"])]
    print(f"\n{title}")
    print(f"{'library':<10}{'s/step':>9}{'tokens/s':>10}{'best tok/s':>12}{'peak GiB':>10}{'tokens/step':>13}")
    for lib in LIBRARIES:
        print(f"{lib:<10}{statistics.median(pooled(lib, 'seconds')):>9.3f}{statistics.median(rate[lib]):>10.1f}"
              f"{max(rate[lib]):>12.1f}{max(run[lib]['peak_rss_gib'] for run in runs):>10.2f}"
              f"{statistics.fmean(pooled(lib, 'tokens')):>13.1f}")
    print("(s/step, tokens/s: medians over the timed steps; best tok/s: the least disturbed step)")
    for lib in LIBRARIES:
        print(f"  {lib}: {runs[0][lib]['setup']}")
    a, t = runs[0]["aligner"], runs[0]["trl"]
    same = a["loss_tokens"] == t["loss_tokens"]
    print(f"same examples at every step (loss tokens {a['loss_tokens']}): "
          f"{'yes' if same else 'NO, TRL has ' + str(t['loss_tokens'])}")
    ratios = {"median": statistics.median(paired), "best": max(rate["aligner"]) / max(rate["trl"])}
    print(f"tokens/s aligner / TRL: {ratios['median']:.2f}x, the median of {len(paired)} paired steps "
          f"(range {min(paired):.2f}-{max(paired):.2f}); best step against best step {ratios['best']:.2f}x\n",
          flush=True)
    return ratios


def run_benchmark(script: str, child_args: list[str], warmup: int, steps: int, repeats: int,
                  label: str) -> list[dict[str, dict]]:
    """``repeats`` paired runs, each printed as it ends (s/step of every timed step, peak RSS, mean loss)."""
    runs = []
    for repeat in range(repeats):
        runs.append(paired_run(script, child_args, warmup, steps, repeat))
        for lib, r in runs[-1].items():
            print(f"  [{label} run {repeat + 1}] {lib:<8} s/step " + " ".join(f"{t:.2f}" for t in r["seconds"])
                  + f"  peak {r['peak_rss_gib']:.2f} GiB  mean loss {r['mean_loss']:.4f}", flush=True)
    return runs

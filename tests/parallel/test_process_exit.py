"""end_process / exit_after: the exit status, the flushed output, no interpreter shutdown once gloo ran."""
import subprocess
import sys
from pathlib import Path

import pytest

from aligner.parallel.process_exit import exit_code
from helpers import run_torchrun, subprocess_env

WORKER = Path(__file__).resolve().parent / "workers" / "end_process.py"


def run_worker(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(WORKER), *args], env=subprocess_env(), capture_output=True,
                          text=True, timeout=120)


def test_exit_code_reads_like_sys_exit(capsys):
    assert [exit_code(None), exit_code(0), exit_code(3)] == [0, 0, 3]
    assert exit_code("no such file") == 1
    assert capsys.readouterr().err == "no such file\n"


def test_without_a_process_group_it_is_sys_exit():
    proc = run_worker("plain", "5")
    assert proc.returncode == 5
    assert proc.stdout == "before endatexit ran\n"  # interpreter shutdown ran the atexit handler


@pytest.mark.parametrize("code", [0, 3])
def test_a_gloo_world_of_one_ends_with_the_status_and_skips_shutdown(code):
    proc = run_worker("gloo", str(code))
    assert proc.returncode == code, proc.stderr
    assert proc.stdout == "rank 0 of 1: sum 1"  # flushed, and no "atexit ran": os._exit skipped shutdown
    assert "terminate called" not in proc.stderr


def test_exit_after_turns_a_system_exit_message_into_status_1():
    proc = run_worker("system_exit")
    assert proc.returncode == 1
    assert proc.stdout == "rank 0 of 1: sum 1"
    assert proc.stderr.strip().endswith("the run stopped: bad input")


@pytest.mark.slow
def test_two_ranks_meet_at_the_barrier_and_exit_0():
    out = run_torchrun(WORKER, 2, "gloo", "0")
    assert "rank 0 of 2: sum 3" in out and "rank 1 of 2: sum 3" in out
    assert "atexit ran" not in out

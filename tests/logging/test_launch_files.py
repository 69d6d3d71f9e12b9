"""Launch files: the Slurm scripts run against fake srun/scancel/scontrol, and the Dockerfile's instructions.

Neither Slurm nor a Docker daemon exists here, so the sbatch scripts are executed with stand-ins
that record how they were called: that checks the command lines, the USR1 -> save -> requeue
path and the rendezvous arguments. The Dockerfile's requirements step is run as written with a
fake pip, which checks that torch is never installed over the image's build.
"""
from __future__ import annotations

import ast
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SLURM_DIR = REPO / "examples" / "slurm"
SCRIPTS = sorted(SLURM_DIR.glob("*.sbatch"))


def _sbatch_options(script: Path) -> list[str]:
    return [line.split(None, 1)[1].strip() for line in script.read_text().splitlines() if line.startswith("#SBATCH ")]


def test_slurm_scripts_exist_and_parse():
    assert [s.name for s in SCRIPTS] == ["train_sft.sbatch", "train_sft_torchrun.sbatch"]
    for script in SCRIPTS:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script.name}: {result.stderr}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.name)
def test_sbatch_header_asks_for_the_signal_and_requeue(script):
    options = _sbatch_options(script)
    signal_opts = [o for o in options if o.startswith("--signal=")]
    assert len(signal_opts) == 1 and re.fullmatch(r"--signal=B:USR1@(\d+)", signal_opts[0])
    assert int(signal_opts[0].split("@")[1]) >= 60  # time to finish a step and write a checkpoint
    assert "--requeue" in options and "--open-mode=append" in options
    assert any(o.startswith("--nodes=") for o in options)
    tasks = {"train_sft.sbatch": "8", "train_sft_torchrun.sbatch": "1"}[script.name]
    assert f"--ntasks-per-node={tasks}" in options


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda s: s.name)
def test_entry_points_the_scripts_call_exist(script):
    text = script.read_text()
    called = set(re.findall(r"\b(examples/[\w/]+\.py)\b", text))
    assert called == {"examples/train_sft.py"}
    for path in called:
        assert (REPO / path).is_file(), f"{script.name} runs {path}, which does not exist"
    sourced = re.findall(r"^source (\S+)$", text, flags=re.M)
    assert sourced == ["examples/slurm/requeue.sh"]
    assert subprocess.run(["bash", "-n", str(REPO / sourced[0])]).returncode == 0


FAKES = {
    # srun: record its options, then run the command as node 1 of 2 would.
    "srun": """#!/bin/bash
opts=()
while [[ $# -gt 0 && $1 == -* ]]; do opts+=("$1"); shift; done
printf '%s\\n' "${opts[@]}" > "$FAKE_LOG/srun.options"
export SLURM_NODEID=1 SLURM_PROCID=8 SLURM_LOCALID=0
exec "$@"
""",
    # The training process (python or torchrun): record argv, run until the stop file appears.
    "python": """#!/bin/bash
echo $$ > "$FAKE_LOG/$(basename "$0").pid"
printf '%s\\n' "$@" > "$FAKE_LOG/$(basename "$0").argv"
while [[ ! -e $FAKE_LOG/stop ]]; do sleep 0.05; done
exit "${FAKE_RC:-0}"
""",
    # scancel --signal=USR1: stands for "the training processes saved and exit".
    "scancel": """#!/bin/bash
printf '%s\\n' "$@" > "$FAKE_LOG/scancel.argv"
touch "$FAKE_LOG/stop"
""",
    "scontrol": """#!/bin/bash
if [[ $1 == show && $2 == hostnames ]]; then printf 'gpu001\\ngpu002\\n'; exit 0; fi
printf '%s\\n' "$@" >> "$FAKE_LOG/scontrol.argv"
""",
}


def _run_script(script: Path, tmp_path: Path, *, send_usr1: bool, rc: int = 0, extra_env=None, before_usr1=None,
                args=("data.train=train.jsonl", "trainer.max_steps=5")):
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name, body in {**FAKES, "torchrun": FAKES["python"]}.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log), "FAKE_RC": str(rc),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "aligner-sft", "SLURM_SUBMIT_DIR": str(REPO),
           "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[001-002]", "SLURM_NTASKS_PER_NODE": "8",
           "OUTPUT_DIR": str(tmp_path / "out"), **(extra_env or {})}
    proc = subprocess.Popen(["bash", str(script), *args], env=env,
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    entry = "torchrun" if "torchrun" in script.name else "python"
    deadline = time.monotonic() + 20
    while not (log / f"{entry}.argv").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    if before_usr1 is not None:
        before_usr1(log)
    if send_usr1:
        proc.send_signal(signal.SIGUSR1)  # what Slurm does 120 s before the time limit
    else:
        (log / "stop").touch()  # training ends on its own
    output = proc.communicate(timeout=20)[0]
    read = lambda name: (log / name).read_text().splitlines() if (log / name).exists() else None  # noqa: E731
    return proc.returncode, output, read


def test_srun_script_usr1_saves_then_requeues(tmp_path):
    rc, output, read = _run_script(SLURM_DIR / "train_sft.sbatch", tmp_path, send_usr1=True)
    assert rc == 0, output
    assert read("python.argv") == ["examples/train_sft.py", "data.train=train.jsonl", "trainer.max_steps=5",
                                   f"trainer.output_dir={tmp_path / 'out'}", "trainer.resume=auto"]
    assert read("scancel.argv") == ["--signal=USR1", "4242"]
    assert read("scontrol.argv") == ["requeue", "4242"]
    assert "--kill-on-bad-exit=1" in read("srun.options")
    assert not any(o.startswith("--container-image") for o in read("srun.options"))


def test_srun_script_finishing_normally_does_not_requeue(tmp_path):
    rc, output, read = _run_script(SLURM_DIR / "train_sft.sbatch", tmp_path, send_usr1=False,
                                   extra_env={"CONTAINER_IMAGE": "/images/aligner.sqsh"},
                                   args=("my_sft.yaml", "trainer.resume=never", "trainer.output_dir=/runs/a"))
    assert rc == 0, output
    # A CONFIG.yaml stays first; the user's output_dir and resume are not overridden.
    assert read("python.argv") == ["examples/train_sft.py", "my_sft.yaml", "trainer.resume=never",
                                   "trainer.output_dir=/runs/a"]
    assert read("scancel.argv") is None and read("scontrol.argv") is None
    assert "--container-image=/images/aligner.sqsh" in read("srun.options")
    assert f"--container-workdir={REPO}" in read("srun.options")


def test_srun_script_failed_save_is_not_requeued(tmp_path):
    rc, output, read = _run_script(SLURM_DIR / "train_sft.sbatch", tmp_path, send_usr1=True, rc=3)
    assert rc == 3, output
    assert read("scancel.argv") == ["--signal=USR1", "4242"] and read("scontrol.argv") is None


def test_torchrun_script_rendezvous_from_slurm_variables(tmp_path):
    def usr1_to_torchrun(log: Path) -> None:
        # Slurm's step signal reaches torchrun too; the wrapper makes it ignore USR1 instead of dying.
        os.kill(int((log / "torchrun.pid").read_text()), signal.SIGUSR1)
        time.sleep(0.2)

    rc, output, read = _run_script(SLURM_DIR / "train_sft_torchrun.sbatch", tmp_path, send_usr1=True,
                                   before_usr1=usr1_to_torchrun)
    assert rc == 0, output
    assert read("torchrun.argv") == [
        "--nnodes=2", "--nproc_per_node=8", "--node_rank=1", "--rdzv_backend=static",
        f"--rdzv_endpoint=gpu001:{20000 + 4242}", "examples/train_sft.py", "data.train=train.jsonl",
        "trainer.max_steps=5", f"trainer.output_dir={tmp_path / 'out'}", "trainer.resume=auto"]
    assert "--ntasks-per-node=1" in read("srun.options")
    assert read("scontrol.argv") == ["requeue", "4242"]


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions, current = [], ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1]  # Docker drops the backslash-newline and joins the lines
            continue
        keyword, _, args = current.strip().partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        current = ""
    assert not current, "Dockerfile ends inside a continued line"
    return instructions


def _setup_requirements() -> tuple[list[str], dict[str, list[str]]]:
    call = next(node for node in ast.walk(ast.parse((REPO / "setup.py").read_text()))
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup")
    kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords
              if kw.arg in ("install_requires", "extras_require")}
    return kwargs["install_requires"], kwargs["extras_require"]


def test_dockerfile_base_image_args_and_copied_paths():
    instructions = _dockerfile_instructions()
    known = {"ARG", "FROM", "ENV", "WORKDIR", "RUN", "COPY"}
    assert {kw for kw, _ in instructions} <= known
    args = dict(a.split("=", 1) for kw, a in instructions if kw == "ARG" and "=" in a)
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", args["BASE_IMAGE"])
    assert instructions[0] == ("ARG", f"BASE_IMAGE={args['BASE_IMAGE']}")
    assert [a for kw, a in instructions if kw == "FROM"] == ["${BASE_IMAGE}"]
    assert args["WITH_TRTLLM"] == "0"
    for keyword, arguments in instructions:
        if keyword == "COPY":
            *sources, _dest = arguments.split()
            for source in sources:
                assert source == "." or (REPO / source).is_file(), f"COPY {source}: not in the repository"
    runs = [a for kw, a in instructions if kw == "RUN"]
    trt = [r for r in runs if "tensorrt_llm" in r]
    assert len(trt) == 1 and trt[0].startswith('if [ "$WITH_TRTLLM" = "1" ]; then')
    for run in runs:
        for command in re.split(r"&&|;", run):
            words = shlex.split(command, posix=True) if "pip" in command else []
            if words[:2] == ["pip", "install"]:
                assert not any(re.match(r"torch([<>=!~\[]|$)", w) for w in words), f"RUN installs torch: {command}"
        for script in re.findall(r"\b([\w/]+\.py)\b", run):
            assert (REPO / script).is_file(), f"RUN uses {script}, which is not in the repository"
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "outputs"} <= set(ignored)
    assert "aligner" not in ignored and "conf" not in ignored


def test_dockerfile_requirements_step_installs_setup_py_minus_torch(tmp_path):
    run = next(a for kw, a in _dockerfile_instructions() if kw == "RUN" and "egg_info" in a)
    for name in ("setup.py", "pyproject.toml"):  # what the COPY before it puts in the work dir
        (tmp_path / name).write_text((REPO / name).read_text())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pip").write_text('#!/bin/sh\ncp "$4" "$FAKE_OUT"\n')  # pip install --no-cache-dir -r FILE
    (bin_dir / "aligner-check-torch").write_text("#!/bin/sh\ntouch \"$FAKE_OUT.checked\"\n")
    (bin_dir / "python").symlink_to(sys.executable)
    for name in ("pip", "aligner-check-torch"):
        (bin_dir / name).chmod(0o755)
    out = tmp_path / "requirements.txt"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_OUT": str(out)}
    result = subprocess.run(["sh", "-c", run], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    core, extras = _setup_requirements()
    expected = [r for r in core if not re.match(r"torch\b", r)] + extras["wandb"] + extras["tensorboard"]
    assert sorted(out.read_text().split()) == sorted(expected)  # egg_info orders extras by name
    assert Path(f"{out}.checked").exists()

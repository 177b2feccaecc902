"""What launch/one_node.sh and launch/one_gpu.sh print, run for real (tinydist.launch, accelerate,
torchrun on the CPU) with stub training scripts, or the real trainer where only it says the thing.

A preemption (75) is the contract working, not a failure: it must not read like one. A real failure
must stay as visible as torch makes it. The run's own error line is said once.
(Exit codes, arguments, signals: tests/test_launch.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch"
TIMEOUT = 180  # seconds for one launcher run: imports torch and accelerate in each process, 2 cores shared
TORCH_FAILURE = "failed (exitcode: "  # torch.distributed.elastic.multiprocessing.api's ERROR line

# Variables the launchers read: set explicitly here, never inherited from the developer's shell.
_LEAKY = ("CONFIG", "OUTPUT_DIR", "CHECKPOINT_DIR", "RUN_NAME", "ACCELERATE_ARGS", "TRAIN_SCRIPT", "NUM_GPUS",
          "NUM_MACHINES", "MACHINE_RANK", "MAIN_PROCESS_IP", "MAIN_PROCESS_PORT", "MIN_MACHINES", "MAX_RESTARTS",
          "RDZV_ID", "RDZV_CONF", "CUDA_VISIBLE_DEVICES", "TINYDIST_EXIT_DIR", "PYTHON", "TINYDIST_LAUNCH", "RANK",
          "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "LOGLEVEL", "TORCH_LOGS")

# A training script that ends like train.py does, under cli.run: the code (and error line) recorded
# for tinydist.launch, the line printed by the rank. STUB_CODE: 75 stopped, 69 transient (with an
# error line), 3 a crash.
STUB = """
    import os, sys
    from tinydist.runtime import cli
    from tinydist.runtime.exitcodes import TransientError

    def main():
        code = int(os.environ["STUB_CODE"])
        if code == 69:
            raise TransientError(f"stub transient fault on rank {os.environ.get('RANK', '0')}")
        return code

    sys.exit(cli.run(main))
"""


def env_for(**extra: object) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LEAKY and not k.startswith(("SLURM_", "SKYPILOT_"))}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")  # the venv's python first
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_script(name: str, tmp_path: Path, *args: str, **env: object) -> subprocess.CompletedProcess:
    return subprocess.run([str(LAUNCH / name), *args], capture_output=True, text=True, timeout=TIMEOUT,
                          env=env_for(**env), cwd=tmp_path, start_new_session=True)


def stub(tmp_path: Path) -> Path:
    path = tmp_path / "train_stub.py"
    path.write_text(textwrap.dedent(STUB))
    return path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(kind: str) -> dict[str, object]:
    """one_node.sh's environment for 2 processes on this machine: accelerate's DDP launch, or the
    elastic torchrun path (MIN_MACHINES; no worker restarts, so one round of workers)."""
    if kind == "ddp":
        return {"NUM_GPUS": 2, "ACCELERATE_ARGS": "--main_process_port 0"}
    return {"NUM_GPUS": 2, "NUM_MACHINES": 1, "MIN_MACHINES": 1, "MAIN_PROCESS_IP": "127.0.0.1",
            "MAIN_PROCESS_PORT": free_port(), "MAX_RESTARTS": 0, "RDZV_ID": f"test-{os.getpid()}"}


def lines_with(text: str, part: str) -> list[str]:
    return [line for line in text.splitlines() if part in line]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "elastic"])
def test_one_node_preemption_prints_no_failure(tmp_path: Path, kind: str) -> None:
    proc = run_script("one_node.sh", tmp_path, TRAIN_SCRIPT=stub(tmp_path), STUB_CODE=75, **two_processes(kind))
    assert proc.returncode == 75, proc.stderr
    assert proc.stderr.splitlines()[-1] == "tinydist.launch: training exited with 75"
    assert not lines_with(proc.stderr, TORCH_FAILURE), proc.stderr
    assert "Traceback" not in proc.stderr and "error" not in proc.stderr.lower(), proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "elastic"])
def test_one_node_real_failures_stay_visible(tmp_path: Path, kind: str) -> None:
    """A crash (3) and a transient fault (69) keep torch's failure line, and the run's own error line
    is repeated below it, last before the launcher's verdict."""
    proc = run_script("one_node.sh", tmp_path, TRAIN_SCRIPT=stub(tmp_path), STUB_CODE=3, **two_processes(kind))
    assert proc.returncode == 3, proc.stderr
    assert lines_with(proc.stderr, f"{TORCH_FAILURE}3)"), proc.stderr
    assert proc.stderr.splitlines()[-1] == "tinydist.launch: training exited with 3"

    proc = run_script("one_node.sh", tmp_path, TRAIN_SCRIPT=stub(tmp_path), STUB_CODE=69, **two_processes(kind))
    assert proc.returncode == 69, proc.stderr
    assert lines_with(proc.stderr, f"{TORCH_FAILURE}69)"), proc.stderr
    *_, said, verdict = proc.stderr.splitlines()
    assert said.startswith("error: stub transient fault on rank ")
    assert verdict == "tinydist.launch: training exited with 69"


@pytest.mark.slow
def test_one_gpu_unreachable_hub_is_said_once(tmp_path: Path) -> None:
    """The default source (zh-plus/tiny-imagenet), offline and not cached: one error line, 69."""
    proc = run_script("one_gpu.sh", tmp_path, f"--data.cache_dir={tmp_path / 'cache'}",
                      OUTPUT_DIR=tmp_path / "run", HF_HOME=tmp_path / "hf", HF_HUB_OFFLINE=1, TQDM_DISABLE=1)
    assert proc.returncode == 69, proc.stderr
    errors = lines_with(proc.stderr, "error: ")
    assert len(errors) == 1, proc.stderr
    assert "cannot reach the Hugging Face hub for `zh-plus/tiny-imagenet`" in errors[0]
    assert proc.stderr.splitlines()[-1] == "tinydist.launch: training exited with 69"
    assert not (tmp_path / "run" / "checkpoints").exists()

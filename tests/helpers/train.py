"""Helpers for tests that run tinydist's training as real processes (one, or a gloo group of two): the
one place where tests start, wait for and kill subprocesses, and read what a run left behind.

    from helpers.train import run_train, tiny_args, load_model_dir, read_metrics
    from helpers.train import run, start, finish, describe, error_lines, wait_for

Every run starts from the repository root with `env` (default: train_env(): a copy of os.environ,
which conftest.py has made offline, plus OMP_NUM_THREADS=1 and PYTHONPATH=<repo>, so driver scripts
can `import tinydist`).
A run that outlives its timeout is killed with its whole process tree (launcher and workers: torchrun
gives each worker a session of its own, so the launcher's process group alone would miss them), then
pytest.fail() says so, with the tail of its output. Every test that uses these is marked `slow`.
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import pytest

from helpers.faultinject import free_port, kill_tree

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
SMOKE = str(REPO / "configs" / "smoke.yaml")

# Small enough for a 2-core CPU: 16x16 images (the ImageNet stem), a few steps, a subset of digits.
# With the EMA (the main recipe has it; the smoke recipe not): every checkpoint the tests save, resume and damage
# holds all three tensor sets.
TINY = {"data.image_size": 16, "train.max_steps": 4, "data.max_train_samples": 256, "data.max_val_samples": 64,
        "ema.enabled": "true"}


def tiny_args(cache_dir: str, output_dir: str, config: str = SMOKE, **overrides: Any) -> list[str]:
    """`--config smoke.yaml --data.cache_dir=.. --train.output_dir=..` plus TINY, then `overrides`
    (keys with `__` for dots: train__max_steps=3 -> --train.max_steps=3; a None value drops the key)."""
    values = dict(TINY)
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    args = ["--config", config, f"--data.cache_dir={cache_dir}", f"--train.output_dir={output_dir}"]
    return args + [f"--{k}={v}" for k, v in values.items() if v is not None]


def train_env(extra: Optional[Mapping[str, str]] = None, unset: Sequence[str] = ()) -> dict[str, str]:
    """os.environ (offline, see conftest.py) + PYTHONPATH=<repo> + OMP_NUM_THREADS=1, then `extra`.
    One intra-op thread per process: on a shared 2-core box two OpenMP threads spin against each other
    and against other jobs (30 smoke steps: 13 s with one thread, 50 s with two), and torchrun gives
    each worker of a multi-process launch one thread anyway, so 1- and 2-process runs round alike."""
    env = os.environ.copy()
    for key in unset:
        env.pop(key, None)
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra or {})
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def train_command(args: Sequence[str], nprocs: int = 1, script: Optional[str] = None) -> list[str]:
    """One process: `python -m tinydist.train ARGS` (or `python SCRIPT ARGS`). Several:
    `python -m tinydist.launch --multi_gpu --num_processes N --main_process_port P SCRIPT ARGS`,
    which on a CPU-only machine starts N processes that form a gloo group."""
    if nprocs == 1:
        return [PYTHON, script, *args] if script else [PYTHON, "-m", "tinydist.train", *args]
    return [PYTHON, "-m", "tinydist.launch", "--multi_gpu", "--num_processes", str(nprocs),
            "--main_process_port", str(free_port()), script or "tinydist/train.py", *args]


def start(cmd: Sequence[Any], env: Optional[Mapping[str, str]] = None,
          cwd: Optional[Union[str, os.PathLike[str]]] = None) -> subprocess.Popen:
    """Start `cmd` (from the repository root, in a session of its own, output captured as text)."""
    return subprocess.Popen([str(c) for c in cmd], cwd=str(cwd or REPO),
                            env=dict(env) if env is not None else train_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    """Wait for a start()ed process; past `timeout`, kill its whole tree and fail the test."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(map(str, proc.args))} still running after {timeout} s; killed.\n"
                    f"stdout tail:\n{out[-3000:]}\nstderr tail:\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run(cmd: Sequence[Any], env: Optional[Mapping[str, str]] = None, timeout: float = 300,
        cwd: Optional[Union[str, os.PathLike[str]]] = None) -> subprocess.CompletedProcess:
    """Run `cmd` in its own session; on timeout kill the whole tree and fail the test."""
    return finish(start(cmd, env, cwd), timeout)


def run_train(args: Sequence[str], nprocs: int = 1, env: Optional[Mapping[str, str]] = None,
              timeout: float = 300, script: Optional[str] = None) -> subprocess.CompletedProcess:
    """Train (or run a driver `script`) with `args`, in `nprocs` processes; see train_command."""
    return run(train_command(args, nprocs, script), env if env is not None else train_env(), timeout)


def describe(result: subprocess.CompletedProcess, tail: int = 4000) -> str:
    """For assertion messages: exit code and the ends of both streams."""
    return (f"exit {result.returncode}: {' '.join(map(str, result.args))}\n"
            f"--- stdout ---\n{result.stdout[-tail:]}\n--- stderr ---\n{result.stderr[-tail:]}")


def error_lines(output: Union[str, subprocess.CompletedProcess]) -> list[str]:
    """The `error: ...` lines of a run's stderr (or of `output`). tinydist's progress bar (tqdm ends its
    lines with \\r) may precede one on the same terminal line, so \\r starts a line too."""
    text = output if isinstance(output, str) else output.stderr
    return re.findall(r"(?m)(?:^|\r)(error: [^\r\n]*)", text)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, poll: float = 0.05) -> None:
    """Poll `predicate` until true; past `timeout`, an AssertionError naming `what`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)


def read_metrics(output_dir: str) -> list[dict[str, Any]]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_model_dir(path: str) -> dict[str, Any]:
    """A Hugging Face sharded safetensors folder (index json + shards) -> state dict, without tinydist."""
    from safetensors.torch import load_file

    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    state: dict[str, Any] = {}
    for shard in sorted(set(weight_map.values())):
        state.update(load_file(os.path.join(path, shard)))
    missing = set(weight_map) - set(state)
    assert not missing, f"{path}: index names tensors no shard holds: {sorted(missing)[:5]}"
    return state


def resnet18_parameter_names(num_classes: int = 10) -> list[str]:
    """Names of the trainable tensors of torchvision's resnet18 (BN running stats excluded)."""
    import torchvision

    return [name for name, _ in torchvision.models.resnet18(num_classes=num_classes).named_parameters()]


def committed_checkpoints(output_dir: str) -> list[str]:
    return sorted(os.path.dirname(p) for p in glob.glob(os.path.join(output_dir, "checkpoints", "*", "COMMITTED")))


def wandb_records(path: str) -> list[Any]:
    """The records of a W&B `run-*.wandb` file (LevelDB-style log: 7-byte file header, 32 KiB blocks,
    records with a 7-byte header crc32/length/type, split as FULL/FIRST/MIDDLE/LAST), as protobufs.
    wandb >= 0.2x no longer ships a Python reader (wandb.sdk.internal.datastore is gone)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B transaction log (header {data[:7]!r})"
    block, pos, records, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer: padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
            pending = b""
        else:
            raise AssertionError(f"{path}: unknown record type {kind} at byte {pos}")
    parsed = []
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        parsed.append(record)
    return parsed


def wandb_history(path: str) -> list[dict[str, Any]]:
    """The rows logged with wandb.log / accelerator.log, from a `run-*.wandb` file."""
    rows = []
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def tensorboard_scalars(root: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in every TensorBoard event file under `root`: tag -> [(step, value), ...]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(glob.glob(os.path.join(root, "**", "events.out.tfevents.*"), recursive=True)):
        acc = EventAccumulator(path, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return scalars

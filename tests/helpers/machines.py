"""Two machines on loopback: `launch/one_node.sh` invocations with `--num_machines 2` (machine ranks 0 and
1, main process 127.0.0.1, one process each), each with its own data cache dir (separate nodes have
separate disks); what they share is the caller's to choose (a checkpoint.dir)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from helpers.faultinject import kill_tree
from helpers.train import PYTHON, REPO, finish, start, tiny_args, train_env


def machine(rank: int, port: int, tmp_path: Path, cache_root: str, **overrides: Any) -> subprocess.Popen:
    """Machine `rank` of two, training into `tmp_path/out` with tiny_args plus `overrides`."""
    env = train_env({"NUM_GPUS": "1", "NUM_MACHINES": "2", "MACHINE_RANK": str(rank), "MAIN_PROCESS_IP": "127.0.0.1",
                     "MAIN_PROCESS_PORT": str(port), "ACCELERATE_ARGS": "--mixed_precision no",
                     "PYTHON": PYTHON})
    args = tiny_args(f"{cache_root}/machine{rank}", str(tmp_path / "out"), **overrides)
    return start([REPO / "launch" / "one_node.sh", *args], env)


def finish_all(procs: list[subprocess.Popen], timeout: float) -> list[subprocess.CompletedProcess]:
    """helpers.train.finish for each machine within one deadline; past it, every machine's tree is killed."""
    deadline = time.monotonic() + timeout
    try:
        return [finish(proc, max(1.0, deadline - time.monotonic())) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                kill_tree(proc.pid)

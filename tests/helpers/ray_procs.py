"""Ray runs in tests: a marked environment, so every process of a test's Ray instance can be found
(and stopped) whatever it was reparented to, and the run's command.

    from helpers.ray_procs import ray_command, ray_env, marked_processes, stop_marked, ray_available

Ray's gcs_server, raylet and workers inherit the driver's environment (a local instance), so a
variable set for the driver marks them all; /proc/PID/environ tells them apart from any other Ray on
the machine. Everything stays on loopback: `python -m tinydist.ray` without --address starts its
local instance on 127.0.0.1 (see tinydist/engines/ray_train.py).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import uuid
from typing import Any, Mapping, Optional, Sequence

from helpers.faultinject import wait_gone
from helpers.train import PYTHON, train_env

MARK = "TINYDIST_TEST_RAY_RUN"


def ray_available() -> bool:
    return importlib.util.find_spec("ray") is not None


def new_mark() -> str:
    return uuid.uuid4().hex


def ray_env(mark: str, extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """train_env (offline, one thread, PYTHONPATH) + the mark; Ray's usage stats off (no network)."""
    return train_env({MARK: mark, "RAY_USAGE_STATS_ENABLED": "0", **(extra or {})})


def ray_command(args: Sequence[Any], workers: int, *options: str) -> list[str]:
    return [PYTHON, "-m", "tinydist.ray", "--num-workers", str(workers), *options, *map(str, args)]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def marked_processes(mark: str, name: str = "") -> list[int]:
    """Live processes whose environment carries `mark` (and whose command line contains `name`)."""
    needle = f"{MARK}={mark}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
        except OSError:  # gone meanwhile, or not ours
            continue
        if name in _cmdline(int(entry)):
            found.append(int(entry))
    return found


def left_running(mark: str, grace_s: float = 15.0) -> list[str]:
    """The command lines of `mark`ed processes still running after `grace_s` (ray.shutdown() returns
    while the processes it signalled are still exiting)."""
    return [f"{pid}: {_cmdline(pid)[:120]}" for pid in wait_gone(marked_processes(mark), grace_s)]


def stop_marked(mark: str, timeout: float = 10.0) -> list[str]:
    """SIGKILL every process carrying `mark`; the command lines of those that were still running."""
    pids = marked_processes(mark)
    left = [f"{pid}: {_cmdline(pid)[:120]}" for pid in pids]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    wait_gone(pids, timeout)
    return left

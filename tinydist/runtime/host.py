"""Whose pid is it: the one machine identity and the one liveness check that files left by other
processes are judged by (the checkpoint lease, the decode cache's temp folders).

A pid names a process only within one boot of one host's pid namespace: after a reboot, or in
another container sharing the volume (even under the same host name), the same number is somebody
else, or nobody. So a recorded pid is checked only when its recorded `machine_id()` is ours; any
other machine's is judged by what it left (a heartbeat, a modification time).
"""

from __future__ import annotations

import os
import socket

BOOT_ID = "/proc/sys/kernel/random/boot_id"
PID_NAMESPACE = "/proc/self/ns/pid"


def machine_id() -> str:
    """`host/boot id/pid namespace inode`, each `?` where the system does not say (not Linux)."""
    parts = [socket.gethostname()]
    try:
        with open(BOOT_ID) as f:
            parts.append(f.read().strip())
    except OSError:
        parts.append("?")
    try:
        parts.append(str(os.stat(PID_NAMESPACE).st_ino))
    except OSError:
        parts.append("?")
    return "/".join(parts)


def pid_alive(pid: object) -> bool:
    """Whether a process with this pid exists here. Anything but a positive int (read from a file
    another process wrote) names none: to os.kill, 0 and negative numbers are process groups."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, and is another user's
        return True
    return True

"""Preemption is a flag, not a handler.

SIGTERM (Kubernetes, cloud spot notices), SIGUSR1 (SLURM's warning before the time limit),
SIGINT (Ctrl-C), SIGHUP (the terminal or SSH session that started the run closed) and a cloud's
preemption notice (notice.py) only set a flag. At each step boundary all ranks agree on it with one
all-reduce over a CPU (gloo) group, so reading it never waits for the GPU; then they save and exit
together with EXIT_PREEMPTED (75): a relaunch resumes from that checkpoint. A second signal while
saving changes nothing: the flag is already set.

SIGHUP's default would kill the run mid-step and lose everything since the last checkpoint. A run
started under `nohup` inherits SIGHUP ignored: that is the user asking it to outlive the terminal,
so it stays ignored (`stop_signals`).
"""

from __future__ import annotations

import signal
from typing import Any, Optional

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)


def stop_signals() -> tuple[signal.Signals, ...]:
    """The SIGNALS this process should handle: all, less SIGHUP where it was inherited ignored (nohup)."""
    return tuple(s for s in SIGNALS if not (s == signal.SIGHUP and signal.getsignal(s) == signal.SIG_IGN))


class StopFlag:
    def __init__(self, log: Any = print, signals: bool = True):
        """`signals=False`: a flag only `request` sets, for a run in a thread that is not the main one
        (a Ray Train worker's training thread), where Python refuses to install signal handlers."""
        self.signal_name: Optional[str] = None
        self.log = log
        self._announce = False
        self._previous = {s: signal.signal(s, self._handle) for s in stop_signals()} if signals else {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.request(signal.Signals(signum).name)

    def request(self, reason: str) -> None:
        """Ask for a stop at the next step boundary, as a signal does (e.g. a cloud's preemption notice,
        from a watcher thread). The first reason wins; later ones change nothing. Said at the next
        agreement, not here: a signal handler that prints could interrupt the progress bar mid-draw."""
        if self.signal_name is None:
            self.signal_name = reason
            self._announce = True

    def _announced(self) -> None:
        if self._announce:
            self._announce = False
            self.log(f"{self.signal_name} received: stopping at the next step boundary, after a checkpoint")

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def agreed(self, peers: Any, fault: bool = False, due: bool = False,
               lost: bool = False) -> tuple[bool, bool, bool, bool]:
        """(any rank signalled, any rank reports `fault`, any rank says a save is `due`, any rank `lost`
        its local checkpoint tier), the same on every rank: one collective over `peers` (peers.py: a
        CPU group, bounded wait), so call it on all ranks at the same point. Clocks differ between
        machines; the first to see a save due wins."""
        self._announced()
        values = peers.max([int(self.requested), int(fault), int(due), int(lost)])
        signalled, faulted, due_any, lost_any = (bool(v) for v in values)
        if signalled and self.signal_name is None:
            self.signal_name = "peer"
        return signalled, faulted, due_any, lost_any

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

"""Preemption is a flag, not a handler (DESIGN.md principle 5).

SIGTERM (Kubernetes, cloud spot notices), SIGUSR1 (SLURM's warning before the time limit) and
SIGINT only set a flag. At each step boundary all ranks agree on it with one all-reduce over a
CPU (gloo) group, so reading it never waits for the GPU; then they save and exit together with
EXIT_PREEMPTED. A second signal while saving changes nothing: the flag is already set.
"""

from __future__ import annotations

import signal
from typing import Any, Optional

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopFlag:
    def __init__(self, log: Any = print):
        self.signal_name: Optional[str] = None
        self._log = log
        self._group: Any = None
        self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}

    def _handle(self, signum: int, frame: Any) -> None:
        self.request(signal.Signals(signum).name)

    def request(self, reason: str) -> None:
        """Ask for a stop at the next step boundary, as a signal does (e.g. a cloud's preemption notice,
        from a watcher thread). The first reason wins; later ones change nothing."""
        if self.signal_name is None:
            self.signal_name = reason
            self._log(f"{reason} received: stopping at the next step boundary, after a checkpoint")

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def agreed(self, world_size: int, fault: bool = False) -> tuple[bool, bool]:
        """(any rank signalled, any rank reports `fault`), the same on every rank. A collective: call it
        on all ranks at the same point; it never waits for the GPU (a CPU gloo group)."""
        if world_size == 1:
            return self.requested, fault
        import torch  # here, not at the top: launchers import the exit codes and should not pay for torch
        import torch.distributed as dist

        if self._group is None:
            self._group = dist.new_group(backend="gloo")
        flags = torch.tensor([int(self.requested), int(fault)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
        signalled, faulted = bool(flags[0].item()), bool(flags[1].item())
        if signalled and self.signal_name is None:
            self.signal_name = "peer"
        return signalled, faulted

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

"""Preemption is a flag, not a handler (DESIGN.md principle 5).

SIGTERM (Kubernetes, cloud spot notices), SIGUSR1 (SLURM's warning before the time limit) and
SIGINT only set a flag. At each step boundary all ranks agree on it with one all-reduce over a
CPU (gloo) group, so reading it never waits for the GPU; then they save and exit together with
EXIT_PREEMPTED. A second signal while saving changes nothing: the flag is already set.
"""

from __future__ import annotations

import signal
from typing import Any, Optional

EXIT_OK = 0
EXIT_CONFIG = 2  # bad config, data source or batch arithmetic: relaunching cannot fix it
EXIT_PREEMPTED = 75  # stopped at a step boundary after a committed checkpoint: relaunch me (EX_TEMPFAIL)
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopFlag:
    def __init__(self, log: Any = print):
        self.signal_name: Optional[str] = None
        self._log = log
        self._group: Any = None
        self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            self._log(f"{self.signal_name} received: stopping at the next step boundary, after a checkpoint")

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def agreed(self, world_size: int) -> bool:
        """True on every rank if any rank was signalled. A collective: call it on all ranks."""
        if world_size == 1:
            return self.requested
        import torch  # here, not at the top: launchers import the exit codes and should not pay for torch
        import torch.distributed as dist

        if self._group is None:
            self._group = dist.new_group(backend="gloo")
        flag = torch.tensor([int(self.requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        if flag.item() and self.signal_name is None:
            self.signal_name = "peer"
        return bool(flag.item())

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

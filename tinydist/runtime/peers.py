"""The other processes of a run: small agreements and liveness checks with bounded waits.

A peer can die (its machine preempted, OOM-killed) or hang (SIGSTOP, a stuck driver). Every wait on
a peer is bounded by `train.peer_timeout_s` (the process group's timeout, the commit's wait for part
files, this module's barrier), and a peer found dead or silent is a `PeerLostError`: transient, so a
launcher relaunches (and torch's elastic agent restarts the survivors on a smaller world).

Agreements and barriers run over a separate CPU (gloo) group: they never wait for the GPU, and gloo
offers `monitored_barrier`, which names the rank that did not arrive instead of timing out blind.
"""

from __future__ import annotations

import datetime
import re
from typing import Any, Sequence

from tinydist.runtime.quote import first_line
from tinydist.runtime.exitcodes import TransientError

# How gloo and NCCL report a peer that died or went silent. torch raises a plain RuntimeError for
# most of these (DistError subclasses only for some), so the message is all there is to go on.
_PEER_FAILURE = re.compile(r"Connection closed by peer|Connection reset by peer|Broken pipe|timed out|Timed out|"
                           r"failed to pass monitoredBarrier|NCCL communicator was aborted|remote process exited|"
                           r"ProcessGroupGloo|ProcessGroupNCCL|Socket Timeout|Connection refused")


class PeerLostError(TransientError):
    """A peer process died or did not answer within the bound. The survivors stop; a relaunch (or the
    elastic agent) resumes from the last commit."""


def is_peer_failure(error: BaseException) -> bool:
    """Whether `error`, raised by a collective, means a peer died or went silent (not a bug of ours)."""
    if isinstance(error, PeerLostError):
        return True
    try:
        import torch.distributed as dist

        if isinstance(error, getattr(dist, "DistError", ())):
            return True
    except ImportError:
        pass
    return isinstance(error, RuntimeError) and bool(_PEER_FAILURE.search(str(error)))


class Peers:
    """The run's processes as seen from one of them. With one process every call is free."""

    def __init__(self, world_size: int, rank: int, timeout_s: float) -> None:
        self.world_size, self.rank, self.timeout_s = world_size, rank, timeout_s
        self._group: Any = None

    def _gloo(self) -> Any:
        import torch.distributed as dist

        if self._group is None:
            self._group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=self.timeout_s))
        return self._group

    def max(self, values: Sequence[int]) -> list[int]:
        """Element-wise max over all ranks. A collective: every rank calls it at the same point."""
        if self.world_size == 1:
            return list(values)
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(list(values), dtype=torch.int64)
        try:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self._gloo())
        except RuntimeError as e:
            raise self.lost(e, "agreeing at a step boundary") from e
        return tensor.tolist()

    def barrier(self, what: str) -> None:
        """Every rank reaches this point within the bound, or PeerLostError names those that did not."""
        if self.world_size == 1:
            return
        import torch.distributed as dist

        try:
            dist.monitored_barrier(group=self._gloo(), timeout=datetime.timedelta(seconds=self.timeout_s),
                                   wait_all_ranks=True)
        except RuntimeError as e:
            raise self.lost(e, what) from e

    def lost(self, error: BaseException, what: str) -> PeerLostError:
        ranks = sorted(set(int(r) for r in re.findall(r"[Rr]ank (\d+)", str(error))) - {self.rank})
        if not ranks and self.world_size == 2:  # gloo names an address, not a rank; of two, it is the other
            ranks = [1 - self.rank]
        who = f"rank(s) {ranks}" if ranks else "a peer"
        return PeerLostError(f"{who} lost while {what} (rank {self.rank} waited at most "
                             f"train.peer_timeout_s={self.timeout_s:g} s): {first_line(error)}")



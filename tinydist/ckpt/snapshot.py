"""The host copy of a save's tensor sets, taken without stalling the loop (CheckFreq, FAST'21).

The next forward changes only BN buffers: every module set's buffers (the model's; the EMA's too,
a few KB, kept simple) are copied inside save(). Parameters, optimizer state and the EMA's weights
change only at (or after) the next optimizer step: they are copied while the next forward and
backward run — queued on a side CUDA stream into pinned memory, or on the CPU by the writer thread —
and the loop calls `Pending.barrier()` (the checkpointer's `snapshot_barrier()`) before that step.
Host buffers are reused from save to save: fresh ones would cost page faults on the CPU and pinned
allocations on a GPU.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional

import torch

from tinydist.ckpt.sets import Capture

HostSets = dict[str, dict[str, torch.Tensor]]  # set name -> its tensors in host memory, in the set's order


class Pending:
    """One save's host copies: finished by the writer thread, waited for by the loop's barrier."""

    def __init__(self) -> None:
        self.copied = threading.Event()  # everything is in host memory (or queued behind `cuda_done`)
        self.cuda_done: Optional[Any] = None  # on a GPU: the event that marks the end of the copies
        self._finish: Callable[[], HostSets] = dict

    def barrier(self) -> None:
        """Before the loop's next optimizer step: wait only if the copies are unfinished."""
        if self.cuda_done is not None:
            torch.cuda.current_stream().wait_event(self.cuda_done)  # the GPU waits, not the host
        else:
            self.copied.wait()

    def result(self) -> HostSets:
        """The finished host copies (the writer thread calls this)."""
        return self._finish()


class HostSnapshot:
    def __init__(self, share_cpu_later: bool = False) -> None:
        self.buffers: dict[str, torch.Tensor] = {}
        self._side_stream: Optional[Any] = None
        # The local tier's: its barrier waits for the whole commit before the next optimizer step, so on
        # the CPU the parameters and optimizer state cannot change while they are written: no copy of them.
        self.share_cpu_later = share_cpu_later

    def drop(self) -> None:
        """Fresh buffers for the next save: a superseded one stuck in a network call keeps the old ones."""
        self.buffers = {}

    def copy(self, tensors: dict[str, torch.Tensor], prefix: str,
             buffers: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
        """Copy into the host buffers under `prefix`. On a GPU the copies are only queued (non-blocking,
        on the caller's current stream): the caller orders and waits for them with events."""
        buffers = self.buffers if buffers is None else buffers
        out = {}
        for key, t in tensors.items():
            t = t.detach()
            buf = buffers.get(prefix + key)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.device.type == "cuda")
                buffers[prefix + key] = buf
            out[key] = buf.copy_(t, non_blocking=t.device.type == "cuda")
        return out

    def take(self, captures: dict[str, Capture], blocking: bool) -> Pending:
        """Start the copies of every set; what is left runs in the writer thread (`Pending.result`)."""
        pending, buffers = Pending(), self.buffers  # this save's buffers: a superseded one keeps its own

        def copy_all(part: str) -> HostSets:
            tensors = {name: getattr(c, part) for name, c in captures.items()}
            return {name: self.copy(t, f"{name}/", buffers) if t else {} for name, t in tensors.items()}

        def assemble(now: HostSets, later: HostSets) -> HostSets:
            merged = {name: {**now[name], **later[name]} for name in captures}
            return {name: {k: merged[name][k] for k in c.order} for name, c in captures.items()}

        if any(t.is_cuda for c in captures.values() for t in (*c.now.values(), *c.later.values())):
            side = self._side_stream = self._side_stream or torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())  # copy what the last optimizer step wrote
            with torch.cuda.stream(side):
                now_host = copy_all("now")
            torch.cuda.current_stream().wait_stream(side)  # the next forward's BN update waits, on the GPU only
            with torch.cuda.stream(side):
                later_host = copy_all("later")
            done = torch.cuda.Event()
            done.record(side)
            pending.cuda_done = done
            pending.copied.set()
            if blocking:
                done.synchronize()

            def finish_cuda() -> HostSets:
                done.synchronize()
                return assemble(now_host, later_host)
            pending._finish = finish_cuda
            return pending

        now_host = copy_all("now")
        if self.share_cpu_later:
            later = {name: {k: t.detach() for k, t in c.later.items()} for name, c in captures.items()}
            pending.copied.set()
            pending._finish = lambda: assemble(now_host, later)
            return pending
        if blocking:  # nothing runs meanwhile: copy everything here
            later_host = copy_all("later")
            pending.copied.set()
            pending._finish = lambda: assemble(now_host, later_host)
            return pending

        def finish_cpu() -> HostSets:
            try:
                return assemble(now_host, copy_all("later"))
            finally:
                pending.copied.set()
        pending._finish = finish_cpu
        return pending

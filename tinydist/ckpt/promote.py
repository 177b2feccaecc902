"""The durable tier fed by the local one: one snapshot serves both.

When a durable save is due and the local tier is on, the loop saves locally only; once that local
checkpoint is committed, rank 0's `Promoter` copies its files (each verified against its checksum as
it is read) to `checkpoint.dir` and commits them there under the same protocol: every file, then
state.json, then the marker, the lease checked first, retention after. Nothing is snapshotted twice.

The copy runs in a thread of its own, so the loop never waits for the bucket and a slow or down
bucket never slows the local tier. A copy in progress is not superseded by a newer one (with a bucket
slower than the durable cadence, superseding would never commit anything); the newest local commit
waiting behind it replaces any older one waiting. Storage faults are retried under the one backoff
policy (backoff.py); a newer checkpoint waiting takes the place of one that is retrying. No commit for
`checkpoint.max_outage_s` sets `fault` and the loop stops with 69, as without the local tier. The
local folder being copied is pinned against the local tier's retention until the copy ends.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional

from tinydist.ckpt.backoff import Backoff, Outage
from tinydist.ckpt.checkpointer import Checkpointer
from tinydist.ckpt.commit import Attempt, Superseded, clean_up, commit
from tinydist.ckpt.layout import CheckpointError
from tinydist.ckpt.lease import Lease
from tinydist.ckpt.record import check_committed, sealed, step_folder
from tinydist.ckpt.storage import StorageError, StorageFullError, megabytes


class Promoter:
    def __init__(self, local: Checkpointer, durable: Checkpointer, *, world_size: int, lease: Optional[Lease],
                 log: Callable[[str], None], max_outage_s: float, retry_s: float) -> None:
        self.local, self.durable, self.world_size, self.lease, self.log = local, durable, world_size, lease, log
        self.max_outage_s, self.retry_s = max_outage_s, retry_s
        self.fault: Optional[BaseException] = None  # no durable commit for max_outage_s, or the lease lost
        self._wanted: set[int] = set()  # steps to copy once the local tier has committed them
        self._ready: Optional[int] = None  # the newest such step committed locally, waiting to be copied
        self._busy = False
        self._cv = threading.Condition()
        self._cancel = threading.Event()
        self._outage = Outage()
        self._thread = threading.Thread(target=self._run, name="tinydist-promote", daemon=True)
        self._thread.start()

    def want(self, step: int) -> None:
        """The loop: the local save of `step` just started; copy it to the durable tier once committed."""
        with self._cv:
            self._wanted.add(step)

    def committed(self, step: int) -> None:
        """The local tier's writer thread, after each commit: hand a wanted step to the copier. Never raises
        (it runs inside the local save)."""
        with self._cv:
            if step not in self._wanted:
                return
            self._wanted = {s for s in self._wanted if s > step}
            if self._ready is not None:
                self.local.retention.pinned.discard(step_folder(self._ready))
            self._ready = step
            self.local.retention.pinned.add(step_folder(step))  # before the next local commit's cleanup
            self._cv.notify_all()

    def cancel(self) -> None:
        """Before a blocking save writes the durable tier itself, and on the way out: stop copying (what an
        unfinished copy wrote is removed) and wait for the thread to let go, briefly."""
        with self._cv:
            self._cancel.set()
            self._cv.notify_all()
        self._thread.join(timeout=30.0)

    def wait(self, timeout_s: float) -> bool:
        """Wait until nothing is waiting or being copied (tests, benchmarks); True if so."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while (self._ready is not None or self._busy) and not self._cancel.is_set():
                if not self._cv.wait(timeout=max(0.0, deadline - time.monotonic())) and time.monotonic() > deadline:
                    return False
        return True

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._ready is None and not self._cancel.is_set():
                    self._cv.wait()
                if self._cancel.is_set():
                    return
                step, self._ready, self._busy = self._ready, None, True
            try:
                self._copy_retrying(step)
            finally:
                with self._cv:
                    self._busy = False
                    self.local.retention.pinned.discard(step_folder(step))
                    self._cv.notify_all()

    def _copy_retrying(self, step: int) -> None:
        backoff = Backoff(max_outage_s=self.max_outage_s, retry_s=self.retry_s, outage=self._outage)
        name = step_folder(step)
        while not self._cancel.is_set():
            attempt = Attempt(self.durable.storage, name, remove_empty_folder=True)
            try:
                self._copy(step, attempt)
                backoff.succeeded()
                return
            except Superseded:
                attempt.undo()
                return
            except StorageFullError as e:
                attempt.undo()
                self.log(f"warning: checkpoint {self.durable.storage.show(name)} not copied from the local tier: {e}; "
                         "the next durable save tries again")
                return
            except StorageError as e:
                attempt.undo()
                wait = backoff.after_failure()
                if wait is None:
                    self.fault = backoff.gave_up(self.durable.directory, e)
                    self.log(f"error: {self.fault}")
                    return
                self.log(f"checkpoint {self.durable.storage.show(name)}: copy from the local tier failed ({e}); "
                         f"retrying in {wait:.3g} s, training goes on (storage failing for {backoff.down_s:.0f} s)")
                with self._cv:
                    self._cv.wait_for(lambda: self._ready is not None or self._cancel.is_set(), timeout=wait)
                    if self._ready is not None:  # a newer local commit waits: it replaces this one
                        return
            except CheckpointError as e:  # the local copy is damaged: the next durable save copies a newer one
                attempt.undo()
                self.log(f"warning: {e}; not copied to the durable tier")
                return
            except BaseException as e:  # noqa: BLE001 - the lease lost, a bug: the loop stops with it
                attempt.undo()
                self.fault = e
                return

    def _copy(self, step: int, attempt: Attempt) -> None:
        started, name = time.monotonic(), attempt.folder
        if self.durable.retention.is_committed(name):
            return
        source = self.local.storage
        record = check_committed(source, name)
        files = sealed(source, name, record)
        self.durable.storage.makedirs(name)
        for file in record["files"]:
            if self._cancel.is_set():
                raise Superseded()
            attempt.write(file, files.read(file))  # read checks size and sha256: only what was committed goes
        if self.lease is not None:
            self.lease.check()
        commit(attempt, {**record, "world_size": self.world_size})
        self.durable.last_commit = max(step, self.durable.last_commit or 0)
        size = sum(f["bytes"] for f in record["files"].values())
        self.log(f"checkpoint {self.durable.storage.show(name)} committed (copied from the local tier): "
                 f"{len(record['files'])} files, {megabytes(size)}, {time.monotonic() - started:.1f} s")
        clean_up(self.durable.retention, self.log)

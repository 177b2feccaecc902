"""One save attempt in the writer thread: this rank's shards and part file, and on rank 0 the commit
(every part file there, the lease still ours, state.json, then the COMMITTED marker). An attempt
that fails removes exactly what it wrote (`Attempt.undo`); retrying is the checkpointer's business.
"""

from __future__ import annotations

import datetime
import json
import threading
import time
from typing import Any, Callable, Optional

from tinydist.ckpt import layout
from tinydist.ckpt.lease import Lease
from tinydist.ckpt.record import MARKER, STATE
from tinydist.ckpt.retention import Retention
from tinydist.ckpt.snapshot import HostSets
from tinydist.ckpt.storage import Storage, StorageError, StorageRefusedError
from tinydist.runtime.divergence import DivergedError, nonfinite_tensors
from tinydist.runtime.exitcodes import TransientError


class Superseded(Exception):
    """A newer save replaced this one while it was retrying."""


class Attempt:
    """What one save attempt of this rank wrote, so that a failed attempt can remove exactly that."""

    def __init__(self, storage: Storage, folder: str, remove_empty_folder: bool) -> None:
        self.storage, self.folder, self.remove_empty_folder = storage, folder, remove_empty_folder
        self.written: list[str] = []

    def write(self, name: str, data: Any) -> None:
        self.written.append(name)
        self.storage.write(f"{self.folder}/{name}", data)

    def undo(self) -> None:
        for name in reversed(self.written):
            try:
                self.storage.remove(f"{self.folder}/{name}")
            except (StorageError, StorageRefusedError):
                return  # storage down: cleanup() removes the rest after the next commit or start
        if self.remove_empty_folder:  # with several ranks another may be writing into it right now
            try:
                if not self.storage.sizes(self.folder):
                    self.storage.remove(self.folder, recursive=True)
            except (StorageError, StorageRefusedError):
                pass


def commit(attempt: Attempt, record: dict) -> None:
    """Seal the folder `attempt` wrote: state.json (`record`, stamped with the time), then the marker,
    the sha256 of state.json, last. Every file the record's table lists must be in place already."""
    record = {**record, "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    data = (json.dumps(record, indent=2, allow_nan=False) + "\n").encode()
    attempt.write(STATE, data)
    attempt.storage.write(f"{attempt.folder}/{MARKER}", (layout.sha256(data) + "\n").encode())


def clean_up(retention: Retention, log: Callable[[str], None]) -> None:
    """Retention after a commit; a failure leaves the commit standing (leftovers go at the next cleanup)."""
    try:
        retention.cleanup()
    except (StorageError, StorageRefusedError) as e:
        log(f"could not clean up {retention.storage.url} after the commit ({e})")


class Committer:
    """This rank's part of every save: what it writes, and (rank 0) the commit."""

    def __init__(self, storage: Storage, retention: Retention, *, rank: int, world_size: int, max_shard_size: int,
                 commit_timeout_s: float, lease: Optional[Lease], log: Callable[[str], None],
                 commit_log: Optional[Callable[[str], None]] = None) -> None:
        self.storage, self.retention, self.rank, self.world_size = storage, retention, rank, world_size
        self.max_shard_size, self.commit_timeout_s, self.lease, self.log = max_shard_size, commit_timeout_s, lease, log
        self.commit_log = commit_log or log  # the line each commit says (the local tier: none, every step)

    def write(self, attempt: Attempt, host: HostSets, record: dict, cancel: threading.Event,
              written: threading.Event) -> bool:
        """One attempt at checkpoint `attempt.folder`; True once the step is committed (by this rank,
        or found committed already). Sets `written` when this rank's files are in storage."""
        t0, name, step = time.monotonic(), attempt.folder, record["step"]
        if self.retention.is_committed(name):  # e.g. saved again right after a resume: never rewrite a good one
            if self.rank == 0:
                self.log(f"checkpoint {self.storage.show(name)} is already committed; not saving it again")
            return True
        # Every rank checks every set (not only its own shards): each rank then stops on its own
        # finding, no rank commits what another found poisoned, and nothing is written for nothing.
        for prefix, tensors in host.items():
            bad = nonfinite_tensors(tensors)
            if bad:
                raise DivergedError(f"{len(bad)} {prefix} tensor(s) hold NaN or infinity at step {step} "
                                    f"(first: {bad[0]}); checkpoint {self.storage.show(name)} not committed", step)
        self.storage.makedirs(name)
        part = f"part-{self.rank:05d}.json"
        self.storage.remove(f"{name}/{part}")  # left by an interrupted attempt: must not pass for this one
        files: layout.FileTable = {}

        def stop_if_superseded() -> None:
            if cancel.is_set():
                raise Superseded()

        for prefix, tensors in host.items():
            shards = layout.plan(prefix, tensors, self.max_shard_size)
            files.update(layout.write_shards(shards, tensors, attempt.write, before_each=stop_if_superseded,
                                             mine=lambda i: i % self.world_size == self.rank))
            if self.rank == 0:
                data = layout.index_bytes(shards)
                files[layout.index_name(prefix)] = layout.file_entry([data])
                attempt.write(layout.index_name(prefix), data)
        part_data = {"step": step, "world_size": self.world_size, "rank": self.rank, "files": files}
        attempt.write(part, json.dumps(part_data, indent=2).encode())
        written.set()
        if self.rank != 0:
            return False
        for other in self.wait_for_parts(name, step, cancel):
            files.update(other)
        stop_if_superseded()
        if self.lease is not None:
            self.lease.check()
        commit(attempt, {**record, "files": dict(sorted(files.items()))})
        size = sum(f["bytes"] for f in files.values()) / 1e6
        self.commit_log(f"checkpoint {self.storage.show(name)} committed: {len(files)} files, {size:.1f} MB, "
                        f"{time.monotonic() - t0:.1f} s after save()")
        clean_up(self.retention, self.log)
        return True

    def wait_for_parts(self, name: str, step: int, cancel: threading.Event) -> list[dict]:
        """Poll storage until every other rank's part file (and the files it lists) is there."""
        wanted = {f"part-{r:05d}.json": r for r in range(1, self.world_size)}
        found: dict[str, dict] = {}
        deadline, delay = time.monotonic() + self.commit_timeout_s, 0.05
        while True:
            sizes = self.storage.sizes(name)
            for part in (p for p in wanted if p in sizes and p not in found):
                try:
                    info = json.loads(self.storage.read(f"{name}/{part}"))
                except (FileNotFoundError, ValueError):
                    continue  # replaced or half-visible right now: look again next round
                # A part from an interrupted attempt (other step or world size) is ignored until replaced.
                ours = {k: info.get(k) for k in ("step", "world_size", "rank")} == {
                    "step": step, "world_size": self.world_size, "rank": wanted[part]}
                if ours and all(sizes.get(f) == meta["bytes"] for f, meta in info["files"].items()):
                    found[part] = info["files"]
            if len(found) == len(wanted):
                return list(found.values())
            if time.monotonic() > deadline:
                # A rank that never wrote its part is a lost peer, not a bad checkpoint: transient.
                error = TransientError(
                    f"checkpoint {self.storage.show(name)}: part files {sorted(set(wanted) - set(found))} did not "
                    f"appear within {self.commit_timeout_s:g} s; not committed (expected every rank to save this step)")
                self.log(str(error))
                raise error
            if cancel.wait(delay):  # polling for peers, not riding out an outage: no backoff budget here
                raise Superseded()
            delay = min(delay * 2, 1.0)

"""The commit protocol: atomic, asynchronous checkpoints of named tensor sets (sets.py) as sharded
safetensors (layout.py) plus a record (record.py), on any fsspec URL, loadable on any world size,
riding out storage faults. Host copies: snapshot.py; one attempt and the commit: commit.py; what
is kept: retention.py; retries: backoff.py; I/O: storage.py.

Every rank calls `save` at the same step. It copies the sets to host buffers (the only time the
loop is blocked) and returns; a thread writes: rank r writes shards i with i % world_size == r and a
part file listing them; rank 0 waits for every part file, writes state.json, then the COMMITTED
marker. Coordination goes through storage, not collectives: a collective in a thread would race
the loop's own.

Faults (each one line in the log; training goes on):
- storage unreachable: the attempt's own files are removed and it is retried with backoff; a newer
  save supersedes a save still retrying. When no commit has succeeded for `max_outage_s` since the
  first failure, `fault` is set and the loop stops the run with the transient exit code.
- disk full: the attempt's own files are removed at once, the message says how much was needed
  and how much is free, and the next save tries again.
- a checkpoint dir leased by another job (lease.py): no commit.
- a NaN or infinite tensor (the run diverged): no commit; `fault` is set to a DivergedError and the
  loop stops the run with exit 2 (divergence.py). Checked on the host copies, in the writer thread.
A folder without its marker does not exist for the loader; older checkpoints are deleted only after
a newer commit; uncommitted folders and stray temp files are removed by `cleanup`.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Callable, Mapping, Optional, Union

import torch

from tinydist.ckpt import layout
from tinydist.ckpt.backoff import Backoff, Outage
from tinydist.ckpt.commit import Attempt, Committer, Superseded
from tinydist.ckpt.layout import CheckpointError, DamagedCheckpointError, InvalidCheckpointError
from tinydist.ckpt.lease import Lease
from tinydist.ckpt.record import FORMAT, RESERVED, check_committed, folder_step, read_record, sealed, step_folder, \
    versions
from tinydist.ckpt.retention import Retention
from tinydist.ckpt.sets import TensorSet, capture, stage
from tinydist.ckpt.snapshot import HostSets, HostSnapshot, Pending
from tinydist.ckpt.state import TrainState
from tinydist.ckpt.storage import Storage, StorageError, StorageFullError, megabytes
from tinydist.config import DEFAULT_MAX_SHARD_SIZE
from tinydist.config.units import parse_size
from tinydist.runtime.divergence import DivergedError
from tinydist.runtime.peers import Peers

Sets = Mapping[str, Optional[TensorSet]]


class _InFlight:
    """One save's thread and its own flags: a superseded thread may outlive its successor's start."""

    def __init__(self, pending: Pending) -> None:
        self.pending = pending  # the host copies, finished by the thread
        self.thread: Optional[threading.Thread] = None
        self.cancel = threading.Event()  # superseded, or the run is on its way out
        self.retrying = threading.Event()  # failed once already and waiting to retry
        self.written = threading.Event()  # this rank's files and part file are in storage (or it gave up)
        self.error: Optional[BaseException] = None  # for wait() to raise


class Checkpointer:
    """Save and load checkpoints under ``directory`` (a local path or fsspec URL: s3://, gs://, file://).

    Every rank builds one with its ``rank``/``world_size``. ``storage_options`` go to fsspec (e.g.
    ``{"endpoint_url": ...}``). ``lease`` (rank 0) is checked before each commit. Saves run in a
    thread: ``wait()`` before the process exits; ``fault`` is the error that should stop the run.
    """

    def __init__(self, directory: str, *, keep_last: int, max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
                 rank: int = 0, world_size: int = 1, log: Callable[[str], None] = print,
                 commit_timeout_s: float = 1800.0, storage_options: Optional[dict[str, Any]] = None,
                 max_outage_s: float = 1800.0, retry_s: float = 2.0, max_retry_s: float = 60.0,
                 lease: Optional[Lease] = None, peers: Optional[Peers] = None,
                 best_metric: Optional[str] = None, commit_log: Optional[Callable[[str], None]] = None,
                 on_commit: Optional[Callable[[int], None]] = None, share_cpu_tensors: bool = False) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last}; expected at least 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} with world_size={world_size}; expected 0 <= rank < world_size")
        self.storage = Storage(directory, storage_options)
        self.directory = self.storage.url
        self.max_shard_size = parse_size(max_shard_size)
        self.rank, self.world_size, self.log, self.commit_timeout_s = rank, world_size, log, commit_timeout_s
        self.max_outage_s, self.retry_s, self.max_retry_s, self.lease = max_outage_s, retry_s, max_retry_s, lease
        self.peers = peers
        self.retention = Retention(self.storage, keep_last, best_metric, log)
        self._committer = Committer(self.storage, self.retention, rank=rank, world_size=world_size,
                                    max_shard_size=self.max_shard_size, commit_timeout_s=commit_timeout_s,
                                    lease=lease, log=log, commit_log=commit_log)
        self.on_commit = on_commit  # called in the writer thread with the step of each commit (tiers.py)
        self.fault: Optional[BaseException] = None  # set when the run should stop (outage too long, diverged)
        self.last_commit: Optional[int] = None  # step of the newest commit this job made or resumed from
        self.last_error: Optional[BaseException] = None  # the last save's failure, if it failed
        self._outage = Outage()  # shared by the saves: a superseding save inherits the outage's clock
        self._inflight: Optional[_InFlight] = None
        self._snapshot = HostSnapshot(share_cpu_later=share_cpu_tensors)  # see snapshot.py (the local tier)

    @property
    def _host_buffers(self) -> dict[str, torch.Tensor]:
        # What tests/test_cuda.py and bench/gpu.py inspect: the pinned host buffers saves copy into.
        return self._snapshot.buffers

    # ---- saving ------------------------------------------------------------------------------------------
    def snapshot_barrier(self) -> None:
        """Call before every optimizer step: returns at once unless the in-flight save is still copying
        the parameters and optimizer state that this step is about to change."""
        inflight = self._inflight
        if inflight is not None:
            inflight.pending.barrier()

    def estimate_blocked_s(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> float:
        """What a save will block the loop for, measured now by copying the model into the host buffers
        (which the first save then reuses), scaled up for optimizer state not created yet (SGD momentum:
        one tensor per parameter, Adam: two; assume two)."""
        start = time.perf_counter()
        self._snapshot.copy(model.state_dict(), "model/")
        if any(t.is_cuda for t in model.state_dict().values()):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if not optimizer.state:
            return 3.0 * seconds
        optim_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                          if torch.is_tensor(t))
        model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values()) or 1
        return seconds * (1.0 + optim_bytes / model_bytes)

    def save(self, step: int, model: Optional[torch.nn.Module] = None,
             optimizer: Optional[torch.optim.Optimizer] = None, meta: Optional[dict] = None, *,
             blocking: bool = False, ema: Optional[torch.nn.Module] = None, sets: Optional[Sets] = None,
             state: Union[TrainState, dict, None] = None) -> None:
        """Save `sets` (e.g. {"model": m, "optimizer": o, "ema": e}; None values are left out) with
        `state` (a TrainState, or a plain dict for callers outside the loop) as checkpoint `step`.
        The older call `save(step, model, optimizer, meta, ema=e)` saves those three sets with `meta`.

        The sets are copied to host memory (snapshot.py: the loop is not stalled, but must call
        `snapshot_barrier()` before its next optimizer step), then written (and on rank 0 committed) in
        the background. blocking=True (final and preemption saves): return once committed, retrying
        storage faults until `max_outage_s`; raises StorageFullError / TransientError / CheckpointError
        if it could not."""
        sets, state = _sets_and_state(sets, model, optimizer, ema, state, meta)
        self._supersede_or_wait()
        name = step_folder(step)
        label = f"checkpoint {self.storage.show(name)}"
        captures, sections = capture(label, sets)
        record = {**self._caller_state(label, step, state, sections), "step": step, "format": FORMAT,
                  "world_size": self.world_size, "versions": versions(), **sections}
        self.last_error = None
        inflight = self._inflight = _InFlight(self._snapshot.take(captures, blocking))
        inflight.thread = threading.Thread(target=self._run, args=(name, record, blocking, inflight),
                                           name=f"tinydist-checkpoint-{name}", daemon=True)
        inflight.thread.start()
        if blocking:
            if self.peers is not None and self.world_size > 1:
                # Liveness before the commit: rank 0 would otherwise wait the whole commit timeout for
                # the part file of a peer that died mid-save; the barrier names it at once.
                inflight.written.wait()
                self.peers.barrier(f"saving {name}")
            self.wait()

    @staticmethod
    def _caller_state(label: str, step: int, state: Union[TrainState, dict], sections: dict) -> dict:
        if isinstance(state, TrainState):
            if state.step != step:
                raise ValueError(f"{label}: TrainState.step={state.step}; expected the step saved, {step}")
            return state.to_json()
        try:  # a private copy; fails early on what strict JSON cannot hold (state.json is never bare NaN)
            meta = json.loads(json.dumps(state, allow_nan=False))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{label}: meta is not JSON-serialisable ({e}); expected a dict of "
                                  "str/int/float/bool/None/list/dict, finite numbers") from e
        reserved = (*RESERVED, *sections)
        clash = [k for k in meta if k in reserved and not (k == "step" and meta[k] == step)]
        if clash:
            raise CheckpointError(f"{label}: meta uses reserved keys {clash}; expected none of {list(reserved)}")
        return meta

    def _supersede_or_wait(self) -> None:
        """A healthy in-flight save is waited for; one that is retrying after a storage fault is
        superseded by the new one, so the loop never waits on an outage."""
        inflight = self._inflight
        if inflight is not None and inflight.retrying.is_set() and inflight.thread.is_alive():
            inflight.cancel.set()
            inflight.thread.join(timeout=1.0)
            if inflight.thread.is_alive():  # stuck in a network call: let it finish on its own snapshot
                self._snapshot.drop()
            self._inflight = None
            return
        self.wait()

    def writing(self) -> bool:
        """A save's thread is still at work (for the loop's account of what saves cost the steps)."""
        inflight = self._inflight
        return inflight is not None and inflight.thread is not None and inflight.thread.is_alive()

    def wait(self) -> None:
        """Wait for the in-flight save (rank 0: including commit and cleanup); re-raise its error."""
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            inflight.thread.join()
            if inflight.error is not None:
                raise inflight.error

    def close(self, timeout_s: float = 60.0, abandon: bool = False) -> None:
        """On the way out after an error: stop retrying, give a healthy save up to `timeout_s` (none at
        all with `abandon`, e.g. when a peer is lost and its part file will never come). Never raises."""
        inflight, self._inflight = self._inflight, None
        if inflight is None:
            return
        if abandon or inflight.retrying.is_set():
            inflight.cancel.set()
        inflight.thread.join(timeout=timeout_s)
        if inflight.thread.is_alive():
            inflight.cancel.set()
            inflight.thread.join(timeout=5.0)
        if inflight.thread.is_alive():
            self.log("an in-flight checkpoint save was abandoned on the way out; the previous commit stays the newest")

    def _run(self, name: str, record: dict, final: bool, inflight: _InFlight) -> None:
        try:
            self._attempts(name, inflight.pending.result(), record, final, inflight)
        except BaseException as e:  # noqa: BLE001 - the snapshot failed (a bug): re-raised by wait()
            inflight.error = self.last_error = e
        finally:
            inflight.pending.copied.set()
            inflight.written.set()  # whatever happened: nobody may wait on it any longer

    def _attempts(self, name: str, host: HostSets, record: dict, final: bool, inflight: _InFlight) -> None:
        backoff = Backoff(max_outage_s=self.max_outage_s, retry_s=self.retry_s, max_retry_s=self.max_retry_s,
                          outage=self._outage)
        while True:
            attempt = Attempt(self.storage, name, remove_empty_folder=self.world_size == 1)
            try:
                if self._committer.write(attempt, host, record, inflight.cancel, inflight.written):
                    self.last_commit = record["step"]
                    if self.on_commit is not None:
                        self.on_commit(record["step"])
                backoff.succeeded()
                return
            except Superseded:
                attempt.undo()
                return
            except StorageFullError as e:
                attempt.undo()
                self.last_error = e
                self._full_disk(name, host, final)
                if final:
                    inflight.error = e
                return
            except StorageError as e:
                attempt.undo()
                self.last_error = e
                wait = backoff.after_failure()
                if wait is None:
                    self.fault = backoff.gave_up(self.directory, e)
                    self.log(f"error: {self.fault}")
                    if final:
                        inflight.error = self.fault
                    return
                self.log(f"checkpoint {self.storage.show(name)}: save failed ({e}); retrying in {wait:.3g} s, "
                         f"training goes on (storage failing for {backoff.down_s:.0f} s)")
                inflight.retrying.set()
                if inflight.cancel.wait(wait):
                    return
            except DivergedError as e:
                attempt.undo()
                inflight.error = self.last_error = self.fault = e  # the loop stops (and says so) at its next boundary
                return
            except BaseException as e:  # noqa: BLE001 - CheckpointError, a lost lease, a bug: re-raised by wait()
                attempt.undo()
                inflight.error = self.last_error = e
                return

    def _full_disk(self, name: str, host: HostSets, final: bool) -> None:
        needed = sum(t.numel() * t.element_size() for tensors in host.values() for t in tensors.values())
        free = self.storage.free_bytes()
        self.log(f"warning: checkpoint {self.storage.show(name)} not saved: no space left on device "
                 f"(needs about {megabytes(needed)} per checkpoint, "
                 f"{megabytes(free) + ' free' if free is not None else 'free space unknown'}); "
                 "what it wrote is removed" + ("" if final else "; training goes on and the next save tries again"))

    # ---- housekeeping (retention.py) ---------------------------------------------------------------------
    def cleanup(self, everything_uncommitted: bool = False) -> None:
        """See Retention.cleanup: old commits beyond keep_last (the best stays), uncommitted folders
        (all of them with `everything_uncommitted`: at start, under the lease), stray temp files."""
        self.retention.cleanup(everything_uncommitted)

    def best(self) -> Optional[str]:
        """The committed checkpoint with the highest `best_metric` (ties: the newer), if any was scored."""
        name = self.retention.best()
        return self.storage.show(name) if name else None

    def committed(self) -> list[str]:
        """Committed checkpoint paths (folders with their marker), oldest first; checksums not checked."""
        return [self.storage.show(name) for name in self.retention.committed()]

    # ---- finding and loading -----------------------------------------------------------------------------
    def _latest(self, older_than: Optional[int] = None) -> Optional[tuple[str, dict]]:
        for step, name in reversed(self.retention.step_folders()):
            if older_than is not None and step >= older_than:
                continue
            try:
                record = check_committed(self.storage, name)
            except InvalidCheckpointError:
                raise  # edited, not damaged: refuse rather than fall back silently
            except CheckpointError as e:
                self.log(f"skipping {e}")
                continue
            return self.storage.show(name), record
        return None

    def latest(self, older_than: Optional[int] = None) -> Optional[str]:
        """Newest committed checkpoint (below step `older_than`) whose marker, state.json and file sizes
        check out, without downloading its tensors (record.check_committed); every damaged one is
        skipped with one line. One that is sealed but invalid (edited) raises InvalidCheckpointError."""
        found = self._latest(older_than)
        return found[0] if found else None

    def read_record(self, path: str) -> dict:
        """state.json of the checkpoint at `path`, checked against its marker and schema; no tensor read."""
        storage, name = layout.locate(path, self.storage)
        return check_committed(storage, name)

    def load_latest(self, model: Optional[torch.nn.Module] = None, optimizer: Optional[torch.optim.Optimizer] = None,
                    ema: Optional[torch.nn.Module] = None, *, sets: Optional[Sets] = None,
                    check: Optional[Callable[[str, dict], Any]] = None) -> Optional[tuple[str, dict]]:
        """Load the newest checkpoint that verifies while it is read; (path, state.json), or None when
        there is none. `check(path, record)` runs on each candidate's record before any tensor is read
        (restore.py: the state against the config); what it raises propagates. Damage that only a full
        read finds (bit rot inside a shard) falls back to the next older checkpoint, with one line;
        anything else (edited, does not fit the model) raises."""
        sets = _sets_only(sets, model, optimizer, ema)
        older_than: Optional[int] = None
        while (found := self._latest(older_than)) is not None:
            path, record = found
            if check is not None:
                check(path, record)
            try:
                return path, self.load(path, sets=sets, record=record)
            except DamagedCheckpointError as e:
                self.log(f"skipping {e}")
                older_than = folder_step(path)
        return None

    def load(self, path: str, model: Optional[torch.nn.Module] = None,
             optimizer: Optional[torch.optim.Optimizer] = None, ema: Optional[torch.nn.Module] = None, *,
             sets: Optional[Sets] = None, record: Optional[dict] = None) -> dict:
        """Load ``path`` into the sets given (``model`` strictly, ``optimizer``, and ``ema`` when the
        checkpoint kept one; otherwise it is left as it is), every file verified as it is read, every
        set checked before any is touched; return state.json. `record`: state.json as already read
        and checked (load_latest)."""
        sets = _sets_only(sets, model, optimizer, ema)
        storage, name = layout.locate(path, self.storage)
        if record is None:
            record = read_record(storage, name)
        for load in stage(sealed(storage, name, record), record, sets):
            load()
        return record


def _sets_only(sets: Optional[Sets], model: Optional[torch.nn.Module], optimizer: Optional[torch.optim.Optimizer],
               ema: Optional[torch.nn.Module]) -> Sets:
    if sets is None:
        return {"model": model, "optimizer": optimizer, "ema": ema}
    if model is not None or optimizer is not None or ema is not None:
        raise TypeError("pass either sets={...} or model/optimizer/ema, not both")
    return sets


def _sets_and_state(sets: Optional[Sets], model: Optional[torch.nn.Module],
                    optimizer: Optional[torch.optim.Optimizer], ema: Optional[torch.nn.Module],
                    state: Union[TrainState, dict, None], meta: Optional[dict]) -> tuple[Sets, Union[TrainState, dict]]:
    if state is not None and meta is not None:
        raise TypeError("save(): pass either state= or meta, not both")
    return _sets_only(sets, model, optimizer, ema), state if state is not None else (meta or {})

"""The commit protocol: sharded safetensors checkpoints, atomic and asynchronous, on any fsspec URL,
loadable on any world size, that ride out storage faults (format: ckpt_format.py; I/O: storage.py).

Every rank calls `save` at the same step. It copies the state to host buffers (the only time the
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

import datetime
import hashlib
import json
import threading
import time
from typing import Any, Callable, Optional

import torch
from huggingface_hub import split_torch_state_dict_into_shards

from tinydist.ckpt import layout as fmt
from tinydist.ckpt.layout import MARKER, STATE, CheckpointError, step_folder
from tinydist.runtime.divergence import DivergedError, nonfinite_tensors
from tinydist.runtime.exitcodes import TransientError
from tinydist.ckpt.lease import Lease
from tinydist.runtime.peers import Peers
from tinydist.ckpt.storage import TMP_TAG, Storage, StorageError, StorageFullError, StorageRefusedError, megabytes
from tinydist.config.units import parse_size

from tinydist.config import DEFAULT_MAX_SHARD_SIZE

__all__ = ["Checkpointer", "CheckpointError", "DEFAULT_MAX_SHARD_SIZE"]
EMA_KEY = "\0ema/"  # prefix of EMA tensors inside a snapshot; no parameter or state name holds a NUL


class _Superseded(Exception):
    """A newer save replaced this one while it was retrying."""


class _InFlight:
    """One save's thread and its own flags: a superseded thread may outlive its successor's start."""

    def __init__(self) -> None:
        self.thread: Optional[threading.Thread] = None
        self.cancel = threading.Event()  # superseded, or the run is on its way out
        self.retrying = threading.Event()  # failed once already and waiting to retry
        self.written = threading.Event()  # this rank's files and part file are in storage (or it gave up)
        self.snapshot = threading.Event()  # parameters and optimizer state are copied to host memory
        self.cuda_done: Optional[Any] = None  # on a GPU: the event that marks the end of those copies
        self.error: Optional[BaseException] = None  # for wait() to raise


class _Attempt:
    """What one save attempt of this rank wrote, so that a failed attempt can remove exactly that."""

    def __init__(self, storage: Storage, folder: str, remove_empty_folder: bool) -> None:
        self.storage, self.folder, self.remove_empty_folder = storage, folder, remove_empty_folder
        self.written: list[str] = []

    def write(self, name: str, data: bytes) -> None:
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
                 best_metric: Optional[str] = None) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last}; expected at least 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} with world_size={world_size}; expected 0 <= rank < world_size")
        self.storage = Storage(directory, storage_options)
        self.directory = self.storage.url
        self.keep_last, self.max_shard_size = keep_last, parse_size(max_shard_size)
        self.rank, self.world_size, self.log, self.commit_timeout_s = rank, world_size, log, commit_timeout_s
        self.max_outage_s, self.retry_s, self.max_retry_s, self.lease = max_outage_s, retry_s, max_retry_s, lease
        self.peers = peers
        self.best_metric = best_metric  # keep the commit with the highest meta["metrics"][best_metric] too
        self._metric_of: dict[str, Optional[float]] = {}  # folder -> its metric, read once per folder
        self.fault: Optional[BaseException] = None  # set when the run should stop (outage too long, diverged)
        self.last_commit: Optional[int] = None  # step of the newest commit this job made or resumed from
        self.last_error: Optional[BaseException] = None  # the last save's failure, if it failed
        self._failing_since: Optional[float] = None  # first failure since the last good save
        self._inflight: Optional[_InFlight] = None
        self._host_buffers: dict[str, torch.Tensor] = {}

    # ---- saving ------------------------------------------------------------------------------------------
    def _to_host(self, tensors: dict[str, torch.Tensor], prefix: str,
                 buffers: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
        """Copy into host buffers reused from save to save (fresh ones would cost page faults on the
        CPU, pinned allocations on a GPU). On a GPU the copies are only queued (non-blocking, on the
        caller's current stream): the caller orders and waits for them with events."""
        buffers = self._host_buffers if buffers is None else buffers
        out = {}
        for key, t in tensors.items():
            t = t.detach()
            buf = buffers.get(prefix + key)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.device.type == "cuda")
                buffers[prefix + key] = buf
            out[key] = buf.copy_(t, non_blocking=t.device.type == "cuda")
        return out

    def _snapshot(self, model: torch.nn.Module, optim_tensors: dict[str, torch.Tensor], blocking: bool,
                  inflight: "_InFlight") -> Callable[[], tuple[dict, dict]]:
        """Take the state to host memory without stalling the loop (CheckFreq, FAST'21).

        The forward changes only the BN buffers: they are copied now. Parameters and optimizer state
        change only at the next optimizer step: they are copied while the next forward and backward run
        (a side CUDA stream, or on the CPU the writer thread), and the loop calls `snapshot_barrier()`
        before that step. Returns what the writer thread calls to get the finished host copies."""
        state = model.state_dict()
        buffer_names = {name for name, _ in model.named_buffers()}
        now = {k: v for k, v in state.items() if k in buffer_names}
        later = {k: v for k, v in state.items() if k not in buffer_names}
        buffers = self._host_buffers  # this save's: a superseded one keeps its own
        order = list(state)

        def assemble(first: dict, second: dict, optim: dict) -> tuple[dict, dict]:
            merged = {**first, **second}
            return {k: merged[k] for k in order}, optim

        if any(t.is_cuda for t in state.values()):
            side = self._side_stream = getattr(self, "_side_stream", None) or torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())  # copy what the last optimizer step wrote
            with torch.cuda.stream(side):
                now_host = self._to_host(now, "model/", buffers)
            torch.cuda.current_stream().wait_stream(side)  # the next forward's BN update waits, on the GPU only
            with torch.cuda.stream(side):
                later_host = self._to_host(later, "model/", buffers)
                optim_host = self._to_host(optim_tensors, "optimizer/", buffers)
            done = torch.cuda.Event()
            done.record(side)
            inflight.cuda_done = done
            inflight.snapshot.set()
            if blocking:
                done.synchronize()

            def finish_cuda() -> tuple[dict, dict]:
                done.synchronize()
                return assemble(now_host, later_host, optim_host)
            return finish_cuda

        now_host = self._to_host(now, "model/", buffers)
        if blocking:  # nothing runs meanwhile: copy everything here
            rest = self._to_host(later, "model/", buffers), self._to_host(optim_tensors, "optimizer/", buffers)
            inflight.snapshot.set()
            return lambda: assemble(now_host, *rest)

        def finish_cpu() -> tuple[dict, dict]:
            try:
                later_host = self._to_host(later, "model/", buffers)
                optim_host = self._to_host(optim_tensors, "optimizer/", buffers)
            finally:
                inflight.snapshot.set()
            return assemble(now_host, later_host, optim_host)
        return finish_cpu

    def snapshot_barrier(self) -> None:
        """Call before every optimizer step: returns at once unless the in-flight save is still copying
        the parameters and optimizer state that this step is about to change."""
        inflight = self._inflight
        if inflight is None:
            return
        if inflight.cuda_done is not None:
            torch.cuda.current_stream().wait_event(inflight.cuda_done)  # the GPU waits, not the host
        else:
            inflight.snapshot.wait()

    def estimate_blocked_s(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> float:
        """What a save will block the loop for, measured now by copying the model into the host buffers
        (which the first save then reuses), scaled up for optimizer state not created yet (SGD momentum:
        one tensor per parameter, Adam: two; assume two)."""
        start = time.perf_counter()
        self._to_host(model.state_dict(), "model/")
        if any(t.is_cuda for t in model.state_dict().values()):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if not optimizer.state:
            return 3.0 * seconds
        optim_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                          if torch.is_tensor(t))
        model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values()) or 1
        return seconds * (1.0 + optim_bytes / model_bytes)

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             meta: dict, *, blocking: bool = False, ema: Optional[torch.nn.Module] = None) -> None:
        """Snapshot model + optimizer to host memory (see `_snapshot`: the loop is not stalled, but must call
        `snapshot_barrier()` before its next optimizer step), then write (and on rank 0 commit) in the background.
        blocking=True (final and preemption saves): return once committed, retrying storage faults until
        `max_outage_s`; raises StorageFullError / TransientError / CheckpointError if it could not.
        `ema` (the weights' moving average, ema.py) is saved as a third sharded set: it changes only
        after an optimizer step, so it is copied with the optimizer state."""
        self._supersede_or_wait()
        name = step_folder(step)
        where = self.storage.show(name)
        try:  # a private copy; fails early on what strict JSON cannot hold (state.json is never bare NaN)
            meta = json.loads(json.dumps(meta, allow_nan=False))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {where}: meta is not JSON-serialisable ({e}); "
                                  "expected a dict of str/int/float/bool/None/list/dict, finite numbers") from e
        clash = [k for k in fmt.RESERVED if k in meta and not (k == "step" and meta[k] == step)]
        if clash:
            raise CheckpointError(f"checkpoint {where}: meta uses reserved keys {clash}; "
                                  f"expected none of {list(fmt.RESERVED)}")
        optim_tensors, optim_json = fmt.flatten_optimizer(where, model, optimizer)
        if ema is not None:  # "ema/" keys ride with the optimizer's and are split out by the writer
            optim_tensors = {**optim_tensors, **{f"{EMA_KEY}{k}": v for k, v in ema.state_dict().items()}}
        state = {**meta, "step": step, "format": fmt.FORMAT, "world_size": self.world_size,
                 "versions": fmt.versions(), "optimizer": optim_json}
        self.last_error = None
        inflight = self._inflight = _InFlight()
        snapshot = self._snapshot(model, optim_tensors, blocking, inflight)
        inflight.thread = threading.Thread(target=self._run, args=(name, snapshot, state, blocking, inflight),
                                           name=f"tinydist-checkpoint-{name}", daemon=True)
        inflight.thread.start()
        if blocking:
            if self.peers is not None and self.world_size > 1:
                # Liveness before the commit: rank 0 would otherwise wait the whole commit timeout for
                # the part file of a peer that died mid-save; the barrier names it at once.
                inflight.written.wait()
                self.peers.barrier(f"saving {name}")
            self.wait()

    def _supersede_or_wait(self) -> None:
        """A healthy in-flight save is waited for; one that is retrying after a storage fault is
        superseded by the new one, so the loop never waits on an outage."""
        inflight = self._inflight
        if inflight is not None and inflight.retrying.is_set() and inflight.thread.is_alive():
            inflight.cancel.set()
            inflight.thread.join(timeout=1.0)
            if inflight.thread.is_alive():  # stuck in a network call: let it finish on its own snapshot
                self._host_buffers = {}
            self._inflight = None
            return
        self.wait()

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

    def _run(self, name: str, snapshot: Callable[[], tuple[dict, dict]], state: dict, final: bool,
             inflight: _InFlight) -> None:
        try:
            model, optim = snapshot()
            self._attempts(name, model, optim, state, final, inflight)
        except BaseException as e:  # noqa: BLE001 - the snapshot failed (a bug): re-raised by wait()
            inflight.error = self.last_error = e
        finally:
            inflight.snapshot.set()
            inflight.written.set()  # whatever happened: nobody may wait on it any longer

    def _attempts(self, name: str, model: dict, optim: dict, state: dict, final: bool, inflight: _InFlight) -> None:
        delay, cancel = self.retry_s, inflight.cancel
        while True:
            attempt = _Attempt(self.storage, name, remove_empty_folder=self.world_size == 1)
            try:
                self._write_and_commit(attempt, name, model, optim, state, inflight)
                self._failing_since = None
                return
            except _Superseded:
                attempt.undo()
                return
            except StorageFullError as e:
                attempt.undo()
                self.last_error = e
                self._full_disk(name, model, optim, final)
                if final:
                    inflight.error = e
                return
            except StorageError as e:
                attempt.undo()
                now = time.monotonic()
                self._failing_since = self._failing_since or now
                self.last_error = e
                down = now - self._failing_since
                if down >= self.max_outage_s:
                    self.fault = TransientError(
                        f"no checkpoint committed to {self.directory} for {down:.0f} s of storage faults "
                        f"(checkpoint.max_outage_s={self.max_outage_s:g}); last: {e}")
                    self.log(f"error: {self.fault}")
                    if final:
                        inflight.error = self.fault
                    return
                self.log(f"checkpoint {self.storage.show(name)}: save failed ({e}); retrying in {delay:.0f} s, "
                         f"training goes on (storage failing for {down:.0f} s)")
                inflight.retrying.set()
                if cancel.wait(delay):
                    return
                delay = min(delay * 2, self.max_retry_s)
            except DivergedError as e:
                attempt.undo()
                inflight.error = self.last_error = self.fault = e  # the loop stops (and says so) at its next boundary
                return
            except BaseException as e:  # noqa: BLE001 - CheckpointError, a lost lease, a bug: re-raised by wait()
                attempt.undo()
                inflight.error = self.last_error = e
                return

    def _full_disk(self, name: str, model: dict, optim: dict, final: bool) -> None:
        needed = sum(t.numel() * t.element_size() for t in (*model.values(), *optim.values()))
        free = self.storage.free_bytes()
        self.log(f"warning: checkpoint {self.storage.show(name)} not saved: no space left on device "
                 f"(needs about {megabytes(needed)} per checkpoint, "
                 f"{megabytes(free) + ' free' if free is not None else 'free space unknown'}); "
                 "what it wrote is removed" + ("" if final else "; training goes on and the next save tries again"))

    def _write_and_commit(self, attempt: _Attempt, name: str, model: dict, optim: dict, state: dict,
                          inflight: _InFlight) -> None:
        t0, cancel = time.monotonic(), inflight.cancel
        if self._is_committed(name):  # e.g. saved again right after a resume: never rewrite a good checkpoint
            if self.rank == 0:
                self.log(f"checkpoint {self.storage.show(name)} is already committed; not saving it again")
            self.last_commit = state["step"]
            return
        self.storage.makedirs(name)
        part = f"part-{self.rank:05d}.json"
        self.storage.remove(f"{name}/{part}")  # left by an interrupted attempt: must not pass for this one
        files: dict[str, dict[str, Any]] = {}
        ema = {k[len(EMA_KEY):]: v for k, v in optim.items() if k.startswith(EMA_KEY)}
        optim = {k: v for k, v in optim.items() if not k.startswith(EMA_KEY)}
        for prefix, tensors in (("model", model), ("optimizer", optim), ("ema", ema)):
            if not tensors and prefix == "ema":
                continue
            # Every rank checks all of a set (not only its own shards): each rank then stops on its own
            # finding, and no rank commits what another found poisoned.
            bad = nonfinite_tensors(tensors)
            if bad:
                raise DivergedError(f"{len(bad)} {prefix} tensor(s) hold NaN or infinity at step {state['step']} "
                                    f"(first: {bad[0]}); checkpoint {self.storage.show(name)} not committed",
                                    state["step"])
            split = split_torch_state_dict_into_shards(tensors, filename_pattern=prefix + "{suffix}.safetensors",
                                                       max_shard_size=self.max_shard_size)
            for i, (filename, keys) in enumerate(sorted(split.filename_to_tensors.items())):
                if i % self.world_size == self.rank:
                    if cancel.is_set():
                        raise _Superseded()
                    parts = fmt.safetensors_parts({k: tensors[k] for k in keys}, metadata={"format": "pt"})
                    digest = hashlib.sha256()
                    for piece in parts:  # hashlib and the file writes let go of the GIL; the loop runs on
                        digest.update(piece)
                    files[filename] = {"sha256": digest.hexdigest(), "bytes": sum(len(p) for p in parts)}
                    attempt.write(filename, parts)
            if self.rank == 0:
                index = {"metadata": {"total_size": split.metadata["total_size"]},
                         "weight_map": dict(sorted(split.tensor_to_filename.items()))}
                data = (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()
                files[f"{prefix}.safetensors.index.json"] = {"sha256": fmt.sha256(data), "bytes": len(data)}
                attempt.write(f"{prefix}.safetensors.index.json", data)
        part_data = {"step": state["step"], "world_size": self.world_size, "rank": self.rank, "files": files}
        attempt.write(part, json.dumps(part_data, indent=2).encode())
        inflight.written.set()
        if self.rank != 0:
            return
        for other in self._wait_for_parts(name, state["step"], cancel):
            files.update(other)
        if cancel.is_set():
            raise _Superseded()
        if self.lease is not None:
            self.lease.check()
        state["saved_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        state["files"] = dict(sorted(files.items()))
        data = (json.dumps(state, indent=2, allow_nan=False) + "\n").encode()
        attempt.write(STATE, data)
        self.storage.write(f"{name}/{MARKER}", (fmt.sha256(data) + "\n").encode())
        self.last_commit = state["step"]
        size = sum(f["bytes"] for f in files.values()) / 1e6
        self.log(f"checkpoint {self.storage.show(name)} committed: {len(files)} files, {size:.1f} MB, "
                 f"{time.monotonic() - t0:.1f} s after save()")
        try:
            self.cleanup()
        except (StorageError, StorageRefusedError) as e:  # the commit stands; leftovers go at the next cleanup
            self.log(f"could not clean up {self.directory} after the commit ({e})")

    def _wait_for_parts(self, name: str, step: int, cancel: threading.Event) -> list[dict]:
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
            if cancel.wait(delay):
                raise _Superseded()
            delay = min(delay * 2, 1.0)

    # ---- housekeeping ------------------------------------------------------------------------------------
    def _step_folders(self) -> list[tuple[int, str]]:
        """(step, name) of every step-* folder, committed or not, oldest first."""
        found = [(m, name) for name in self.storage.sizes() if (m := fmt.STEP_DIR.match(name))]
        return sorted((int(m.group(1)), name) for m, name in found)

    def _is_committed(self, name: str) -> bool:
        return self.storage.exists(f"{name}/{MARKER}")

    def cleanup(self, everything_uncommitted: bool = False) -> None:
        """Drop committed checkpoints beyond keep_last, uncommitted folders and stray temp files.
        Uncommitted folders newer than the newest commit may be another rank's save in flight, so
        they are kept unless `everything_uncommitted` (at start, under the lease, nothing is in flight)."""
        folders = [(step, name, self._is_committed(name)) for step, name in self._step_folders()]
        committed = [name for _, name, ok in folders if ok]
        newest = max((step for step, _, ok in folders if ok), default=-1)
        keep = set(committed[-self.keep_last:]) | {self._best_name(committed)} - {None}
        for step, name, ok in folders:
            stale = not ok and (step < newest or everything_uncommitted)
            if (ok and name not in keep) or stale:
                if ok:  # marker first: a half-deleted checkpoint must never look committed
                    self.storage.remove(f"{name}/{MARKER}")
                self.storage.remove(name, recursive=True)
                self._metric_of.pop(name, None)
                if stale:
                    self.log(f"removed uncommitted {self.storage.show(name)} (an interrupted or failed save)")
            elif ok and self.storage.local:
                for entry in self.storage.sizes(name):
                    if TMP_TAG in entry:
                        self.storage.remove(f"{name}/{entry}")
        if self.storage.local:
            for entry in self.storage.sizes():
                if TMP_TAG in entry:
                    self.storage.remove(entry)

    def _metric(self, name: str) -> Optional[float]:
        """The best_metric recorded in a committed folder's state.json (None: not evaluated at that step)."""
        if name not in self._metric_of:
            try:
                value = fmt.read_state(self.storage, name).get("metrics", {}).get(self.best_metric)
            except (CheckpointError, AttributeError):
                value = None
            self._metric_of[name] = float(value) if isinstance(value, (int, float)) and not isinstance(
                value, bool) and value == value else None
        return self._metric_of[name]

    def _best_name(self, committed: list[str]) -> Optional[str]:
        if not self.best_metric:
            return None
        scored = [(self._metric(name), step, name) for step, name in
                  ((int(fmt.STEP_DIR.match(n).group(1)), n) for n in committed)]
        scored = [entry for entry in scored if entry[0] is not None]
        return max(scored)[2] if scored else None  # ties: the later step

    def best(self) -> Optional[str]:
        """The committed checkpoint with the highest `best_metric` (ties: the newer), if any was scored."""
        name = self._best_name([n for _, n in self._step_folders() if self._is_committed(n)])
        return self.storage.show(name) if name else None

    # ---- finding and loading -----------------------------------------------------------------------------
    def committed(self) -> list[str]:
        """Committed checkpoint paths (folders with their marker), oldest first; checksums not checked."""
        return [self.storage.show(name) for _, name in self._step_folders() if self._is_committed(name)]

    def latest(self, older_than: Optional[int] = None) -> Optional[str]:
        """Newest committed checkpoint (below step `older_than`) whose marker, state.json and file sizes
        check out, without downloading its tensors (ckpt_format.check_committed); every damaged one is
        skipped with one line. One that is sealed but invalid (edited) raises InvalidCheckpointError."""
        for step, name in reversed(self._step_folders()):
            if older_than is not None and step >= older_than:
                continue
            try:
                fmt.check_committed(self.storage, name)
            except fmt.InvalidCheckpointError:
                raise  # edited, not damaged: refuse rather than fall back silently
            except CheckpointError as e:
                self.log(f"skipping {e}")
                continue
            return self.storage.show(name)
        return None

    def load_latest(self, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer],
                    ema: Optional[torch.nn.Module] = None) -> Optional[tuple[str, dict]]:
        """Load the newest checkpoint that verifies while it is read; (path, state.json), or None when
        there is none. Damage that only a full read finds (bit rot inside a shard) falls back to the
        next older checkpoint, with one line; anything else (edited, does not fit the model) raises."""
        older_than: Optional[int] = None
        while (path := self.latest(older_than)) is not None:
            try:
                return path, self.load(path, model, optimizer, ema)
            except fmt.DamagedCheckpointError as e:
                self.log(f"skipping {e}")
                older_than = int(fmt.STEP_DIR.match(path.rstrip("/").rpartition("/")[2]).group(1))
        return None

    def _locate(self, path: str) -> tuple[Storage, str]:
        """A checkpoint path (URL or plain, in this directory or elsewhere) -> its storage and folder name."""
        parent, _, name = path.rstrip("/").rpartition("/")
        if path.rstrip("/") in (self.storage.show(name), self.storage.path(name)):
            return self.storage, name
        return Storage(parent or "."), name

    def load(self, path: str, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer],
             ema: Optional[torch.nn.Module] = None) -> dict:
        """Load ``path`` into ``model`` (strict), ``optimizer`` and ``ema`` (when the checkpoint kept one;
        otherwise `ema` is left as it is), every file verified as it is read; return state.json."""
        storage, name = self._locate(path)
        state = fmt.read_state(storage, name)
        saved = fmt.load_tensors(storage, name, state, "model")
        check_fits(path, saved, model.state_dict())
        # Everything is validated before anything is touched: a failed load leaves model and optimizer as they were.
        optimizer_state, ema_saved = None, None
        if optimizer is not None:
            tensors = fmt.load_tensors(storage, name, state, "optimizer")
            optimizer_state = fmt.unflatten_optimizer(path, state["optimizer"], tensors, model, optimizer)
        if ema is not None and "ema" in fmt.tensor_sets(state):
            ema_saved = fmt.load_tensors(storage, name, state, "ema")
            check_fits(path, ema_saved, ema.state_dict())
        model.load_state_dict(saved, strict=True)  # copies into the model's tensors, whatever their device
        if optimizer is not None:
            optimizer.load_state_dict(optimizer_state)  # casts to each param's device (and dtype, except step)
        if ema_saved is not None:
            ema.load_state_dict(ema_saved, strict=True)
        return state


def check_fits(path: str, saved: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Saved tensors must be exactly the module's state_dict: same keys, shapes and dtypes."""
    hint = "saved with another model.stem or number of classes?"
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path}: model tensors missing from the checkpoint {missing[:3]} "
                              f"({len(missing)} in all), unexpected {unexpected[:3]} ({len(unexpected)} in all); "
                              f"expected exactly the model's state_dict keys ({hint})")
    for key, want in expected.items():
        got = saved[key]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise CheckpointError(f"checkpoint {path}: tensor {key} has shape {tuple(got.shape)} {got.dtype} in "
                                  f"the checkpoint but the model expects {tuple(want.shape)} {want.dtype}; {hint}")

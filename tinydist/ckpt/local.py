"""The local tier: a checkpoint every `checkpoint.local_every_steps` in a folder on this machine.

Most failures kill a process and leave its machine up (a segfault, the OOM killer, a driver or NCCL
error, a SIGKILL): a checkpoint in `/dev/shm` or on a local NVMe survives those, and resuming from it
redoes at most one step. It does not survive the machine; the durable tier (`checkpoint.dir`) does.

Under DDP every replica holds the whole state, so each machine's first process writes a whole
checkpoint on its own (a one-process Checkpointer: the same format, commit marker and checks as
`checkpoint.dir`, the last 2 kept), into `{local_dir}/{run id}`: two jobs on one machine never touch
each other's. A save waits for the previous one (so a crash finds the step before the last one
committed at worst) but never for storage faults: a local tier that cannot be written (a full
`/dev/shm`, a read-only path) costs one warning and is switched off; the run goes on with the durable
tier alone. `progress` records the last step finished, so a resume can say how many steps it redoes.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from typing import Callable, Optional

from tinydist.ckpt.checkpointer import Checkpointer, Sets
from tinydist.ckpt.layout import CheckpointError
from tinydist.ckpt.record import check_committed, folder_step, step_folder
from tinydist.ckpt.state import TrainState
from tinydist.ckpt.storage import Storage, StorageError, StorageRefusedError
from tinydist.config import ConfigError
from tinydist.runtime.divergence import DivergedError
from tinydist.runtime.exitcodes import PermanentError, TransientError
from tinydist.runtime.quote import first_line

RUN_FILE = "RUN.json"  # in checkpoint.dir: the run's identity, which its local-tier checkpoints carry
PROGRESS = "progress.json"  # in the local run folder: the last step the run finished
KEEP = 2


def run_identity(durable: Storage, fresh: bool) -> str:
    """The run id kept in `{checkpoint.dir}/RUN.json`, made when the run starts fresh (`fresh`: no
    committed checkpoint will be resumed) or the file is missing. Rank 0, under the lease. A local
    checkpoint of another run (an older job on this machine, or a checkpoint.dir wiped since) carries
    another id and is never resumed."""
    if not fresh:
        try:
            found = json.loads(durable.read(RUN_FILE)).get("run_id")
            if isinstance(found, str) and found:
                return found
        except (FileNotFoundError, ValueError, AttributeError):
            pass  # missing or unreadable: this run gets a new identity (no local checkpoint matches it)
    run_id = secrets.token_hex(8)
    durable.write(RUN_FILE, (json.dumps({"run_id": run_id, "created": time.time()}) + "\n").encode())
    return run_id


def read_run_id(durable: Storage) -> str:
    """The run id rank 0 wrote (run_identity), read by the other ranks after it."""
    try:
        found = json.loads(durable.read(RUN_FILE)).get("run_id")
    except (FileNotFoundError, ValueError, AttributeError):
        found = None
    if not isinstance(found, str) or not found:
        raise TransientError(f"{durable.show(RUN_FILE)} cannot be read after rank 0 wrote it; a relaunch reads it again")
    return found


class LocalTier:
    """This machine's local checkpoints of run `run_id`. Every rank reads them (restore); the machine's
    first process (`writer`) saves them."""

    def __init__(self, local_dir: str, run_id: str, every_steps: int, *, writer: bool, max_shard_size: str | int,
                 log: Callable[[str], None], warn: Optional[Callable[[str], None]] = None,
                 on_commit: Optional[Callable[[int], None]] = None) -> None:
        self.root, self.run_id, self.every_steps, self.writer = local_dir.rstrip("/"), run_id, every_steps, writer
        self.folder = f"{self.root}/{run_id}"
        self.log = log
        self.warn = warn or log  # every machine's writer says its own switch-off, not only the main process
        self.checkpointer = Checkpointer(self.folder, keep_last=KEEP, max_shard_size=max_shard_size, log=self._heard,
                                         max_outage_s=0.0, retry_s=0.0, commit_log=_quiet, on_commit=on_commit,
                                         share_cpu_tensors=True)
        self.failed: Optional[str] = None  # why it was switched off (this machine)
        self.fault: Optional[DivergedError] = None  # what stops the run: a non-finite tensor found in a save
        self._reading = True  # while restoring, what the checkpointer says (a skipped damaged one) is said

    def _heard(self, line: str) -> None:
        if self._reading:
            self.log(f"local tier: {line}")
        # While saving, problems are read from the save's outcome (`_settle`), said once.

    def clean_start(self) -> None:
        """Remove what a job killed mid-save left here (one job per run: the lease makes it ours alone)."""
        if self.writer:
            try:
                self.checkpointer.cleanup(everything_uncommitted=True)
            except (StorageError, StorageRefusedError, OSError) as e:
                self._switch_off(e)

    # ---- saving ------------------------------------------------------------------------------------------
    def save(self, step: int, sets: Sets, state: TrainState) -> bool:
        """Start a save of `step` in the background (the previous one has committed: `snapshot_barrier`);
        False if the tier is off (or just failed)."""
        if not self.writer or self.failed is not None:
            return False
        self._reading = False
        self._settle()
        if self.failed is None:
            try:
                self.checkpointer.save(step, sets=sets, state=state, blocking=False)
            except (PermanentError, TransientError, OSError) as e:
                self._switch_off(e)
        return self.failed is None

    def snapshot_barrier(self) -> None:
        """Before each optimizer step: the previous local save committed, not only copied. So when step F's
        update is done, step F-1 is committed: a crash at any moment resumes at most one step behind the
        last step finished. (A save that takes longer than a step holds the loop here; raise
        checkpoint.local_every_steps then.)"""
        if self.writer and self.failed is None:
            self._settle()

    def _settle(self) -> None:
        """Wait for the save in flight; switch the tier off on its storage fault, keep a divergence."""
        try:
            self.checkpointer.wait()
        except DivergedError as e:
            self.fault = e
        except (PermanentError, TransientError, OSError) as e:
            self._switch_off(e)
            return
        error = self.checkpointer.last_error  # a full disk or an outage is logged, not raised, by a checkpointer
        if error is not None and not isinstance(error, DivergedError):
            self._switch_off(error)

    def _switch_off(self, error: BaseException) -> None:
        if self.failed is None:
            self.failed = first_line(error)
            self.warn(f"warning: the local tier {self.folder} cannot be written ({self.failed}); it is switched off "
                     "and the run goes on with the durable tier (checkpoint.dir) alone")

    def progress(self, step: int) -> None:
        """Record that `step` steps are done (a tiny file, replaced whole): how much a crash cost."""
        if self.writer and self.failed is None:
            path = os.path.join(self.folder, PROGRESS)
            try:
                with open(path + ".tmp", "w") as f:
                    f.write(json.dumps({"step": step}))
                os.replace(path + ".tmp", path)
            except OSError:
                pass  # a hint only: the save itself says what is wrong with the folder

    def close(self) -> None:
        """Wait for the save in flight (a failure was already said, or is said now)."""
        if self.writer and self.failed is None:
            self._settle()
        self.checkpointer.close()

    def remove(self) -> None:
        """The run is finished: its local checkpoints are of no further use (and /dev/shm is memory)."""
        if self.writer:
            try:
                Storage(self.root).remove(self.run_id, recursive=True)
            except (StorageError, StorageRefusedError) as e:
                self.warn(f"warning: could not remove the local tier {self.folder} ({e})")

    # ---- reading -----------------------------------------------------------------------------------------
    def finished_step(self) -> Optional[int]:
        """The last step the previous job on this machine finished, if it recorded one."""
        try:
            with open(os.path.join(self.folder, PROGRESS)) as f:
                step = json.load(f).get("step")
            return step if isinstance(step, int) else None
        except (OSError, ValueError, AttributeError):
            return None

    def committed_steps(self, check: Callable[[str, dict], None]) -> list[int]:
        """Steps of this run's committed local checkpoints that pass `check(path, record)` (the state
        against the config), newest first; every other one is said in one line and left alone."""
        self._reading = True
        steps = []
        storage = self.checkpointer.storage
        try:
            names = sorted((s, n) for n in storage.sizes() if (s := folder_step(n)) is not None)
        except (FileNotFoundError, StorageError, StorageRefusedError):
            names = []
        for step, name in reversed(names):
            try:
                record = check_committed(storage, name)
                state = TrainState.from_record(storage.show(name), record)
                if state.run_id != self.run_id:
                    raise ConfigError(f"it belongs to run {state.run_id}, not this one ({self.run_id})")
                check(storage.show(name), record)
            except (CheckpointError, ConfigError) as e:  # damaged, of another run, trained with other settings
                self.log(f"local tier: ignoring {storage.show(name)}: {first_line(e)}")
                continue
            steps.append(step)
        self._others()
        return steps

    def _others(self) -> None:
        """Other runs' folders in local_dir: said (they hold memory), never touched (a job may be live)."""
        try:
            others = sorted(n for n in Storage(self.root).sizes() if n != self.run_id)
        except (FileNotFoundError, StorageError, StorageRefusedError):
            return
        if others:
            self.log(f"local tier: ignoring {len(others)} folder(s) of other runs in {self.root} ({', '.join(others[:3])}"
                     f"{', ...' if len(others) > 3 else ''}); remove them if their jobs are gone")

    def path(self, step: int) -> str:
        return self.checkpointer.storage.show(step_folder(step))


def _quiet(_: str) -> None:
    pass

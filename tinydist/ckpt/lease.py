"""One job per checkpoint dir: a lease file with a heartbeat, on local disks and object stores alike.

Two jobs writing the same checkpoint dir interleave their commits silently: the surviving
checkpoint is one job's and the exported model the other's. So the first process of a job takes
`{checkpoint.dir}/LEASE.json` (holder, host, pid, run, heartbeat) before it reads or writes a
checkpoint, beats it from a thread, and gives it back when it exits.

Telling a live holder from a dead one, quickly, so a relaunch on a new VM never waits long:
- same machine (same boot and pid namespace): the holder's pid alive or not decides at once;
- another machine: a heartbeat older than 3 x ttl by our clock is dead at once; otherwise we watch
  the lease for up to `ttl_s`: a holder that beats (every ttl/3) is alive, one that does not is gone.
Object stores have no portable compare-and-swap, so a takeover is write-then-read-back: of two
jobs racing for a stale lease, the one whose write landed last wins and the other sees it and
stops. A holder whose heartbeat finds someone else's lease stops committing (`check`).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from typing import Any, Callable, Optional

from tinydist import config as config_lib
from tinydist.config import Config, ConfigError
from tinydist.runtime.exitcodes import PermanentError, TransientError
from tinydist.runtime.host import machine_id, pid_alive
from tinydist.ckpt.storage import Storage, StorageError, StorageRefusedError

LEASE = "LEASE.json"


class LeaseHeldError(TransientError):
    """Another live job holds the checkpoint dir. Transient: when that job ends (or dies), a relaunch
    takes over; until then nothing this job could write would be safe."""


class Lease:
    def __init__(self, storage: Storage, run: str, ttl_s: float = 30.0, log: Callable[[str], None] = print,
                 settle_s: float = 0.5) -> None:
        self.storage, self.run, self.ttl_s, self.log, self.settle_s = storage, run, ttl_s, log, settle_s
        self.token = secrets.token_hex(8)
        self.beat = 0
        self.held = False
        self.lost: Optional[str] = None  # set by the heartbeat when another job took the lease
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._written_at: Optional[float] = None  # when begin() wrote the lease; None once confirmed

    def _read(self) -> Optional[dict]:
        try:
            data = json.loads(self.storage.read(LEASE))
        except FileNotFoundError:
            return None
        except ValueError:  # garbage is nobody's lease
            return {}
        return data if isinstance(data, dict) else {}

    def _write(self) -> None:
        self.beat += 1
        now = time.time()
        self.storage.write(LEASE, json.dumps({
            "holder": self.token, "host": socket.gethostname(), "pid": os.getpid(), "machine": machine_id(),
            "run": self.run, "beat": self.beat, "heartbeat_unix": now,
            "heartbeat": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        }, indent=1).encode())

    @staticmethod
    def describe(lease: dict) -> str:
        return (f"run {lease.get('run')!r} (pid {lease.get('pid')} on {lease.get('host')}, "
                f"last heartbeat {lease.get('heartbeat')})")

    def _holder_alive(self, lease: dict) -> bool:
        if not lease.get("holder") or lease.get("holder") == self.token:
            return False
        if lease.get("machine") == machine_id():
            return pid_alive(lease.get("pid"))
        age = time.time() - float(lease.get("heartbeat_unix") or 0)
        if age > 3 * self.ttl_s:
            return False
        deadline = time.monotonic() + self.ttl_s
        while time.monotonic() < deadline:  # bounded: one ttl at most
            time.sleep(min(1.0, self.ttl_s / 10))
            now = self._read()
            if now != lease:
                return bool(now and now.get("holder"))  # it beat, or someone else took it
        return False

    def acquire(self) -> None:
        """Take the lease or raise LeaseHeldError naming the live holder; then keep it beating."""
        self.begin()
        self.confirm()

    def begin(self) -> None:
        """The first half of `acquire`: refuse a live holder (LeaseHeldError), write the lease and start
        beating it. `confirm` then waits out the settle window; work done in between (train: the data and
        the model's build) hides it: on a 1-minute run the window was 0.5 of the 0.6 s start-up, now 0.1 s."""
        current = self._read()
        if current and self._holder_alive(current):
            raise LeaseHeldError(
                f"checkpoint dir {self.storage.url} is in use by {self.describe(current)}; two jobs there would "
                f"overwrite each other's checkpoints. Wait for it to end, stop it, or give this job another "
                f"checkpoint.dir (a lease whose holder is gone is taken over within {self.ttl_s:g} s)")
        if current:
            self.log(f"taking over the lease on {self.storage.url} from {self.describe(current)}: its holder is gone")
        self._write()
        self._written_at = time.monotonic()
        self.held = True  # release() removes it only while it is still ours
        # Beating from now on: whatever runs before `confirm` must not let the lease go stale.
        self._thread = threading.Thread(target=self._heartbeat, name="tinydist-lease", daemon=True)
        self._thread.start()

    def confirm(self) -> None:
        """The second half of `acquire`: at least `settle_s` after the write, the lease must still be ours.
        A racer that read the same stale (or absent) lease writes within that window, and the last write
        wins: the loser raises LeaseHeldError here, before it reads or writes a checkpoint."""
        if self._written_at is None:
            return
        time.sleep(max(0.0, self._written_at + self.settle_s - time.monotonic()))
        self._written_at = None
        now = self._read()
        if self.lost is not None or not now or now.get("holder") != self.token:
            self.held = False
            self._stop.set()
            raise LeaseHeldError(f"checkpoint dir {self.storage.url} was just taken by "
                                 f"{self.lost or self.describe(now or {})}; expected one job per checkpoint.dir")

    def _heartbeat(self) -> None:
        failing = False
        while not self._stop.wait(self.ttl_s / 3):
            try:
                now = self._read()
                if now and now.get("holder") not in (None, self.token):
                    self.lost = self.describe(now)
                    self.log(f"lease on {self.storage.url} was taken by {self.lost}; this job commits no more "
                             "checkpoints there")
                    return
                self._write()
                if failing:
                    self.log(f"lease on {self.storage.url}: heartbeat written again")
                failing = False
            except (StorageError, StorageRefusedError) as e:  # the checkpoint saves report it; say it once here
                if not failing:
                    self.log(f"lease heartbeat failed ({e}); retrying")
                failing = True

    def check(self) -> None:
        """Before a commit: still ours? Raises LeaseHeldError if another job took over."""
        if not self.held:
            return
        if self.lost is None:
            now = self._read()
            if now and now.get("holder") not in (None, self.token):
                self.lost = self.describe(now)
        if self.lost is not None:
            raise LeaseHeldError(f"checkpoint dir {self.storage.url} was taken over by {self.lost}; "
                                 "this job stops without committing (expected one job per checkpoint.dir)")

    def release(self) -> None:
        """Stop beating and remove the lease if it is still ours; never raises (it runs on the way out)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, self.ttl_s))
        if not self.held:
            return
        self.held = False
        try:
            now = self._read()
            if now is not None and now.get("holder") == self.token:
                self.storage.remove(LEASE)
        except (StorageError, StorageRefusedError) as e:
            self.log(f"could not release the lease on {self.storage.url} ({e}); the next job takes it over "
                     f"once it is {self.ttl_s:g} s stale")


def claim_storage(cfg: Config, stop: Any, peers: Any, say: Any, confirm: bool = True) -> Optional[Lease]:
    """Before any training, rank 0 proves that checkpoint.dir and train.output_dir can be written (a
    missing bucket fails now, in one line, not an epoch later at the first save) and takes the
    checkpoint dir's lease (one job per dir). Every rank learns the outcome and stops with it.
    `confirm=False`: the lease is written but its settle window not yet waited out: `confirm_claim`
    does that, after other start-up work."""
    lease, error = None, None
    if peers.rank == 0:
        try:
            if cfg.checkpoint.local_dir:
                check_local_dir(cfg.checkpoint.local_dir, config_lib.checkpoint_dir(cfg))
            Storage(config_lib.checkpoint_dir(cfg)).probe("checkpoint.dir")
            Storage(cfg.train.output_dir).probe("train.output_dir")
            if cfg.checkpoint.lease_ttl_s > 0:
                lease = Lease(Storage(config_lib.checkpoint_dir(cfg)), cfg.log.run_name or cfg.train.output_dir,
                              ttl_s=cfg.checkpoint.lease_ttl_s, log=say)
                lease.begin()
                if confirm:
                    lease.confirm()
        except (PermanentError, TransientError) as e:  # every rank must learn it, whichever it is
            error = e
    _agree(error, stop, peers)
    return lease


def folders_to_create(cfg: Config) -> list[str]:
    """The local folders `claim_storage`'s probes will create (checkpoint.dir, train.output_dir and their
    missing parents), deepest first: `train` claims before it loads the data (the lease's settle window
    passes during the load and a second job is refused before a decode that can take minutes), and gives
    back with `remove_empty_folders` what it made if the run ends before it trained, so that a source
    that cannot be read leaves nothing behind."""
    missing: set[str] = set()
    for url in (config_lib.checkpoint_dir(cfg), cfg.train.output_dir):
        storage = Storage(url)
        if not storage.local:
            continue
        path = os.path.abspath(storage.root)
        while path and not os.path.exists(path):
            missing.add(path)
            path = os.path.dirname(path)
    return sorted(missing, key=lambda p: (-p.count(os.sep), p))


def remove_empty_folders(folders: list[str]) -> None:
    """Remove each of `folders` (deepest first) that is empty; never raises (it runs on the way out)."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:  # not empty (another job's lease, a file someone put there), or gone
            pass


def confirm_claim(lease: Optional[Lease], stop: Any, peers: Any) -> None:
    """The lease `claim_storage(confirm=False)` wrote is still rank 0's once its settle window is over
    (Lease.confirm), or every rank stops (LeaseHeldError on rank 0, a TransientError on the others)."""
    error = None
    if lease is not None:
        try:
            lease.confirm()
        except TransientError as e:
            error = e
    _agree(error, stop, peers)


def _agree(error: Optional[Exception], stop: Any, peers: Any) -> None:
    _, failed, _, _ = stop.agreed(peers, fault=error is not None)
    if error is not None:
        raise error
    if failed:
        raise TransientError("rank 0 could not claim the checkpoint dir (see its message)")


def check_local_dir(local_dir: str, durable_url: str) -> None:
    """ConfigError (one line) for a local tier that would protect against nothing: on the same file
    system as checkpoint.dir, or inside it."""
    local = os.path.abspath(local_dir.removeprefix("file://"))
    durable_storage = Storage(durable_url)
    if not durable_storage.local:
        return
    durable = os.path.abspath(durable_storage.root)
    if local == durable or local.startswith(durable + os.sep) or durable.startswith(local + os.sep):
        raise ConfigError(f"checkpoint.local_dir={local_dir} and checkpoint.dir={durable_url} overlap; expected the "
                          "local tier on storage of its own, e.g. --checkpoint.local_dir=/dev/shm/tinydist")
    if _device(local) == _device(durable):
        raise ConfigError(f"checkpoint.local_dir={local_dir} is on the same file system as checkpoint.dir="
                          f"{durable_url}: a second copy there saves nothing the first does not; expected a faster "
                          "local folder (/dev/shm/tinydist, a local NVMe) with checkpoint.dir on shared storage")


def _device(path: str) -> int:
    while not os.path.exists(path):  # the nearest folder that exists: where it would be created
        path = os.path.dirname(path)
    return os.stat(path).st_dev

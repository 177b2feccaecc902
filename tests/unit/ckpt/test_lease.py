"""tinydist.ckpt.lease: one job per checkpoint dir, on a local disk and on S3 (moto on loopback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from helpers.faultinject import make_bucket, moto_server
from tinydist.ckpt.lease import LEASE, Lease, LeaseHeldError
from tinydist.ckpt.storage import Storage
from tinydist.runtime.host import machine_id


class Logs(list):
    def __call__(self, line: str) -> None:
        self.append(line)


def other_machine(storage: Storage, *, age_s: float = 0.0, pid: int = 4242) -> dict:
    """A lease as a job on another machine writes it (its pids mean nothing here)."""
    now = time.time() - age_s
    lease = {"holder": "elsewhere", "host": "node-7", "pid": pid, "machine": "node-7/boot/ns", "run": "runs/a",
             "beat": 1, "heartbeat_unix": now, "heartbeat": "earlier"}
    storage.write(LEASE, json.dumps(lease).encode())
    return lease


def test_acquire_heartbeat_release(tmp_path):
    storage = Storage(str(tmp_path))
    lease = Lease(storage, "runs/a", ttl_s=0.6, log=Logs(), settle_s=0.01)
    lease.acquire()
    first = json.loads(storage.read(LEASE))
    assert first["pid"] == os.getpid() and first["run"] == "runs/a"
    time.sleep(0.5)  # heartbeats every ttl/3
    assert json.loads(storage.read(LEASE))["beat"] > first["beat"]
    lease.check()
    lease.release()
    assert not storage.exists(LEASE)


def test_same_machine_live_holder_is_refused_at_once(tmp_path):
    storage = Storage(str(tmp_path))
    holder = Lease(storage, "runs/first", ttl_s=30, log=Logs(), settle_s=0.01)
    holder.acquire()
    try:
        start = time.monotonic()
        with pytest.raises(LeaseHeldError) as err:
            Lease(storage, "runs/second", ttl_s=30, log=Logs(), settle_s=0.01).acquire()
        assert time.monotonic() - start < 15  # at once, not after the 30 s ttl
        message = str(err.value)
        assert "\n" not in message and "runs/first" in message and f"pid {os.getpid()}" in message
    finally:
        holder.release()


def test_same_machine_dead_holder_is_taken_over_at_once(tmp_path):
    storage = Storage(str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # exited: that pid is (almost surely) free now
    storage.write(LEASE, json.dumps({"holder": "gone", "host": "here", "pid": pid, "run": "runs/old",
                                     "machine": machine_id(), "beat": 3, "heartbeat_unix": time.time(),
                                     "heartbeat": "now"}).encode())
    logs = Logs()
    start = time.monotonic()
    lease = Lease(storage, "runs/new", ttl_s=30, log=logs, settle_s=0.01)
    lease.acquire()
    assert time.monotonic() - start < 15  # at once, not after the 30 s ttl
    assert any("taking over" in line and "runs/old" in line for line in logs)
    assert json.loads(storage.read(LEASE))["run"] == "runs/new"
    lease.release()


def test_other_machine_long_silent_is_taken_over_at_once(tmp_path):
    storage = Storage(str(tmp_path))
    other_machine(storage, age_s=3600)
    start = time.monotonic()
    lease = Lease(storage, "runs/new", ttl_s=30, log=Logs(), settle_s=0.01)
    lease.acquire()
    assert time.monotonic() - start < 15  # at once, not after the 30 s ttl
    lease.release()


def test_other_machine_that_stops_beating_is_taken_over_after_one_ttl(tmp_path):
    storage = Storage(str(tmp_path))
    other_machine(storage, age_s=0)  # fresh, but nobody beats it any more (the VM vanished)
    start = time.monotonic()
    lease = Lease(storage, "runs/new", ttl_s=1.0, log=Logs(), settle_s=0.01)
    lease.acquire()
    assert 1.0 <= time.monotonic() - start < 25  # one ttl, not forever
    lease.release()


def test_other_machine_still_beating_is_refused(tmp_path):
    storage = Storage(str(tmp_path))
    lease = other_machine(storage)

    import threading
    stop = threading.Event()

    def beat() -> None:  # the other machine's heartbeat, while we watch
        while not stop.wait(0.1):
            lease["beat"] += 1
            lease["heartbeat_unix"] = time.time()
            storage.write(LEASE, json.dumps(lease).encode())

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        with pytest.raises(LeaseHeldError, match="node-7"):
            Lease(storage, "runs/new", ttl_s=2.0, log=Logs(), settle_s=0.01).acquire()
    finally:
        stop.set()
        thread.join(5)


def test_holder_notices_a_takeover_and_stops_committing(tmp_path):
    storage = Storage(str(tmp_path))
    logs = Logs()
    lease = Lease(storage, "runs/a", ttl_s=0.6, log=logs, settle_s=0.01)
    lease.acquire()
    other_machine(storage)  # someone took it (e.g. judged us dead across a network partition)
    with pytest.raises(LeaseHeldError, match="taken over by run 'runs/a'|taken over by"):
        lease.check()
    lease.release()
    assert storage.exists(LEASE)  # not ours any more: never removed by us


def test_lease_on_s3(tmp_path):
    import s3fs

    with moto_server() as endpoint:
        bucket = make_bucket(endpoint)
        s3fs.S3FileSystem.clear_instance_cache()
        options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
        storage = Storage(f"s3://{bucket}/ck", options)
        first = Lease(storage, "runs/a", ttl_s=30, log=Logs(), settle_s=0.05)
        first.acquire()
        with pytest.raises(LeaseHeldError, match="runs/a"):
            Lease(Storage(f"s3://{bucket}/ck", options), "runs/b", ttl_s=30, log=Logs(), settle_s=0.05).acquire()
        first.release()
        assert not storage.exists(LEASE)
        second = Lease(storage, "runs/b", ttl_s=30, log=Logs(), settle_s=0.05)
        second.acquire()
        second.release()
        s3fs.S3FileSystem.clear_instance_cache()


def test_begin_then_confirm_waits_only_what_is_left_of_the_settle_window(tmp_path, monkeypatch):
    import tinydist.ckpt.lease as lease_module

    storage = Storage(str(tmp_path))
    lease = Lease(storage, "runs/a", ttl_s=30, log=Logs(), settle_s=0.4)
    lease.begin()
    assert json.loads(storage.read(LEASE))["pid"] == os.getpid()  # written (and beating) before confirm
    time.sleep(0.3)  # the start-up work the window hides
    asked: list[float] = []
    monkeypatch.setattr(lease_module.time, "sleep", asked.append)
    lease.confirm()
    assert len(asked) == 1 and 0.0 <= asked[0] <= 0.1, asked  # what is left of the 0.4 s, not another 0.4
    lease.confirm()  # once confirmed, nothing more to wait for
    assert len(asked) == 1, asked
    monkeypatch.undo()
    lease.check()
    lease.release()
    assert not storage.exists(LEASE)


def test_a_racer_that_writes_within_the_settle_window_wins_and_confirm_refuses(tmp_path):
    storage = Storage(str(tmp_path))
    loser = Lease(storage, "runs/a", ttl_s=30, log=Logs(), settle_s=0.2)
    loser.begin()
    other_machine(storage)  # the racer read the same absent lease and wrote after us: the last write wins
    with pytest.raises(LeaseHeldError, match="just taken by run 'runs/a' .*node-7"):
        loser.confirm()
    assert not loser.held
    loser.release()
    assert json.loads(storage.read(LEASE))["holder"] == "elsewhere"  # the winner's, left in place


def test_the_folders_the_claim_makes_are_given_back_when_still_empty(tmp_path):
    from tinydist.ckpt.lease import folders_to_create, remove_empty_folders
    from tinydist.config import load_config

    (tmp_path / "runs").mkdir()
    cfg = load_config([f"--train.output_dir={tmp_path}/runs/a/out", f"--checkpoint.dir={tmp_path}/ck/a/b",
                       "--log.report_to=[]"])
    created = folders_to_create(cfg)
    assert created == [str(tmp_path / "ck/a/b"), str(tmp_path / "runs/a/out"), str(tmp_path / "ck/a"),
                       str(tmp_path / "runs/a"), str(tmp_path / "ck")]  # deepest first; runs/ was there
    for folder in created:
        os.makedirs(folder, exist_ok=True)
    (tmp_path / "runs/a/out/kept.txt").write_text("someone's file")
    remove_empty_folders(created)
    assert not (tmp_path / "ck").exists()  # made by the claim, empty: gone, parents included
    assert (tmp_path / "runs/a/out/kept.txt").exists()  # not empty: kept, and so its parent
    assert folders_to_create(load_config([f"--train.output_dir={tmp_path}/runs/a/out", "--log.report_to=[]",
                                          "--checkpoint.dir=s3://bucket/ck"])) == []  # nothing local to make


def test_a_second_job_is_refused_before_it_decodes_anything(tmp_path):
    """train claims the checkpoint dir before it loads the data: a job meeting a live lease stops at once,
    without building a decode cache (minutes on a first run) or leaving folders of its own behind."""
    from helpers.train import tiny_args
    from tinydist.config import load_config
    from tinydist.train import train

    ck = tmp_path / "ck"
    holder = Lease(Storage(str(ck)), "runs/first", ttl_s=30, log=Logs(), settle_s=0.01)
    holder.acquire()  # this process: alive, on this machine
    try:
        cfg = load_config(tiny_args(str(tmp_path / "cache"), str(tmp_path / "out"), checkpoint__dir=str(ck)))
        with pytest.raises(LeaseHeldError) as err:
            train(cfg)
        assert "runs/first" in str(err.value)
        assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # nothing decoded
        assert not (tmp_path / "out").exists()  # the probe's folder, given back
        assert json.loads(Storage(str(ck)).read(LEASE))["run"] == "runs/first"  # the holder's lease untouched
    finally:
        holder.release()

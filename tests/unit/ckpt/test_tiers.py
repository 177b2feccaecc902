"""The local checkpoint tier (ckpt/local.py), its copies to the durable tier (promote.py) and the choice
of restore point across both (tiers.py), on a small model: saves, retention, run identity, the checks
that ignore another run's or an older checkpoint, a tier that cannot be written, refused local dirs."""

from __future__ import annotations

import json
import os
import shutil
import threading
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers.faultinject import tmpfs
from tinydist.ckpt.checkpointer import Checkpointer
from tinydist.ckpt.lease import check_local_dir
from tinydist.ckpt.local import RUN_FILE, LocalTier, read_run_id, run_identity
from tinydist.ckpt.promote import Promoter
from tinydist.ckpt.record import check_committed, folder_step
from tinydist.ckpt.restore import state_check
from tinydist.ckpt.state import TrainState
from tinydist.ckpt.storage import Storage, StorageError
from tinydist.ckpt.tiers import Tiers, local_restore_point
from tinydist.config import Config, ConfigError, load_config, to_dict
from tinydist.runtime.divergence import DivergedError
from tinydist.runtime.exitcodes import TransientError
from tinydist.runtime.peers import Peers

DATASET = 640  # images: 10 steps of 64 per epoch


@pytest.fixture
def shm() -> str:
    """A fresh folder in /dev/shm (where the local tier is meant to live), removed afterwards."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm on this machine")
    path = f"/dev/shm/tinydist-test-{uuid.uuid4().hex[:8]}"
    yield path
    shutil.rmtree(path, ignore_errors=True)


def model_and_optimizer(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def state(cfg: Config, step: int, run_id: str) -> TrainState:
    return TrainState(step=step, epoch=step * 64 / DATASET, samples=step * 64, global_batch_size=64,
                      config=to_dict(cfg), device="cpu", run_id=run_id)


def config(tmp_path: Path, **overrides: object) -> Config:
    args = [f"--train.output_dir={tmp_path / 'out'}", "--train.global_batch_size=64", "--train.micro_batch_size=32"]
    return load_config(args + [f"--{k}={v}" for k, v in overrides.items()])


def local_tier(shm: str, run_id: str, lines: list[str], every: int = 1) -> LocalTier:
    return LocalTier(shm, run_id, every, writer=True, max_shard_size="10MB", log=lines.append)


def promoted_tiers(durable: Checkpointer, local: LocalTier, lines: list[str], world_size: int = 1,
                   max_outage_s: float = 30.0, retry_s: float = 0.05) -> tuple[Promoter, Tiers]:
    """Both tiers as a run wires them: each local commit handed to the copier into `durable`."""
    promoter = Promoter(local.checkpointer, durable, world_size=world_size, lease=None, log=lines.append,
                        max_outage_s=max_outage_s, retry_s=retry_s)
    local.checkpointer.on_commit = promoter.committed
    return promoter, Tiers(durable, local, promoter, log=lines.append)


def test_the_local_tier_keeps_two_and_wins_over_an_older_durable_checkpoint(tmp_path, shm):
    cfg, lines = config(tmp_path), []
    model, optimizer = model_and_optimizer()
    durable = Checkpointer(str(tmp_path / "ck"), keep_last=2, log=lines.append)
    run_id = run_identity(durable.storage, fresh=True)
    assert read_run_id(durable.storage) == run_id == json.loads((tmp_path / "ck" / RUN_FILE).read_text())["run_id"]
    local = local_tier(shm, run_id, lines)
    sets = {"model": model, "optimizer": optimizer}
    durable.save(2, sets=sets, state=state(cfg, 2, run_id), blocking=True)
    for step in range(1, 6):
        assert local.save(step, sets, state(cfg, step, run_id))
        local.progress(step)
    local.close()
    assert sorted(os.listdir(local.folder)) == ["progress.json", "step-00000004", "step-00000005"]
    assert local.finished_step() == 5
    tiers = Tiers(durable, local)
    path = local_restore_point(tiers, Peers(1, 0, 30.0), state_check(cfg, DATASET), lines.append)
    assert path == f"{shm}/{run_id}/step-00000005"
    # The local copy has the commit protocol's checks: marker, state.json's sha256, file sizes.
    record = check_committed(Storage(f"{shm}/{run_id}"), "step-00000005")
    assert record["run_id"] == run_id and record["world_size"] == 1
    assert not [line for line in lines if "warning" in line], lines


def test_another_runs_or_an_older_local_checkpoint_is_ignored_with_one_line(tmp_path, shm):
    cfg, lines = config(tmp_path), []
    model, optimizer = model_and_optimizer()
    sets = {"model": model, "optimizer": optimizer}
    durable = Checkpointer(str(tmp_path / "ck"), keep_last=2, log=lines.append)
    ours = run_identity(durable.storage, fresh=True)
    # A local checkpoint of another run, in our run's folder (as if copied there), and one of ours that is older.
    stranger = local_tier(shm, ours, lines)
    stranger.save(7, sets, state(cfg, 7, "someone-else"))
    stranger.save(3, sets, state(cfg, 3, ours))
    stranger.close()
    durable.save(4, sets=sets, state=state(cfg, 4, ours), blocking=True)
    other_run = local_tier(shm, "another-run", lines)
    other_run.save(9, sets, state(cfg, 9, "another-run"))
    other_run.close()
    lines.clear()
    tiers = Tiers(durable, local_tier(shm, ours, lines))
    assert local_restore_point(tiers, Peers(1, 0, 30.0), state_check(cfg, DATASET), lines.append) is None
    assert any("ignoring" in line and "step-00000007" in line and "belongs to run someone-else" in line
               for line in lines), lines
    assert any("ignoring 1 folder(s) of other runs" in line and "another-run" in line for line in lines), lines
    assert any("newest step 3 is older than the durable tier's" in line for line in lines), lines
    assert os.path.isdir(f"{shm}/another-run/step-00000009"), "another run's checkpoints are never touched"


def test_a_local_checkpoint_trained_with_other_fixed_settings_is_ignored(tmp_path, shm):
    cfg, lines = config(tmp_path), []
    model, optimizer = model_and_optimizer()
    durable = Checkpointer(str(tmp_path / "ck"), keep_last=2, log=lines.append)
    run_id = run_identity(durable.storage, fresh=True)
    local = local_tier(shm, run_id, lines)
    local.save(5, {"model": model, "optimizer": optimizer}, state(config(tmp_path, **{"train.seed": 7}), 5, run_id))
    local.close()
    tiers = Tiers(durable, local)
    assert local_restore_point(tiers, Peers(1, 0, 30.0), state_check(cfg, DATASET), lines.append) is None
    assert any("ignoring" in line and "train.seed" in line for line in lines), lines


def test_a_durable_save_is_a_verified_copy_of_the_local_one(tmp_path, shm):
    cfg, lines = config(tmp_path), []
    model, optimizer = model_and_optimizer()
    durable = Checkpointer(str(tmp_path / "ck"), keep_last=2, log=lines.append, world_size=1)
    run_id = run_identity(durable.storage, fresh=True)
    local = local_tier(shm, run_id, lines)
    promoter, tiers = promoted_tiers(durable, local, lines, world_size=4, max_outage_s=30.0, retry_s=0.1)
    sets = {"model": model, "optimizer": optimizer}
    tiers.save(3, sets, state(cfg, 3, run_id), durable=False, blocking=False)
    tiers.save(4, sets, state(cfg, 4, run_id), durable=True, blocking=False)
    local.close()
    assert promoter.wait(30.0)
    tiers.close()
    assert [folder_step(p) for p in durable.committed()] == [4], lines
    assert any("committed (copied from the local tier)" in line for line in lines), lines
    record = check_committed(durable.storage, "step-00000004")
    assert record["world_size"] == 4 and record["run_id"] == run_id
    local_record = check_committed(local.checkpointer.storage, "step-00000004")
    assert record["files"] == local_record["files"]  # the same bytes, each checked as it was read
    fresh, fresh_optimizer = model_and_optimizer(seed=1)
    durable.load(durable.latest(), sets={"model": fresh, "optimizer": fresh_optimizer})
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


@pytest.mark.parametrize("fault", ["full", "not a folder"])
def test_a_local_tier_that_cannot_be_written_is_switched_off_with_one_warning(tmp_path, fault):
    cfg, lines = config(tmp_path), []
    model, optimizer = model_and_optimizer()
    sets = {"model": model, "optimizer": optimizer}
    if fault == "not a folder":
        (tmp_path / "file").write_text("")
        root = str(tmp_path / "file" / "local")
        saves = [LocalTier(root, "r", 1, writer=True, max_shard_size="10MB", log=lines.append)]
        for step in range(1, 4):
            saves[0].save(step, sets, state(cfg, step, "r"))
        saves[0].close()
    else:
        with tmpfs(tmp_path / "tiny", 2048) as tiny:
            saves = [LocalTier(str(tiny), "r", 1, writer=True, max_shard_size="10MB", log=lines.append)]
            for step in range(1, 4):
                saves[0].save(step, sets, state(cfg, step, "r"))
            saves[0].close()
    warnings = [line for line in lines if line.startswith("warning")]
    assert len(warnings) == 1 and "switched off" in warnings[0] and "durable tier" in warnings[0], lines
    assert saves[0].failed and saves[0].fault is None
    assert not saves[0].save(4, sets, state(cfg, 4, "r"))


def test_a_local_dir_on_the_durable_storage_or_an_object_store_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="same file system as checkpoint.dir"):
        check_local_dir(str(tmp_path / "local"), str(tmp_path / "ck"))
    with pytest.raises(ConfigError, match="overlap"):
        check_local_dir(str(tmp_path / "ck" / "local"), str(tmp_path / "ck"))
    if os.path.isdir("/dev/shm") and os.stat("/dev/shm").st_dev != os.stat(tmp_path).st_dev:
        check_local_dir("/dev/shm/tinydist", str(tmp_path / "ck"))  # its own storage: fine
    check_local_dir(str(tmp_path / "local"), "s3://bucket/run")  # a bucket is never the same storage
    with pytest.raises(ConfigError, match=r"checkpoint.local_dir.*s3://b/x.*/dev/shm"):
        config(tmp_path, **{"checkpoint.local_dir": "s3://b/x"})
    with pytest.raises(ConfigError, match="local_every_steps.*0"):
        config(tmp_path, **{"checkpoint.local_dir": "/dev/shm/x", "checkpoint.local_every_steps": 0})


def test_a_fresh_run_gets_a_new_identity_and_a_resumed_one_keeps_it(tmp_path):
    storage = Storage(str(tmp_path / "ck"))
    first = run_identity(storage, fresh=False)  # no RUN.json yet: made
    assert run_identity(storage, fresh=False) == first == read_run_id(storage)
    second = run_identity(storage, fresh=True)  # checkpoint.resume=never: a new run in the same dir
    assert second != first and read_run_id(storage) == second


def test_a_non_finite_weight_in_a_local_save_stops_the_run_and_is_never_committed(tmp_path, shm):
    cfg, lines = config(tmp_path), []
    model, optimizer = model_and_optimizer()
    durable = Checkpointer(str(tmp_path / "ck"), keep_last=2, log=lines.append)
    local = local_tier(shm, "r", lines)
    tiers = Tiers(durable, local)
    sets = {"model": model, "optimizer": optimizer}
    tiers.save(1, sets, state(cfg, 1, "r"), durable=False, blocking=False)
    tiers.snapshot_barrier()  # the loop's, before the update that changes the weights
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    tiers.save(2, sets, state(cfg, 2, "r"), durable=False, blocking=False)
    tiers.snapshot_barrier()  # where the loop waits for it, before the next update
    assert isinstance(tiers.fault, DivergedError) and "step 2" in str(tiers.fault) and "0.weight" in str(tiers.fault)
    assert local.failed is None  # not a storage fault: the loop stops the run with exit 2 (divergence.py)
    assert sorted(p.name for p in Path(local.folder).glob("step-*")) == ["step-00000001"]
    assert tiers.last_commit == 1
    tiers.close()


def test_a_durable_tier_that_fails_never_holds_the_local_tier_and_its_copy_lands_when_it_is_back(tmp_path, shm,
                                                                                                 monkeypatch):
    cfg, lines = config(tmp_path), []
    model, optimizer = model_and_optimizer()
    durable = Checkpointer(str(tmp_path / "ck"), keep_last=2, log=lines.append)
    run_id = run_identity(durable.storage, fresh=True)
    local = local_tier(shm, run_id, lines)
    promoter, tiers = promoted_tiers(durable, local, lines, world_size=1, max_outage_s=60.0, retry_s=0.05)
    write, failures = durable.storage.write, []

    def bucket_down(name: str, data: object) -> None:
        if len(failures) < 3:  # the first three writes fail, as a bucket that is away for a while
            failures.append(name)
            raise StorageError(f"writing {name}: connection refused")
        write(name, data)

    monkeypatch.setattr(durable.storage, "write", bucket_down)
    sets = {"model": model, "optimizer": optimizer}
    tiers.save(1, sets, state(cfg, 1, run_id), durable=True, blocking=False)
    for step in range(2, 6):  # the local tier goes on, every step, while the copy retries
        tiers.snapshot_barrier()
        tiers.save(step, sets, state(cfg, step, run_id), durable=False, blocking=False)
    tiers.snapshot_barrier()
    assert promoter.wait(30.0)
    # Step 1 stayed pinned against the local tier's retention while it was being copied; the next commit drops it.
    assert sorted(p.name for p in Path(local.folder).glob("step-*")) == [f"step-0000000{s}" for s in (1, 4, 5)]
    tiers.save(6, sets, state(cfg, 6, run_id), durable=False, blocking=False)
    tiers.snapshot_barrier()
    assert sorted(p.name for p in Path(local.folder).glob("step-*")) == ["step-00000005", "step-00000006"]
    assert len(failures) == 3 and [folder_step(p) for p in durable.committed()] == [1], lines
    assert sum("copy from the local tier failed" in line and "retrying" in line for line in lines) == 3, lines
    assert tiers.fault is None
    tiers.close()


def test_a_durable_tier_down_past_max_outage_stops_the_run_with_a_transient_fault(tmp_path, shm, monkeypatch):
    cfg, lines = config(tmp_path), []
    model, optimizer = model_and_optimizer()
    durable = Checkpointer(str(tmp_path / "ck"), keep_last=2, log=lines.append)
    local = local_tier(shm, "r", lines)
    promoter, tiers = promoted_tiers(durable, local, lines, world_size=1, max_outage_s=0.3, retry_s=0.05)

    def bucket_gone(name: str, data: object) -> None:
        raise StorageError(f"writing {name}: connection refused")

    monkeypatch.setattr(durable.storage, "write", bucket_gone)
    tiers.save(1, {"model": model, "optimizer": optimizer}, state(cfg, 1, "r"), durable=True, blocking=False)
    tiers.snapshot_barrier()
    assert promoter.wait(30.0)
    assert isinstance(tiers.fault, TransientError) and "max_outage_s=0.3" in str(tiers.fault), lines
    assert not durable.committed() and local.failed is None
    tiers.close()



def test_writing_is_true_while_a_background_durable_save_writes(tmp_path, monkeypatch):
    """What the loop's SaveDrag asks after each step: a durable save still writing on its own thread."""
    cfg, lines = config(tmp_path), []
    model, optimizer = model_and_optimizer()
    durable = Checkpointer(str(tmp_path / "ck"), keep_last=2, log=lines.append, world_size=1)
    tiers = Tiers(durable, log=lines.append)
    release, write = threading.Event(), durable.storage.write

    def slow_write(name: str, data: object) -> None:
        release.wait(timeout=30)
        write(name, data)

    monkeypatch.setattr(durable.storage, "write", slow_write)
    assert not tiers.writing()
    tiers.save(7, {"model": model, "optimizer": optimizer}, state(cfg, 7, "r"), durable=True, blocking=False)
    assert tiers.writing()  # returned at once; the save writes on its own thread
    release.set()
    tiers.wait()
    assert not tiers.writing()
    assert [folder_step(p) for p in durable.committed()] == [7], lines
    tiers.close()

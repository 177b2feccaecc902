"""Typed checkpoint state and named tensor sets: TrainState's schema and checks, `restore` checking the
state against the config before it reads a tensor, sets saved side by side (none inside another), the
state.json a run writes unchanged on disk, and the one backoff policy. In-process and fast."""

from __future__ import annotations

import dataclasses
import json
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers.faultinject import reseal
from tinydist.ckpt import backoff as backoff_mod
from tinydist.ckpt.backoff import Backoff, retry_storage
from tinydist.ckpt.checkpointer import Checkpointer
from tinydist.ckpt.layout import CheckpointError, InvalidCheckpointError
from tinydist.ckpt.record import RESERVED
from tinydist.ckpt.restore import check_resume_state, restore
from tinydist.ckpt.state import TrainState
from tinydist.ckpt.storage import StorageError, StorageFullError
from tinydist.config import ConfigError, load_config, to_dict
from tinydist.model.build import build_model
from tinydist.runtime.exitcodes import TransientError

DATASET = 128  # images in the (imaginary) training set


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core box: intra-op threads only fight the background writer
    yield
    torch.set_num_threads(threads)


def config(tmp_path: Path, *overrides: str):
    return load_config(["--data.image_size=16", "--model.stem=cifar", f"--train.output_dir={tmp_path / 'out'}",
                        "--train.global_batch_size=32", "--train.micro_batch_size=16", *overrides])


def objects(cfg, seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.nn.Module]:
    torch.manual_seed(seed)
    model = build_model(cfg.model, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    F.cross_entropy(model(torch.randn(4, 3, 16, 16)), torch.arange(4)).backward()
    optimizer.step()
    average = build_model(cfg.model, 10)
    with torch.no_grad():
        for p in average.parameters():
            p.normal_()
    return model, optimizer, average


def state_at(cfg, step: int, **changes) -> TrainState:
    batch = cfg.train.global_batch_size
    fields = dict(step=step, epoch=step * batch / DATASET, samples=step * batch, global_batch_size=batch,
                  config=to_dict(cfg), device="cpu", wandb_run_id="run-1", metrics={"val/top1": 0.5, "val/loss": None})
    return TrainState(**{**fields, **changes})


def checkpointer(cfg) -> Checkpointer:
    from tinydist import config as config_lib

    return Checkpointer(config_lib.checkpoint_dir(cfg), keep_last=3, max_shard_size="2MB", log=lambda _: None)


def saved(tmp_path: Path, *steps: int, cfg=None):
    cfg = cfg or config(tmp_path)
    model, optimizer, average = objects(cfg)
    ck = checkpointer(cfg)
    for step in steps:
        ck.save(step, sets={"model": model, "optimizer": optimizer, "ema": average}, state=state_at(cfg, step),
                blocking=True)
    return cfg, ck, (model, optimizer, average)


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ---- what is on disk -------------------------------------------------------------------------------------


def test_state_json_is_the_format_it_always_was(tmp_path):
    """Checkpoints written before TrainState load and new ones look the same: the state's fields at the top
    level of state.json next to the commit's own, EMA in its own set, the optimizer's JSON in `optimizer`."""
    cfg, ck, (model, _, _) = saved(tmp_path, 4)
    folder = tmp_path / "out" / "checkpoints" / "step-00000004"
    record = json.loads((folder / "state.json").read_text())
    assert set(record) == {"epoch", "samples", "global_batch_size", "device", "config", "wandb_run_id", "metrics",
                           "step", "format", "world_size", "saved_at", "versions", "optimizer", "files"}
    assert record["format"] == "tinydist-checkpoint/1" and record["metrics"] == {"val/top1": 0.5, "val/loss": None}
    indexes = {name for name in record["files"] if name.endswith(".safetensors.index.json")}
    assert indexes == {"model.safetensors.index.json", "optimizer.safetensors.index.json", "ema.safetensors.index.json"}
    optimizer_keys = json.loads((folder / "optimizer.safetensors.index.json").read_text())["weight_map"]
    assert optimizer_keys and all(key.endswith(".momentum_buffer") for key in optimizer_keys)  # no set inside it
    ema_keys = json.loads((folder / "ema.safetensors.index.json").read_text())["weight_map"]
    assert set(ema_keys) == set(model.state_dict())
    # The older call writes the same record from a plain dict.
    legacy = Checkpointer(str(tmp_path / "legacy"), keep_last=1, max_shard_size="2MB", log=lambda _: None)
    model, optimizer, average = objects(cfg)
    legacy.save(4, model, optimizer, state_at(cfg, 4).to_json(), blocking=True, ema=average)
    old = json.loads((tmp_path / "legacy" / "step-00000004" / "state.json").read_text())
    assert set(old) == set(record) and {k: old[k] for k in old if k not in ("saved_at", "files")} == \
        {k: record[k] for k in record if k not in ("saved_at", "files")}


def test_train_state_fields_never_clash_with_the_commits_own():
    assert {f.name for f in dataclasses.fields(TrainState)} & set(RESERVED) == {"step"}


def test_train_state_refuses_non_json_and_a_wrong_step(tmp_path):
    cfg = config(tmp_path)
    with pytest.raises(ValueError, match="not strict JSON"):
        state_at(cfg, 1, metrics={"val/top1": float("nan")}).to_json()
    ck = checkpointer(cfg)
    model, optimizer, _ = objects(cfg)
    with pytest.raises(ValueError, match="TrainState.step=2; expected the step saved, 1"):
        ck.save(1, sets={"model": model, "optimizer": optimizer}, state=state_at(cfg, 2))
    with pytest.raises(TypeError, match="sets\\['model'\\]"):
        ck.save(1, sets={"optimizer": optimizer}, state=state_at(cfg, 1))
    with pytest.raises(TypeError, match="not both"):
        ck.save(1, model, sets={"model": model}, state=state_at(cfg, 1))


# ---- restore: the state first, then the tensors -----------------------------------------------------------


def test_restore_round_trip_with_named_sets(tmp_path):
    cfg, ck, (model, optimizer, average) = saved(tmp_path, 2, 4)
    fresh, fresh_optimizer, fresh_average = objects(cfg, seed=1)
    restored = restore(cfg, ck, model=fresh, optimizer=fresh_optimizer, ema=fresh_average, dataset_size=DATASET)
    assert restored.path.endswith("step-00000004") and restored.step == 4
    assert restored.state == state_at(cfg, 4) and restored.changes == []
    assert restored.sets == ["ema", "model", "optimizer"] and restored.record["world_size"] == 1
    assert same(fresh, model) and same(fresh_average, average) and not same(fresh_average, fresh)
    momentum = [fresh_optimizer.state[p]["momentum_buffer"] for p in fresh.parameters()]
    assert all(torch.equal(a, optimizer.state[p]["momentum_buffer"]) for a, p in zip(momentum, model.parameters()))
    # An explicit path, and a setting that may change: said, in effect from the resume step.
    changed = config(tmp_path, "--optim.lr=0.5", f"--checkpoint.resume={ck.committed()[0]}")
    again = restore(changed, ck, model=fresh, optimizer=fresh_optimizer, ema=None, dataset_size=DATASET)
    assert again.step == 2 and f"optim.lr: {cfg.optim.lr!r} -> 0.5" in again.changes


def test_a_set_may_have_any_name_and_the_ema_set_may_be_missing(tmp_path):
    cfg, ck, (model, optimizer, average) = saved(tmp_path, 1)
    ck.save(2, sets={"model": model, "optimizer": optimizer, "teacher": average}, state=state_at(cfg, 2), blocking=True)
    fresh, fresh_optimizer, fresh_average = objects(cfg, seed=1)
    teacher = build_model(cfg.model, 10)
    before = {k: v.clone() for k, v in fresh_average.state_dict().items()}
    record = ck.load(ck.latest(), sets={"model": fresh, "optimizer": fresh_optimizer, "teacher": teacher,
                                        "ema": fresh_average})
    assert "teacher.safetensors.index.json" in record["files"] and same(teacher, average) and same(fresh, model)
    assert all(torch.equal(fresh_average.state_dict()[k], v) for k, v in before.items())  # no ema set: left alone
    with pytest.raises(CheckpointError, match="holds no student set"):
        ck.load(ck.latest(), sets={"model": fresh, "student": teacher})


class ReadLog:
    """Which files a storage reads (to tell whether any tensor was read before a refusal)."""

    def __init__(self, ck: Checkpointer) -> None:
        self.names: list[str] = []
        real = ck.storage.read
        ck.storage.read = lambda name: (self.names.append(name), real(name))[1]

    def tensors(self) -> list[str]:
        return [n for n in self.names if n.endswith(".safetensors")]


@pytest.mark.parametrize("kind", ["fixed setting changed", "counters edited", "state edited"])
def test_restore_refuses_before_reading_any_tensor(tmp_path, kind):
    cfg, ck, _ = saved(tmp_path, 4)
    folder = tmp_path / "out" / "checkpoints" / "step-00000004"
    if kind == "fixed setting changed":
        cfg = config(tmp_path, "--train.seed=7")
        error, match = ConfigError, "train.seed=7 but .* which a resume cannot change"
    else:
        record = json.loads((folder / "state.json").read_text())
        record.update(samples=5) if kind == "counters edited" else record.update(wandb_run_id=3)
        (folder / "state.json").write_text(json.dumps(record))
        reseal(folder)
        error, match = InvalidCheckpointError, "samples 5 at step 4" if kind == "counters edited" else "wandb_run_id 3"
    reads = ReadLog(ck)
    fresh, fresh_optimizer, fresh_average = objects(cfg, seed=1)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(error, match=match) as caught:
        restore(cfg, ck, model=fresh, optimizer=fresh_optimizer, ema=fresh_average, dataset_size=DATASET)
    assert "\n" not in str(caught.value)
    assert reads.tensors() == [] and "step-00000004/state.json" in reads.names
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())


def test_restore_falls_back_past_damage_and_checks_the_older_state_too(tmp_path):
    cfg, ck, _ = saved(tmp_path, 2, 4)
    shard = sorted((tmp_path / "out" / "checkpoints" / "step-00000004").glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # bit rot inside a shard: only a full read finds it
    shard.write_bytes(bytes(data))
    fresh, fresh_optimizer, _ = objects(cfg, seed=1)
    restored = restore(cfg, ck, model=fresh, optimizer=fresh_optimizer, dataset_size=DATASET)
    assert restored.step == 2 and restored.state == state_at(cfg, 2)


def test_resume_never_refuses_existing_checkpoints_and_starts_fresh_in_an_empty_dir(tmp_path):
    cfg, ck, (model, optimizer, _) = saved(tmp_path, 1)
    never = config(tmp_path, "--checkpoint.resume=never")
    with pytest.raises(ConfigError, match="checkpoint.resume=never but .* already holds 1 committed"):
        restore(never, ck, model=model, optimizer=optimizer, dataset_size=DATASET)
    empty = config(tmp_path / "elsewhere")
    assert restore(empty, checkpointer(empty), model=model, optimizer=optimizer, dataset_size=DATASET) is None


def test_older_calls_check_the_same_state(tmp_path):
    cfg, ck, _ = saved(tmp_path, 4)
    record = ck.read_record(ck.latest())
    assert check_resume_state(ck.latest(), record, cfg, DATASET) == 4
    with pytest.raises(InvalidCheckpointError, match="epoch .* at step 4"):
        check_resume_state(ck.latest(), record, cfg, DATASET * 2)


# ---- one backoff policy ---------------------------------------------------------------------------------


class Clock:
    """time.monotonic and time.sleep for the backoff module: sleeping advances the clock, nothing waits."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now, self.slept = 100.0, []
        monkeypatch.setattr(backoff_mod, "time", types.SimpleNamespace(monotonic=lambda: self.now, sleep=self.sleep))

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_backoff_doubles_caps_and_ends_its_last_wait_at_the_budget(monkeypatch):
    clock = Clock(monkeypatch)
    policy = Backoff(max_outage_s=10, retry_s=1, max_retry_s=4)
    waits = []
    while (wait := policy.after_failure()) is not None:
        waits.append(wait)
        clock.sleep(wait)
    assert waits == [1, 2, 4, 3] and policy.down_s == 10  # the last try lands at the budget, not past it
    policy.succeeded()
    assert policy.outage.since is None


def test_retry_storage_rides_out_an_outage_then_gives_up_as_transient(monkeypatch):
    clock = Clock(monkeypatch)
    failures, logs = [StorageError("down")] * 3, []

    def action() -> str:
        if failures:
            raise failures.pop()
        return "written"

    assert retry_storage(action, "writing x", max_outage_s=60, retry_s=1, log=logs.append) == "written"
    assert clock.slept == [1, 2, 4] and len(logs) == 3 and "retrying in 1 s" in logs[0]

    def down() -> None:
        raise StorageError("still down")

    with pytest.raises(TransientError, match=r"writing x failed for 5 s \(checkpoint.max_outage_s=5\); last: still down"):
        retry_storage(down, "writing x", max_outage_s=5, retry_s=1, log=logs.append)

    def full() -> None:
        raise StorageFullError("no space")

    slept = len(clock.slept)
    with pytest.raises(StorageFullError):  # waiting does not free space: not retried
        retry_storage(full, "writing x", max_outage_s=5, retry_s=1, log=logs.append)
    assert len(clock.slept) == slept

"""tinydist.ckpt.checkpointer: round trips, HF layout, async saves, retention, corruption, two ranks, S3 (moto)."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
import torchvision

from helpers.faultinject import make_bucket, reseal
from tinydist.ckpt.checkpointer import Checkpointer, CheckpointError
from tinydist.config.units import parse_size
from tinydist.ckpt.layout import DamagedCheckpointError, InvalidCheckpointError
from tinydist.runtime.exitcodes import TransientError

# ---- helpers ---------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny convs on a shared 2-core box: intra-op threads only fight the background writer (10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(kind: str, num_classes: int = 10, seed: int = 0):
    """A resnet18 and an optimizer with two param groups (decay / no decay), like a real recipe."""
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=num_classes)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}]
    if kind == "sgd":
        opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True)
    else:
        opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99))
    return model, opt


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)


def train(model, opt, steps: int = 2, seed: int = 1) -> None:
    model.train()
    for i in range(steps):
        x, y = batch(seed + i)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def trained(kind: str = "sgd"):
    model, opt = build(kind)
    train(model, opt)
    return model, opt


def named_state(model, opt) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {f"{names[id(p)]}.{k}": v for p, s in opt.state.items() for k, v in s.items()}


def assert_same(model_a, opt_a, model_b, opt_b) -> None:
    sa, sb = model_a.state_dict(), model_b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    oa, ob = named_state(model_a, opt_a), named_state(model_b, opt_b)
    assert oa.keys() == ob.keys() and oa
    for k in oa:
        assert torch.equal(oa[k], ob[k]), k
    strip = lambda g: {k: v for k, v in g.items() if k != "params"}  # noqa: E731
    assert [strip(g) for g in opt_a.param_groups] == [strip(g) for g in opt_b.param_groups]


class Logs(list):
    def __call__(self, line: str) -> None:
        self.append(line)


# ---- local ------------------------------------------------------------------------------------------------


def test_parse_size():
    assert parse_size("5MB") == 5_000_000
    assert parse_size("500KB") == 500_000
    assert parse_size("2GB") == 2_000_000_000
    assert parse_size("1GiB") == 2**30
    assert parse_size("0.5 mb") == 500_000
    assert parse_size(1_000_000) == 1_000_000
    for bad in ("5XB", "", "-1MB", "MB", 0, -3, True, 1.5):
        with pytest.raises(ValueError, match="max_shard_size"):
            parse_size(bad)


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_round_trip_then_identical_next_step(tmp_path, kind):
    model, opt = trained(kind)
    ck = Checkpointer(str(tmp_path), keep_last=2, log=Logs())
    ck.save(7, model, opt, {"epoch": 1, "samples": 28, "wandb_run_id": "abc"}, blocking=True)

    fresh_model, fresh_opt = build(kind, seed=123)  # other init, other id()s
    assert not torch.equal(fresh_model.conv1.weight, model.conv1.weight)
    meta = ck.load(ck.latest(), fresh_model, fresh_opt)
    assert_same(model, opt, fresh_model, fresh_opt)
    if kind == "adamw":
        assert fresh_opt.param_groups[0]["betas"] == (0.9, 0.99)
    assert meta["epoch"] == 1 and meta["wandb_run_id"] == "abc"
    assert meta["step"] == 7 and meta["world_size"] == 1 and meta["format"] == "tinydist-checkpoint/1"
    assert meta["versions"]["torch"] == torch.__version__
    assert any(name.startswith("model-") for name in meta["files"])

    train(model, opt, steps=1, seed=50)
    train(fresh_model, fresh_opt, steps=1, seed=50)
    assert_same(model, opt, fresh_model, fresh_opt)


def test_layout_is_hugging_face_and_pickle_free(tmp_path):
    model, opt = trained("sgd")
    Checkpointer(str(tmp_path / "default"), keep_last=1, log=Logs()).save(1, model, opt, {}, blocking=True)
    folder = tmp_path / "default" / "step-00000001"
    n_model = len(list(folder.glob("model-*-of-*.safetensors")))
    n_optim = len(list(folder.glob("optimizer-*-of-*.safetensors")))
    assert n_model > 1 and n_optim > 1  # ~45 MB each with the default 10MB limit

    Checkpointer(str(tmp_path / "small"), keep_last=1, max_shard_size="4MB", log=Logs()).save(
        1, model, opt, {}, blocking=True)
    folder = tmp_path / "small" / "step-00000001"
    model_shards = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(model_shards) > n_model
    n = len(model_shards)
    assert [p.name for p in model_shards] == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index) == {"metadata", "weight_map"}
    sd = model.state_dict()
    assert set(index["weight_map"]) == set(sd)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in sd.values())
    assert {"bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked"} <= set(index["weight_map"])

    # Any safetensors client reads the model without tinydist.
    loaded = {}
    for shard in sorted(set(index["weight_map"].values())):
        loaded.update(safetensors.torch.load_file(folder / shard))
    plain = torchvision.models.resnet18(num_classes=10)
    plain.load_state_dict(loaded)
    for k, v in sd.items():
        assert torch.equal(plain.state_dict()[k], v), k

    optim_index = json.loads((folder / "optimizer.safetensors.index.json").read_text())
    assert "layer1.0.conv1.weight.momentum_buffer" in optim_index["weight_map"]
    assert "fc.bias.momentum_buffer" in optim_index["weight_map"]

    state = json.loads((folder / "state.json").read_text())
    assert state["optimizer"]["param_groups"][0]["params"][0] == "conv1.weight"
    assert state["optimizer"]["param_groups"][1]["nesterov"] is True
    assert set(state["files"]) == {p.name for p in folder.glob("*.safetensors*")}
    assert (folder / "COMMITTED").read_text().strip() == hashlib.sha256((folder / "state.json").read_bytes()).hexdigest()

    # No pickle: every file is safetensors, JSON or the marker's hex line. (A bare "starts with 0x80" test
    # is not enough on its own: a safetensors file whose JSON header is 128 bytes long starts with 0x80.)
    for path in folder.iterdir():
        data = path.read_bytes()
        assert not data.startswith(b"PK\x03\x04"), f"{path.name} is a zip (torch.save) archive"
        if path.suffix == ".safetensors":
            header = int.from_bytes(data[:8], "little")
            assert json.loads(data[8:8 + header])["__metadata__"] == {"format": "pt"}
            safetensors.torch.load(data)
        else:
            assert not data.startswith(b"\x80"), f"{path.name} starts with the pickle magic"
            if path.name == "COMMITTED":
                assert len(data.decode().strip()) == 64
            else:
                json.loads(data)


def test_save_returns_before_writing_and_snapshots_state(tmp_path):
    model, opt = trained("sgd")
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    ck = Checkpointer(str(tmp_path), keep_last=2, log=Logs())
    gate, writing = threading.Event(), threading.Event()
    real_write = ck.storage.write

    def gated_write(path, data):
        writing.set()
        assert gate.wait(30)
        real_write(path, data)

    ck.storage.write = gated_write
    start = time.monotonic()
    ck.save(3, model, opt, {"epoch": 0})
    assert time.monotonic() - start < 5
    assert writing.wait(10)  # the background thread is at its first write, and held there
    assert ck.committed() == [] and ck.latest() is None

    with torch.no_grad():  # training goes on and mutates everything in place
        for t in model.state_dict().values():
            t.add_(1)
    gate.set()
    ck.wait()
    assert ck.committed() == [f"{tmp_path}/step-00000003"]

    fresh, fresh_opt = build("sgd", seed=9)
    ck.load(ck.latest(), fresh, fresh_opt)
    for k, v in expected.items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_parameters_are_copied_while_the_loop_runs_until_the_barrier(tmp_path):
    """Zero-stall saves: BN buffers are copied inside save(); parameters and optimizer state, which only an
    optimizer step changes, are copied in the background; snapshot_barrier() (before that step) waits."""
    model, opt = trained("sgd")
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    ck = Checkpointer(str(tmp_path), keep_last=2, log=Logs())
    gate = threading.Event()
    real_copy = ck._snapshot.copy

    def slow_copy(tensors, prefix, buffers=None):
        if prefix == "optimizer/":  # the background part: held until the test lets it go
            assert gate.wait(30)
        return real_copy(tensors, prefix, buffers)

    ck._snapshot.copy = slow_copy
    ck.save(5, model, opt, {})
    with torch.no_grad():  # the next forward changes BN buffers at once: they were copied already
        for name, buffer in model.named_buffers():
            buffer.add_(1)
    assert not ck._inflight.pending.copied.is_set()  # still copying in the background
    gate.set()
    ck.snapshot_barrier()  # what the loop calls before its optimizer step
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1)
        for state in opt.state.values():
            state["momentum_buffer"].add_(1)
    ck.wait()
    fresh, fresh_opt = build("sgd", seed=9)
    ck.load(ck.latest(), fresh, fresh_opt)
    for k, v in expected.items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_keep_last_and_leftovers(tmp_path):
    model, opt = trained("sgd")
    (tmp_path / "step-00000000").mkdir()  # an interrupted save older than every commit
    (tmp_path / "step-00000000" / "model-00001-of-00005.safetensors").write_bytes(b"partial")
    (tmp_path / "step-00000099").mkdir()  # newer than every commit: may be in flight, must stay
    logs = Logs()
    ck = Checkpointer(str(tmp_path), keep_last=2, log=logs)
    for step in range(1, 6):
        ck.save(step, model, opt, {}, blocking=step == 5)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["step-00000004", "step-00000005", "step-00000099"]
    assert ck.committed() == [f"{tmp_path}/step-00000004", f"{tmp_path}/step-00000005"]
    logs.clear()
    assert ck.latest() == f"{tmp_path}/step-00000005"
    assert len(logs) == 1 and "step-00000099" in logs[0] and "COMMITTED" in logs[0]


def _truncate(folder: Path) -> str:
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:1000])
    return "size mismatch on file " + shard.name


def _flip(folder: Path) -> str:
    shard = sorted(folder.glob("optimizer-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    return "checksum mismatch on file " + shard.name


def _no_marker(folder: Path) -> str:
    (folder / "COMMITTED").unlink()
    return "missing COMMITTED marker"


def _missing_shard(folder: Path) -> str:
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    return f"file {shard.name} listed in state.json is missing"


def _index_points(target: str):
    def corrupt(folder: Path) -> str:
        index_path = folder / "model.safetensors.index.json"
        index = json.loads(index_path.read_text())
        index["weight_map"]["fc.weight"] = target
        index_path.write_text(json.dumps(index))
        reseal(folder)
        return "leaves the folder"
    return corrupt


@pytest.mark.parametrize("corrupt", [_truncate, _flip, _no_marker, _missing_shard],
                         ids=["truncated", "flipped-byte", "no-marker", "missing-shard"])
def test_corrupt_checkpoint_is_skipped_loudly(tmp_path, corrupt):
    model, opt = trained("sgd")
    logs = Logs()
    ck = Checkpointer(str(tmp_path), keep_last=5, log=logs)
    ck.save(1, model, opt, {}, blocking=True)
    ck.save(2, model, opt, {}, blocking=True)
    reason = corrupt(tmp_path / "step-00000002")

    logs.clear()
    # latest() reads no tensors: a flipped byte inside a shard shows only when the shard is read.
    cheap = ck.latest()
    assert cheap == f"{tmp_path}/step-0000000{2 if corrupt is _flip else 1}"
    logs.clear()
    fresh_model, fresh_opt = build("sgd")
    path, state = ck.load_latest(fresh_model, fresh_opt)
    assert path == f"{tmp_path}/step-00000001" and state["step"] == 1  # fell back past the damage
    assert len(logs) == 1 and "step-00000002" in logs[0] and reason in logs[0], logs
    assert_same(fresh_model, fresh_opt, model, opt)
    with pytest.raises(DamagedCheckpointError) as err:
        ck.load(f"{tmp_path}/step-00000002", *build("sgd"))
    message = str(err.value)
    assert "\n" not in message and "step-00000002" in message and reason in message


def _state_edit(**changes):
    def corrupt(folder: Path) -> str:
        state = json.loads((folder / "state.json").read_text())
        state.update(changes)
        (folder / "state.json").write_text(json.dumps(state))
        reseal(folder)
        return "step" if "step" in changes else "world_size"
    return corrupt


@pytest.mark.parametrize("edit", [_index_points("../step-00000001/model-00001-of-00005.safetensors"),
                                  _index_points("/etc/passwd"), _index_points("..\\evil.safetensors"),
                                  _state_edit(step=10**30), _state_edit(step=-1), _state_edit(step="abc"),
                                  _state_edit(world_size=0)],
                         ids=["dotdot", "absolute", "backslash", "step-huge", "step-negative", "step-text",
                              "world-size-0"])
def test_edited_checkpoint_is_refused_not_skipped(tmp_path, edit):
    """Checksums fixed up after an edit: not damage but someone else's hand. Falling back to an older
    checkpoint (or, with none, starting over) would hide it: refuse in one line."""
    model, opt = trained("sgd")
    ck = Checkpointer(str(tmp_path), keep_last=5, log=Logs())
    ck.save(1, model, opt, {}, blocking=True)
    ck.save(2, model, opt, {}, blocking=True)
    reason = edit(tmp_path / "step-00000002")
    with pytest.raises(InvalidCheckpointError) as err:
        ck.load_latest(*build("sgd"))  # an edited index shows when it is read; state.json edits at once
    message = str(err.value)
    assert "\n" not in message and "step-00000002" in message and reason in message
    with pytest.raises(InvalidCheckpointError):
        ck.load(f"{tmp_path}/step-00000002", *build("sgd"))


def test_wrong_model_or_optimizer_is_a_one_line_error(tmp_path):
    model, opt = trained("sgd")
    ck = Checkpointer(str(tmp_path), keep_last=2, log=Logs())
    ck.save(1, model, opt, {}, blocking=True)
    path = ck.latest()

    with pytest.raises(CheckpointError) as err:
        ck.load(path, *build("sgd", num_classes=7))
    message = str(err.value)
    assert "\n" not in message
    assert "fc.weight" in message and "(10, 512)" in message and "(7, 512)" in message
    assert "number of classes" in message

    other = torchvision.models.resnet18(num_classes=10)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    one_group = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(CheckpointError, match="param groups differ"):
        ck.load(path, other, one_group)
    for k, v in before.items():  # validated before anything was touched
        assert torch.equal(other.state_dict()[k], v), k
    with pytest.raises(CheckpointError, match="saved from SGD"):
        ck.load(path, *build("adamw"))
    with pytest.raises(CheckpointError, match="not JSON-serialisable"):
        ck.save(2, model, opt, {"when": object()})


def test_optimizer_state_for_unknown_param_is_rejected(tmp_path):
    model, opt = trained("sgd")
    ck = Checkpointer(str(tmp_path), keep_last=2, log=Logs())
    ck.save(1, model, opt, {}, blocking=True)
    folder = tmp_path / "step-00000001"
    index_path = folder / "optimizer.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = index["weight_map"]["fc.bias.momentum_buffer"]
    tensors = safetensors.torch.load((folder / shard).read_bytes())
    tensors["head.bias.momentum_buffer"] = tensors.pop("fc.bias.momentum_buffer")
    (folder / shard).write_bytes(safetensors.torch.save(tensors))
    index["weight_map"]["head.bias.momentum_buffer"] = index["weight_map"].pop("fc.bias.momentum_buffer")
    index_path.write_text(json.dumps(index))
    reseal(folder)
    with pytest.raises(CheckpointError, match="'head.bias' which the optimizer does not have"):
        ck.load(str(folder), *build("sgd"))


def test_two_ranks_split_the_shards_and_commit_once(tmp_path):
    model, opt = trained("adamw")
    logs = [Logs(), Logs()]
    ranks = [Checkpointer(str(tmp_path), keep_last=2, max_shard_size="5MB", rank=r, world_size=2, log=logs[r])
             for r in range(2)]
    real_write = ranks[1].storage.write

    def slow_write(path, data):  # rank 1 lags, so rank 0 really has to wait for its part file
        time.sleep(0.05)
        real_write(path, data)

    ranks[1].storage.write = slow_write
    # Each rank calls save from its own thread, as two processes would.
    threads = [threading.Thread(target=ck.save, args=(4, model, opt, {"epoch": 0}), kwargs={"blocking": True})
               for ck in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for ck in ranks:
        ck.wait()

    folder = tmp_path / "step-00000004"
    parts = [json.loads((folder / f"part-{r:05d}.json").read_text())["files"] for r in range(2)]
    shards = {p.name for p in folder.glob("*-of-*.safetensors")}
    assert parts[0] and parts[1] and not set(parts[0]) & set(parts[1])
    assert set(parts[0]) | set(parts[1]) == shards | {"model.safetensors.index.json", "optimizer.safetensors.index.json"}
    for r in range(2):  # rank r wrote shards k-1 with (k-1) % 2 == r
        for name in parts[r]:
            if "-of-" in name:
                k = int(name.split("-")[1])
                assert (k - 1) % 2 == r, (r, name)
    assert sum("committed" in line for line in logs[0]) == 1 and not logs[1]

    state = json.loads((folder / "state.json").read_text())
    assert state["world_size"] == 2 and set(state["files"]) == set(parts[0]) | set(parts[1])
    # Resume with another world size: one process loads it all.
    single = Checkpointer(str(tmp_path), keep_last=2, log=Logs())
    fresh_model, fresh_opt = build("adamw", seed=5)
    assert single.load(single.latest(), fresh_model, fresh_opt)["world_size"] == 2
    assert_same(model, opt, fresh_model, fresh_opt)


def test_stale_part_file_from_an_interrupted_attempt_is_not_trusted(tmp_path):
    """A part file left by an attempt on another world size, with every file it lists present at the
    size it says: only its identity (step, world_size, rank) can tell rank 0 it is not this attempt's."""
    model, opt = trained("sgd")
    folder = tmp_path / "step-00000004"  # a save at step 4 on 4 GPUs was preempted half-way
    folder.mkdir()
    leftover = b"half a shard"  # what that attempt's rank 1 had written: it is there, at the listed size
    (folder / "model-00002-of-00005.safetensors").write_bytes(leftover)
    stale = {"step": 4, "world_size": 4, "rank": 1, "files": {"model-00002-of-00005.safetensors": {
        "sha256": hashlib.sha256(leftover).hexdigest(), "bytes": len(leftover)}}}
    (folder / "part-00001.json").write_text(json.dumps(stale))
    ranks = [Checkpointer(str(tmp_path), keep_last=2, rank=r, world_size=2, log=Logs()) for r in range(2)]
    waiting, real_wait = threading.Event(), ranks[0]._committer.wait_for_parts

    def wait_for_parts(*args, **kwargs):  # rank 0 wrote its own files and now looks for the others' parts
        waiting.set()
        return real_wait(*args, **kwargs)

    ranks[0]._committer.wait_for_parts = wait_for_parts
    ranks[0].save(4, model, opt, {})
    assert waiting.wait(60)
    time.sleep(0.5)  # several polls, each of which sees the stale part and its file at the listed size
    assert ranks[0].committed() == []  # rank 0 is still waiting for a part of *this* attempt
    ranks[1].save(4, model, opt, {})
    ranks[1].wait()
    ranks[0].wait()
    assert ranks[0].latest() == f"{tmp_path}/step-00000004"
    assert json.loads((folder / "part-00001.json").read_text())["world_size"] == 2
    state = json.loads((folder / "state.json").read_text())
    assert state["files"]["model-00002-of-00005.safetensors"]["bytes"] != len(leftover)  # this attempt's shard
    fresh_model, fresh_opt = build("sgd", seed=5)
    ranks[0].load(ranks[0].latest(), fresh_model, fresh_opt)
    assert_same(model, opt, fresh_model, fresh_opt)


def test_file_url_and_optimizer_without_state(tmp_path):
    model, opt = build("adamw")  # saved before the first step: no optimizer tensors yet
    ck = Checkpointer(f"file://{tmp_path}/ck", keep_last=1, log=Logs())
    ck.save(0, model, opt, {"epoch": 0}, blocking=True)
    assert ck.committed() == [f"file://{tmp_path}/ck/step-00000000"]
    assert not list((tmp_path / "ck" / "step-00000000").glob("optimizer-*"))
    fresh_model, fresh_opt = build("adamw", seed=4)
    ck.load(ck.latest(), fresh_model, fresh_opt)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh_model.state_dict()[k], v), k
    assert not fresh_opt.state and fresh_opt.param_groups[0]["betas"] == (0.9, 0.99)


def test_missing_rank_times_out_without_commit(tmp_path):
    model, opt = trained("sgd")
    logs = Logs()
    ck = Checkpointer(str(tmp_path), keep_last=2, rank=0, world_size=2, log=logs, commit_timeout_s=0.5)
    with pytest.raises(TransientError, match=r"part-00001\.json.*not committed"):  # a lost peer: relaunch
        ck.save(1, model, opt, {}, blocking=True)
    assert len(logs) == 1 and "not committed" in logs[0]
    assert ck.committed() == [] and ck.latest() is None


def test_saving_a_committed_step_again_leaves_it_alone(tmp_path):
    model, opt = trained("sgd")
    logs = Logs()
    ck = Checkpointer(str(tmp_path), keep_last=2, log=logs)
    ck.save(1, model, opt, {"first": True}, blocking=True)
    before = (tmp_path / "step-00000001" / "state.json").read_bytes()
    ck.save(1, model, opt, {"first": False}, blocking=True)
    assert (tmp_path / "step-00000001" / "state.json").read_bytes() == before
    assert "already committed" in logs[-1]


# ---- S3, for real, against moto's server on localhost -----------------------------------------------------


@pytest.fixture
def bucket(moto):
    """A fresh bucket on the module's moto server (conftest.py), and the storage options to reach it."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # no client (or listing cache) carried over from another test
    yield make_bucket(moto), {"endpoint_url": moto}
    s3fs.S3FileSystem.clear_instance_cache()


def _keys(endpoint: str, bucket_name: str) -> list[str]:
    import boto3

    listing = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=bucket_name)
    return sorted(obj["Key"] for obj in listing.get("Contents", []))


def test_s3_save_list_load_and_keep_last(bucket):
    name, options = bucket
    model, opt = trained("sgd")
    logs = Logs()
    ck = Checkpointer(f"s3://{name}/run1/", keep_last=2, log=logs, storage_options=options)
    for step in (1, 2, 3):
        ck.save(step, model, opt, {"epoch": step}, blocking=True)
        train(model, opt, steps=1, seed=10 + step)

    url = f"s3://{name}/run1"
    assert ck.committed() == [f"{url}/step-00000002", f"{url}/step-00000003"]
    folders = {key.split("/")[1] for key in _keys(options["endpoint_url"], name)}
    assert folders == {"step-00000002", "step-00000003"}  # step 1 is gone from the bucket
    assert "run1/step-00000003/COMMITTED" in _keys(options["endpoint_url"], name)

    # A new process (new Checkpointer, fresh fs instance) finds and loads it.
    import s3fs
    s3fs.S3FileSystem.clear_instance_cache()
    reader = Checkpointer(url, keep_last=2, log=Logs(), storage_options=options)
    assert reader.latest() == f"{url}/step-00000003"
    fresh_model, fresh_opt = build("sgd", seed=77)
    meta = reader.load(reader.latest(), fresh_model, fresh_opt)
    assert meta["epoch"] == 3 and meta["step"] == 3
    model_at_3, opt_at_3 = trained("sgd")
    for step in (1, 2):
        train(model_at_3, opt_at_3, steps=1, seed=10 + step)
    assert_same(model_at_3, opt_at_3, fresh_model, fresh_opt)


def _wait_for(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def _flaky_network(ck: Checkpointer):
    """The bucket's connection drops after the first object of each attempt, until `down` is cleared."""
    real_pipe, down, written = ck.storage.fs.pipe_file, threading.Event(), []

    def pipe_file(path, data, **kwargs):
        if down.is_set() and any(p.rsplit("/", 2)[-2] == path.rsplit("/", 2)[-2] for p in written):
            raise ConnectionError("spot VM lost its network")
        real_pipe(path, data, **kwargs)
        written.append(path)

    down.set()
    ck.storage.fs.pipe_file = pipe_file
    return down


@pytest.mark.slow  # an injected network fault under a retrying save
def test_s3_outage_mid_save_is_retried_while_training_goes_on(bucket):
    name, options = bucket
    model, opt = trained("sgd")
    logs = Logs()
    url = f"s3://{name}/run2"
    ck = Checkpointer(url, keep_last=2, log=logs, storage_options=options, retry_s=0.05, max_retry_s=0.2)
    ck.save(3, model, opt, {}, blocking=True)

    down = _flaky_network(ck)
    start = time.monotonic()
    ck.save(4, model, opt, {})
    assert time.monotonic() - start < 5  # the loop does not wait for the storage
    assert _wait_for(lambda: sum("retrying" in line for line in logs) >= 2)
    failure = next(line for line in logs if "retrying" in line)
    assert "step-00000004" in failure and "ConnectionError: spot VM lost its network" in failure and "\n" not in failure
    assert ck.committed() == [f"{url}/step-00000003"]
    # Each failed attempt removed what it wrote: nothing of step 4 is in the bucket.
    assert not [k for k in _keys(options["endpoint_url"], name) if "step-00000004" in k]

    down.clear()  # the network is back: the retry commits, and cleans nothing it shouldn't
    ck.wait()
    assert ck.fault is None
    assert ck.committed() == [f"{url}/step-00000003", f"{url}/step-00000004"]
    fresh, fresh_opt = build("sgd", seed=3)
    ck.load(ck.latest(), fresh, fresh_opt)
    assert_same(model, opt, fresh, fresh_opt)


@pytest.mark.slow  # an injected network fault under a retrying save
def test_s3_save_still_retrying_is_superseded_by_the_next(bucket):
    name, options = bucket
    model, opt = trained("sgd")
    logs = Logs()
    url = f"s3://{name}/run3"
    ck = Checkpointer(url, keep_last=2, log=logs, storage_options=options, retry_s=0.05, max_retry_s=0.1)
    ck.save(1, model, opt, {}, blocking=True)
    down = _flaky_network(ck)
    ck.save(2, model, opt, {})
    assert _wait_for(lambda: any("retrying" in line for line in logs))
    train(model, opt, steps=1, seed=7)
    start = time.monotonic()
    ck.save(3, model, opt, {})  # replaces the retrying step-2 save instead of waiting for the network
    assert time.monotonic() - start < 5
    down.clear()
    ck.wait()
    assert ck.committed() == [f"{url}/step-00000001", f"{url}/step-00000003"]
    fresh, fresh_opt = build("sgd", seed=3)
    ck.load(ck.latest(), fresh, fresh_opt)
    assert_same(model, opt, fresh, fresh_opt)
    assert not [k for k in _keys(options["endpoint_url"], name) if "step-00000002" in k]


@pytest.mark.slow  # an injected network fault under a retrying save
def test_s3_outage_longer_than_the_budget_stops_the_run_as_transient(bucket):
    name, options = bucket
    model, opt = trained("sgd")
    logs = Logs()
    ck = Checkpointer(f"s3://{name}/run4", keep_last=2, log=logs, storage_options=options, retry_s=0.05,
                      max_retry_s=0.1, max_outage_s=0.5)
    ck.save(1, model, opt, {}, blocking=True)
    _flaky_network(ck)
    ck.save(2, model, opt, {})
    assert _wait_for(lambda: ck.fault is not None)
    assert isinstance(ck.fault, TransientError) and "max_outage_s=0.5" in str(ck.fault)
    ck.wait()  # a background save's outage is reported through `fault`, for all ranks to agree on
    with pytest.raises(TransientError, match="no checkpoint committed"):
        ck.save(3, model, opt, {}, blocking=True)  # a final save: raises once the budget is spent
    assert ck.committed() == [f"s3://{name}/run4/step-00000001"]

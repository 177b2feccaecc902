"""The edges of a run: after the last step (a rerun, an export cut short) and a run that diverges.

A finished run rerun exits 0 without touching its checkpoints, and under the spot loop launches once;
an export left partial is finished by the next launch, byte for byte what an uninterrupted one wrote;
a loss or a weight that turns NaN stops the run with exit 2 in one line, and no checkpoint holding a
non-finite tensor is ever committed, so retention never rotates the last good one out.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torchvision

from tinydist.ckpt.checkpointer import Checkpointer
from tinydist.runtime.cli import exit_code_for
from tinydist.runtime.divergence import DivergedError, DivergenceGuard, finite_or_none, nonfinite_tensors
from tinydist.runtime.exitcodes import EXIT_CONFIG
from helpers.train import REPO, committed_checkpoints, describe, error_lines, run, run_train, tiny_args, train_env


# ---- fast: the guard and the checkpointer ------------------------------------------------------------

def test_nonfinite_tensors_names_only_float_tensors_with_nan_or_inf():
    tensors = {"ok": torch.ones(3), "nan": torch.tensor([1.0, math.nan]), "inf": torch.tensor([-math.inf]),
               "steps": torch.tensor([3], dtype=torch.int64)}
    assert nonfinite_tensors(tensors) == ["nan", "inf"]
    # Finite values whose sum overflows are finite; +inf and -inf together (a NaN sum) are not.
    big = {"sum overflows": torch.full((4,), 3e38), "half": torch.full((70000,), 60000.0, dtype=torch.float16),
           "both infinities": torch.tensor([math.inf, -math.inf]), "bf16 nan": torch.tensor([math.nan], dtype=torch.bfloat16)}
    assert nonfinite_tensors(big) == ["both infinities", "bf16 nan"]


def test_metrics_become_strict_json():
    metrics = finite_or_none({"val/loss": math.nan, "val/top1": 0.5, "train/lr": math.inf, "images": 3})
    assert metrics == {"val/loss": None, "val/top1": 0.5, "train/lr": None, "images": 3}
    json.dumps(metrics, allow_nan=False)  # raises on NaN/Infinity


def test_the_guard_says_where_the_divergence_began_and_what_is_kept():
    guard = DivergenceGuard(step=0)
    guard.check_loss(2.3, step=10, last_commit=None)  # vouches for the weights up to step 9
    with pytest.raises(DivergedError) as e:
        guard.check_loss(math.nan, step=20, last_commit=10)
    message = str(e.value)
    assert message.startswith("loss is nan at step 20 (first seen between steps 10 and 20); the last checkpoint, "
                              "step 10, is finite and kept; lower optim.lr"), message
    assert "\n" not in message and e.value.step == 20 and exit_code_for(e.value) == EXIT_CONFIG


def test_a_checkpoint_with_a_nan_tensor_is_never_committed(tmp_path):
    model = torchvision.models.resnet18(num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ck = Checkpointer(str(tmp_path), keep_last=1, log=lambda _: None)
    ck.save(1, model, optimizer, {"metrics": {}}, blocking=True)
    with torch.no_grad():
        model.layer2[0].conv1.weight[0, 0, 0, 0] = math.nan
    with pytest.raises(DivergedError) as e:
        ck.save(2, model, optimizer, {"metrics": {}}, blocking=True)
    assert "layer2.0.conv1.weight" in str(e.value) and e.value.step == 2
    assert [Path(p).name for p in ck.committed()] == ["step-00000001"]  # keep_last=1 kept the finite one
    assert not (tmp_path / "step-00000002").exists()  # what the attempt wrote is gone
    assert isinstance(ck.fault, DivergedError) and ck.last_commit == 1


def test_a_periodic_save_of_nan_weights_sets_the_fault_the_loop_stops_on(tmp_path):
    model = torchvision.models.resnet18(num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ck = Checkpointer(str(tmp_path), keep_last=2, log=lambda _: None)
    with torch.no_grad():
        model.fc.bias[3] = math.inf
    ck.save(5, model, optimizer, {}, blocking=False)
    ck.snapshot_barrier()
    with pytest.raises(DivergedError):
        ck.wait()
    assert isinstance(ck.fault, DivergedError) and ck.committed() == []


def test_meta_with_nan_is_refused_before_anything_is_written(tmp_path):
    model = torch.nn.Linear(2, 2)
    ck = Checkpointer(str(tmp_path), keep_last=1, log=lambda _: None)
    with pytest.raises(Exception, match="finite numbers"):
        ck.save(1, model, torch.optim.SGD(model.parameters(), lr=0.1), {"metrics": {"val/loss": math.nan}})
    assert list(tmp_path.iterdir()) == []


# ---- slow: real runs -------------------------------------------------------------------------------------

def _tree(folder: Path) -> dict[str, tuple[str, int]]:
    """{relative path: (sha256, mtime_ns)} of every file under `folder`."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _digests(folder: Path) -> dict[str, str]:
    return {name: digest for name, (digest, _) in _tree(folder).items()}


@pytest.fixture(scope="module")
def finished_run(cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("edges") / "out"
    # checkpoint.dir spelt out, as the spot loop passes it: the rerun's config is then the same
    args = tiny_args(cache_dir, str(out), train__max_steps=4, checkpoint__every_steps=2,
                     checkpoint__dir=str(out / "checkpoints"))
    result = run_train(args, env=train_env())
    assert result.returncode == 0, describe(result)
    return out, args


@pytest.mark.slow
def test_a_finished_run_reruns_under_the_spot_loop_once_exits_0_and_touches_no_checkpoint(finished_run):
    out, args = finished_run
    checkpoints, export = _tree(out / "checkpoints"), _tree(out / "model")
    metrics = (out / "metrics.jsonl").read_bytes()
    env = train_env({"TRAIN_CMD": f"{os.sys.executable} -m tinydist.train", "CHECKPOINT_DIR": str(out / "checkpoints"),
                     "BACKOFF_S": "1", "MAX_ATTEMPTS": "3", "PREEMPT_DELAY_S": "0"})
    result = run([str(REPO / "launch" / "spot_relaunch.sh"), *args], env, timeout=240)
    assert result.returncode == 0, describe(result)
    log = result.stdout + result.stderr
    assert log.count("spot_relaunch: launch ") == 1, log
    assert "the run is finished (step 4 of 4); completing the export only" in log, log
    assert "already complete and current, left as it was" in log, log
    assert _tree(out / "checkpoints") == checkpoints  # same files, same bytes, not even rewritten
    assert _tree(out / "model") == export
    assert (out / "metrics.jsonl").read_bytes() == metrics  # no "resumed" event: one curve, unchanged


@pytest.mark.slow
def test_an_export_cut_short_is_finished_by_the_next_launch_byte_identical(finished_run):
    out, args = finished_run
    model = out / "model"
    expected = _digests(model)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    # What a kill or a full disk mid-export leaves: the index and a shard never written, no config.json,
    # and a half-written temporary folder.
    for name in ("model.safetensors.index.json", shard, "config.json"):
        (model / name).unlink()
    (out / "model.partial").mkdir()
    (out / "model.partial" / "model-00001-of-00009.safetensors").write_bytes(b"torn")
    checkpoints = _tree(out / "checkpoints")
    result = run_train(args, env=train_env())
    assert result.returncode == 0, describe(result)
    assert "left as it was" not in result.stdout, result.stdout
    assert _digests(model) == expected
    assert not (out / "model.partial").exists() and not list(out.glob("model.old-*"))
    assert _tree(out / "checkpoints") == checkpoints


@pytest.mark.slow
def test_a_diverging_run_exits_2_in_one_line_and_commits_nothing_nonfinite(cache_dir, tmp_path):
    out = tmp_path / "out"
    # A good start: step 2 committed with a sane learning rate (keep_last=1, no best kept) ...
    good = tiny_args(cache_dir, str(out), train__max_steps=2, checkpoint__keep_last=1, checkpoint__best_metric="none")
    assert run_train(good, env=train_env()).returncode == 0
    shutil.rmtree(out / "model")
    # ... then resumed with a learning rate that blows up: the saves that follow must not rotate it out.
    bad = tiny_args(cache_dir, str(out), train__max_steps=16, checkpoint__keep_last=1, checkpoint__every_steps=1,
                    checkpoint__best_metric="none", optim__lr=1e4, log__every_steps=1)
    result = run_train(bad, env=train_env())
    assert result.returncode == 2, describe(result)
    errors = error_lines(result)
    assert len(errors) == 1 and "Traceback" not in result.stderr, describe(result)
    assert ("nan" in errors[0] or "NaN" in errors[0]) and "first seen" in errors[0] and "lower optim.lr" in errors[0]
    committed = committed_checkpoints(str(out))
    assert committed, "the last finite checkpoint must be kept"
    newest = Path(committed[-1])
    assert f"the last checkpoint, step {int(newest.name.split('-')[1])}, is finite and kept" in errors[0], errors[0]
    for folder in map(Path, committed):
        state = json.loads((folder / "state.json").read_text(),
                           parse_constant=lambda c: pytest.fail(f"{folder}/state.json holds bare {c}"))
        assert state["step"] >= 2
        for shard in folder.glob("*.safetensors"):
            assert not nonfinite_tensors(safetensors.torch.load_file(str(shard))), shard
    assert not (out / "model").exists()  # nothing exported from a diverged run

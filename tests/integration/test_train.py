"""The training loop, end to end, as real processes: a gloo group of two, world-size independence,
learning on real data, the softmax guard, trackers, metrics.jsonl, the exported model, batch arithmetic.
Every test that runs a process is marked slow; the softmax guard's unit tests are the fast part.

Every training process runs with one intra-op thread (helpers.train.train_env). The full smoke recipe
(shared by the learning, metrics and export tests) is most of the cost: about 75 s of CPU.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers.train import (PYTHON, SMOKE, committed_checkpoints, describe, error_lines, load_model_dir, read_metrics,
                           resnet18_parameter_names, run, run_train, tensorboard_scalars, tiny_args, train_env,
                           wandb_history)

from tinydist.config import load_config
from tinydist.loop.triggers import validation_every_epochs
from tinydist.model.build import SoftmaxBeforeLossError, build_model, check_first_step

SUBPROCESS_TIMEOUT = 300
SMOKE_TIMEOUT = 900  # the full recipe: ~45 s alone (one thread), several times that on a busy shared box


# ---- 1. two processes really form a group -----------------------------------------------------------------

WORLD_DRIVER = """
import json, os, sys
import torch
import torch.distributed as dist
from tinydist.loop.accel import make_accelerator

acc = make_accelerator()
rank = acc.process_index
# Real collectives: a sum of ranks and every process's pid, gathered.
total = acc.reduce(torch.tensor([float(rank + 1)]), "sum").item()
pids = acc.gather(torch.tensor([os.getpid()])).tolist()
info = {"num_processes": acc.num_processes, "process_index": rank, "pid": os.getpid(), "pids": pids,
        "sum_of_rank_plus_one": total, "device": acc.device.type,
        "dist_initialized": dist.is_initialized(),
        "dist_world_size": dist.get_world_size() if dist.is_initialized() else None,
        "backend": dist.get_backend() if dist.is_initialized() else None}
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
    json.dump(info, f)
acc.wait_for_everyone()
acc.end_training()
"""


@pytest.mark.slow
def test_two_processes_form_one_gloo_group(tmp_path):
    """`tinydist.launch --multi_gpu --num_processes 2` on a CPU-only box: make_accelerator() gives each
    process world size 2, distinct ranks 0 and 1, and collectives that span both processes."""
    driver = tmp_path / "world_driver.py"
    driver.write_text(WORLD_DRIVER)
    out = tmp_path / "ranks"
    out.mkdir()
    result = run_train([str(out)], nprocs=2, script=str(driver), timeout=SUBPROCESS_TIMEOUT)
    assert result.returncode == 0, describe(result)
    infos = sorted((json.loads(p.read_text()) for p in out.glob("rank*.json")), key=lambda i: i["process_index"])
    assert [i["process_index"] for i in infos] == [0, 1], describe(result)
    pids = {i["pid"] for i in infos}
    assert len(pids) == 2, f"both ranks ran in one process: {infos}"
    for info in infos:
        assert info["num_processes"] == 2, info
        assert info["dist_initialized"] and info["dist_world_size"] == 2, info
        assert info["backend"] == "gloo" and info["device"] == "cpu", info
        assert info["sum_of_rank_plus_one"] == 3.0, f"all-reduce did not span both processes: {info}"
        assert set(info["pids"]) == pids, f"all-gather did not see both processes: {info}"


# ---- 2. world-size independence: 2 processes x accumulation 1 == 1 process x accumulation 2 -----------------

PAIR_STEPS = 3


@pytest.fixture(scope="module")
def tiny_pair(cache_dir, tmp_path_factory):
    """The same 3 steps (global batch 16, micro batch 8) on 2 processes and on 1 process.
    OMP_NUM_THREADS=1 for both (train_env's default, pinned here): torchrun gives each worker one thread,
    and a different intra-op thread count changes the float summation order in the convolutions, which
    this little network (digits, micro-batch BN) amplifies from 1e-7 to 1e-4 in three steps (a 1e-7
    relative nudge of the initial weights does the same). With equal thread counts the two trajectories
    agree to the last bit, so the comparison can be tight."""
    root = tmp_path_factory.mktemp("pair")
    env = train_env({"OMP_NUM_THREADS": "1"})
    runs = {}
    for nprocs in (2, 1):
        out = str(root / f"procs{nprocs}")
        args = tiny_args(cache_dir, out, train__max_steps=PAIR_STEPS, train__global_batch_size=16,
                         train__micro_batch_size=8, train__seed=7, log__every_steps=1)
        runs[nprocs] = (out, run_train(args, nprocs=nprocs, env=env, timeout=SUBPROCESS_TIMEOUT))
    return runs


@pytest.mark.slow
def test_two_process_training_run(tiny_pair):
    out, result = tiny_pair[2]
    assert result.returncode == 0, describe(result)
    assert "tinydist: 2 process(es), device cpu" in result.stdout, describe(result)
    assert "global batch 16 = 8 x 2 processes x 1 accumulation" in result.stdout, describe(result)
    assert [Path(p).name for p in committed_checkpoints(out)] == [f"step-{PAIR_STEPS:08d}"]
    assert os.path.isfile(os.path.join(out, "model", "model.safetensors.index.json"))
    train_steps = [m["step"] for m in read_metrics(out) if "train/loss" in m]
    assert train_steps == list(range(1, PAIR_STEPS + 1)), "one process should write metrics.jsonl, once per step"


@pytest.mark.slow
def test_two_processes_match_one_process_with_accumulation(tiny_pair):
    (out2, run2), (out1, run1) = tiny_pair[2], tiny_pair[1]
    assert run2.returncode == 0, describe(run2)
    assert run1.returncode == 0, describe(run1)
    assert "global batch 16 = 8 x 1 processes x 2 accumulation" in run1.stdout, describe(run1)
    two, one = load_model_dir(os.path.join(out2, "model")), load_model_dir(os.path.join(out1, "model"))
    assert sorted(two) == sorted(one)
    names = resnet18_parameter_names(10)
    diffs = {n: (two[n].double() - one[n].double()).abs().max().item() for n in names}
    worst = max(diffs, key=diffs.get)
    bad = [n for n in names if not torch.allclose(two[n], one[n], rtol=1e-5, atol=1e-6)]
    assert not bad, (f"{len(bad)} of {len(names)} parameters differ after {PAIR_STEPS} steps; max abs difference "
                     f"{diffs[worst]:.3g} in {worst}; first: {bad[:5]}")
    # BN running statistics: train.py updates them on each step's first global micro-batch only (rank 0's
    # under DDP), so they too are the same on any number of processes.
    buffers = [n for n in one if n not in diffs]
    bad = [n for n in buffers if not torch.allclose(two[n].double(), one[n].double(), rtol=1e-5, atol=1e-6)]
    assert not bad, f"{len(bad)} of {len(buffers)} BN buffers differ: " + ", ".join(
        f"{n} (max abs {(two[n].double() - one[n].double()).abs().max().item():.3g})" for n in bad[:5])
    assert one["bn1.num_batches_tracked"].item() == PAIR_STEPS, "one BN update per optimizer step"
    # And the training actually moved the weights (so the comparison is not between two initialisations).
    torch.manual_seed(7)
    import torchvision

    init = torchvision.models.resnet18(num_classes=10).state_dict()
    moved = max((one[n] - init[n]).abs().max().item() for n in names)
    assert moved > 1e-3, f"weights barely moved from the seed's initialisation ({moved:.3g}): nothing was compared"
    # The logged loss is the mean over the same global batch, whatever the world size.
    loss2 = [m["train/loss"] for m in read_metrics(out2) if "train/loss" in m]
    loss1 = [m["train/loss"] for m in read_metrics(out1) if "train/loss" in m]
    assert len(loss1) == len(loss2) == PAIR_STEPS
    assert loss2 == pytest.approx(loss1, rel=1e-5, abs=1e-6), (loss2, loss1)


# ---- 4. softmax guard ------------------------------------------------------------------------------------


def _first_step(model: nn.Module, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images, labels = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
    model.train()
    logits = model(images)
    return logits, F.cross_entropy(logits, labels).item()


def test_softmax_guard_raises_for_softmax_output():
    from tinydist.config import ModelConfig

    torch.manual_seed(0)
    model = nn.Sequential(build_model(ModelConfig(stem="imagenet"), 10), nn.Softmax(dim=1))
    logits, loss = _first_step(model)
    with pytest.raises(SoftmaxBeforeLossError) as info:
        check_first_step(logits, loss, 10)
    message = str(info.value)
    assert "softmax" in message.lower() and "CrossEntropyLoss" in message, message


@pytest.mark.parametrize("stem", ["imagenet", "cifar"])
def test_softmax_guard_passes_real_model(stem):
    from tinydist.config import ModelConfig

    torch.manual_seed(0)
    logits, loss = _first_step(build_model(ModelConfig(stem=stem), 10))
    assert abs(loss - math.log(10)) < 1.5, f"first loss {loss:.3f} is not near ln(10)"
    check_first_step(logits, loss, 10)  # must not raise


SOFTMAX_DRIVER = """
import sys
from torch import nn
import tinydist.loop.run as run  # where the run's model is built
import tinydist.train as train

build = run.build_model
run.build_model = lambda cfg, num_classes: nn.Sequential(build(cfg, num_classes), nn.Softmax(dim=1))
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_softmax_guard_stops_training_with_exit_2(cache_dir, tmp_path):
    driver = tmp_path / "softmax_driver.py"
    driver.write_text(SOFTMAX_DRIVER)
    out = str(tmp_path / "run")
    result = run_train(tiny_args(cache_dir, out), script=str(driver), timeout=SUBPROCESS_TIMEOUT)
    assert result.returncode == 2, describe(result)
    errors = error_lines(result.stderr)
    assert len(errors) == 1, describe(result)
    assert "softmax" in errors[0].lower() and "CrossEntropyLoss" in errors[0], errors[0]
    assert committed_checkpoints(out) == [], "a checkpoint was committed although step 0 failed"
    assert not os.path.exists(os.path.join(out, "model")), "a model was exported although step 0 failed"
    if os.path.exists(os.path.join(out, "metrics.jsonl")):
        assert not [m for m in read_metrics(out) if "train/loss" in m], "training metrics logged after the guard"


# ---- 5. trackers: W&B offline and TensorBoard --------------------------------------------------------------

TRACKER_STEPS, TRACKER_EVERY = 4, 2


def _assert_tensorboard_matches_metrics(out: str) -> None:
    scalars = tensorboard_scalars(out)
    metrics = read_metrics(out)
    assert scalars, f"no TensorBoard event files with scalars under {out}: {sorted(os.listdir(out))}"
    for key in ("train/loss", "val/top1"):
        expected = [(m["step"], m[key]) for m in metrics if key in m]
        got = sorted(scalars.get(key, []))
        assert [s for s, _ in got] == [s for s, _ in expected], f"{key}: TensorBoard steps {got} vs {expected}"
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6), key


def _tracker_run(cache_dir, tmp_path, report_to: str, env):
    out = str(tmp_path / "run")
    args = tiny_args(cache_dir, out, train__max_steps=TRACKER_STEPS, log__every_steps=TRACKER_EVERY,
                     log__report_to=report_to)
    return out, run_train(args, env=env, timeout=SUBPROCESS_TIMEOUT)


@pytest.mark.slow
def test_tensorboard_scalars(cache_dir, tmp_path):
    out, result = _tracker_run(cache_dir, tmp_path, "[tensorboard]", train_env())
    assert result.returncode == 0, describe(result)
    _assert_tensorboard_matches_metrics(out)


@pytest.mark.slow
def test_wandb_goes_offline_without_credentials_and_tensorboard(cache_dir, tmp_path):
    home = tmp_path / "home"  # no ~/.netrc, no wandb settings
    home.mkdir()
    env = train_env({"HOME": str(home)}, unset=("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "NETRC"))
    out, result = _tracker_run(cache_dir, tmp_path, "[wandb,tensorboard]", env)
    assert result.returncode == 0, describe(result)
    assert "wandb sync" in result.stdout + result.stderr, describe(result)
    runs = glob.glob(os.path.join(out, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(runs) == 1, f"expected one offline run under {out}/wandb: {runs}; {describe(result)}"
    history = wandb_history(runs[0])
    metrics = read_metrics(out)
    for key in ("train/loss", "val/top1"):
        expected = {m["step"]: m[key] for m in metrics if key in m}
        got = {row["_step"]: row[key] for row in history if key in row}
        assert sorted(got) == sorted(expected), f"{key}: W&B steps {sorted(got)} vs metrics.jsonl {sorted(expected)}"
        for step, value in expected.items():
            assert got[step] == pytest.approx(value, rel=1e-9), (key, step)
    _assert_tensorboard_matches_metrics(out)


# ---- 8. batch arithmetic -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_batch_arithmetic_two_processes_names_fitting_micro_batches(cache_dir, tmp_path):
    """16 is a multiple of 16, but not of 16 x 2 processes: exit 2 and one line that lists what fits.
    The one end-to-end test of the message; the arithmetic itself: test_config.py::test_batch_arithmetic."""
    out = str(tmp_path / "run")
    args = tiny_args(cache_dir, out, train__global_batch_size=16, train__micro_batch_size=16)
    result = run_train(args, nprocs=2, timeout=SUBPROCESS_TIMEOUT)
    assert result.returncode == 2, describe(result)
    errors = error_lines(result.stderr)
    # Rank 0 says it once, and the launcher repeats it as its last words, below torchrun's output.
    assert len(errors) == 2 and errors[0] == errors[1], f"expected rank 0's error and its repeat: {describe(result)}"
    assert result.stderr.strip().splitlines()[-2] == errors[1]
    assert "2 processes" in errors[0] and re.search(r"\b1, 2, 4, 8\b", errors[0]), errors[0]
    assert committed_checkpoints(out) == []


# ---- 3, 6, 7: the smoke recipe as is ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_run(cache_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("smoke") / "run")
    args = ["--config", SMOKE, f"--data.cache_dir={cache_dir}", f"--train.output_dir={out}"]
    result = run_train(args, timeout=SMOKE_TIMEOUT)
    assert result.returncode == 0, describe(result)
    return out, args, result


@pytest.mark.slow
def test_smoke_recipe_learns_digits(smoke_run):
    out, _, result = smoke_run
    metrics = read_metrics(out)
    val = [m for m in metrics if "val/top1" in m]
    assert val, describe(result)
    assert val[-1]["val/top1"] >= 0.9, f"final val top-1 {val[-1]['val/top1']:.4f} < 0.9: {val}"
    # A validation (PreciseBN + 299 images) is ~3% of this short run's compute by eval.max_share's estimate,
    # over its 0.05 for two: the last step's is the only one, and the run says so. The recipe keeps no EMA
    # (level with the weights at the end of its cosine schedule): one set of weights is scored.
    assert "validation: every 10 epochs and at the last step (eval.max_share 0.05" in result.stdout, describe(result)
    assert [m["epoch"] for m in val] == pytest.approx([10.042], abs=0.01), val
    assert not [k for m in metrics for k in m if k.startswith("val_ema/")], val[-1]
    assert val[-1]["val/loss"] < 0.5, val[-1]
    train = [m["train/loss"] for m in metrics if "train/loss" in m]
    assert train[-1] < 0.5 * math.log(10) < train[0], f"train loss did not fall: {train}"


@pytest.mark.slow
def test_metrics_file_and_config_round_trip(smoke_run):
    out, args, result = smoke_run
    found = re.search(r"data: (\d+) train / (\d+) val images.*?(\d+) steps in all", result.stdout)
    assert found, describe(result)
    num_train, total_steps = int(found.group(1)), int(found.group(3))
    cfg = load_config(args)
    gbs = cfg.train.global_batch_size
    assert total_steps == math.ceil(cfg.train.epochs * num_train / gbs)

    metrics = read_metrics(out)
    assert not [m for m in metrics if "event" in m], "a fresh run has no resume/preempt events"
    steps = [m["step"] for m in metrics]
    assert steps == sorted(steps), f"steps go backwards: {steps}"
    train = [m for m in metrics if "train/loss" in m]
    val = [m for m in metrics if "val/top1" in m]
    timing = [m for m in metrics if any(k.startswith("time/") for k in m)]  # where the wall time went, at the end
    assert len(train) + len(val) + len(timing) == len(metrics)
    assert len(timing) == 1 and timing[0]["step"] == total_steps and timing[0]["time/steps_s"] > 0, timing
    assert 0 <= timing[0]["time/save_drag_s"] < timing[0]["time/steps_s"], timing  # inside the steps' time
    for rows in (train, val):
        assert all(a["step"] < b["step"] for a, b in zip(rows, rows[1:])), [r["step"] for r in rows]
    assert [m["step"] for m in train] == [s for s in range(1, total_steps + 1)
                                          if s % cfg.log.every_steps == 0 or s == total_steps]
    assert train[-1]["step"] == val[-1]["step"] == total_steps
    for m in metrics:
        assert m["samples"] == m["step"] * gbs, m
        assert m["epoch"] == pytest.approx(m["step"] * gbs / num_train, abs=1e-4), m
    for m in train:
        assert math.isfinite(m["train/loss"]) and m["train/lr"] >= 0 and m["train/images_per_s"] > 0, m
    for m in val:
        assert 0 <= m["val/top1"] <= m["val/top5"] <= 1, m
        assert math.isfinite(m["val/loss"]) and m["val/loss"] >= 0, m
    # One validation per N-th epoch end (eval.every_epochs as eval.max_share widens it) and the last step,
    # which ends an epoch here.
    every = validation_every_epochs(cfg, num_train, int(found.group(2)))
    epochs_done = math.floor(total_steps * gbs / num_train)
    assert len(val) == epochs_done // every, [m["step"] for m in val]
    assert all(math.floor(m["epoch"]) % every == 0 for m in val), [m["epoch"] for m in val]

    saved = os.path.join(out, "config.yaml")
    assert load_config(["--config", saved]) == cfg


EXPORT_CHECK = """
import json, os, sys
import torch, torchvision
from safetensors.torch import load_file

folder = sys.argv[1]
index = json.load(open(os.path.join(folder, "model.safetensors.index.json")))
state = {}
for shard in sorted(set(index["weight_map"].values())):
    state.update(load_file(os.path.join(folder, shard)))
model = torchvision.models.resnet18(num_classes=10)
model.load_state_dict(state, strict=True)
model.eval()
with torch.no_grad():
    out = model(torch.zeros(2, 3, 32, 32))
assert out.shape == (2, 10), out.shape
assert torch.isfinite(out).all()
assert not any(m == "tinydist" or m.startswith("tinydist.") for m in sys.modules), "tinydist was imported"
print("loaded", len(state), "tensors from", len(set(index["weight_map"].values())), "shards")
"""


@pytest.mark.slow
def test_exported_model_loads_in_plain_torchvision(smoke_run, tmp_path):
    out, _, _ = smoke_run
    folder = os.path.join(out, "model")
    script = tmp_path / "plain_load.py"
    script.write_text(EXPORT_CHECK)
    env = os.environ.copy()
    env.pop("PYTHONPATH", None)
    result = run([PYTHON, str(script), folder], env=env, cwd=str(tmp_path), timeout=SUBPROCESS_TIMEOUT)
    assert result.returncode == 0 and "loaded" in result.stdout, describe(result)
    # The export is the final committed checkpoint's model, tensor for tensor.
    final = committed_checkpoints(out)[-1]
    exported, checkpoint = load_model_dir(folder), load_model_dir(final)
    assert sorted(exported) == sorted(checkpoint)
    for name, tensor in exported.items():
        assert torch.equal(tensor, checkpoint[name]), name


@pytest.mark.slow
def test_evaluate_cli_reproduces_final_validation(smoke_run, cache_dir):
    out, _, _ = smoke_run
    result = run([PYTHON, "-m", "tinydist.evaluate", "--checkpoint", os.path.join(out, "model"),
                  f"--data.cache_dir={cache_dir}", "--json"], env=train_env(), timeout=SUBPROCESS_TIMEOUT)
    assert result.returncode == 0, describe(result)
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    last = [m for m in read_metrics(out) if "val/top1" in m][-1]
    assert scores["val/top1"] == pytest.approx(last["val/top1"], abs=1e-6), (scores, last)
    assert scores["val/top5"] == pytest.approx(last["val/top5"], abs=1e-6), (scores, last)
    assert scores["val/loss"] == pytest.approx(last["val/loss"], rel=1e-4), (scores, last)
    assert scores["images"] == 299  # digits: 1797 images, one sixth held out
    # config.json says what was exported and what it scored: the same figures.
    card = json.load(open(os.path.join(out, "model", "config.json")))
    assert card["provenance"]["selected"] == "last" and card["provenance"]["weights"] == "raw"
    assert card["provenance"]["metrics"]["val/top1"] == pytest.approx(scores["val/top1"], abs=1e-6)


@pytest.mark.slow
def test_wandb_run_continues_after_resume(cache_dir, tmp_path):
    """A resumed run logs to the same W&B run id (stored in the checkpoint) and its steps continue
    where the first part stopped: one curve, not two halves."""
    out = str(tmp_path / "run")
    env = train_env({"WANDB_MODE": "offline"})
    first = run_train(tiny_args(cache_dir, out, train__max_steps=4, log__every_steps=1, log__report_to="[wandb]"),
                      env=env, timeout=SUBPROCESS_TIMEOUT)
    assert first.returncode == 0, describe(first)
    second = run_train(tiny_args(cache_dir, out, train__max_steps=7, log__every_steps=1, log__report_to="[wandb]"),
                       env=env, timeout=SUBPROCESS_TIMEOUT)
    assert second.returncode == 0 and "resumed from" in second.stdout, describe(second)
    runs = sorted(glob.glob(os.path.join(out, "wandb", "offline-run-*", "run-*.wandb")))
    assert len(runs) == 2, runs
    ids = {os.path.basename(path)[len("run-"):-len(".wandb")] for path in runs}
    assert len(ids) == 1, f"the resumed part logged to another W&B run: {ids}"
    steps = [sorted(row["_step"] for row in wandb_history(path) if "train/loss" in row) for path in runs]
    assert steps == [[1, 2, 3, 4], [5, 6, 7]], steps

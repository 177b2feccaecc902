"""End-to-end preemption and resume: real training processes, killed and signalled at awkward moments.

Every run here is a subprocess of `python -m tinydist.train` (or `python -m tinydist.launch` for two
processes, a gloo group on this CPU-only machine). Signals are sent at precise points by a small driver
script that wraps functions of the package before calling `tinydist.train.main` — no test hooks in the
package. One uninterrupted 1-process run (module fixture `reference`) is the yardstick: an interrupted and
resumed run on the same world size must end bitwise equal to it, one resumed on another world size equal
up to float rounding (docs/design.md, principles 1, 2, 4, 5).

All runs share one recipe: configs/smoke.yaml (digits, offline) at 16x16, global batch 16 = micro 8 x
accumulation 2 on one process, 12 steps, a checkpoint every 4 steps (keep_last 2), an evaluation every 3
steps and a metrics line every step (so duplicated or missing steps show in metrics.jsonl); with the
recipe tools that carry state or randomness: an EMA of the weights (checked like the weights), CutMix
and MixUp drawn per micro-batch, PreciseBN before each evaluation, flip TTA.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import NamedTuple, Optional

import pytest
import torch

from helpers.faultinject import kill_tree
from tinydist.ckpt.checkpointer import Checkpointer
from tinydist.export.writer import load_model_weights
from helpers.train import REPO, describe, run_train, tiny_args, train_command, train_env

pytestmark = pytest.mark.slow  # every test here trains in subprocesses, most of them twice

MAX_STEPS = 12
EVERY = 4  # checkpoints at 4, 8, 12; keep_last 2 leaves 8 and 12 in the reference
EVAL_EVERY = 3
TIMEOUT_S = 300
EXIT_CONFIG, EXIT_PREEMPTED = 2, 75

# ---- running training ------------------------------------------------------------------------------------


def train_args(cache_dir: str, out: Path, *extra: str, max_steps: int = MAX_STEPS) -> list[str]:
    """The recipe of every run here: the smoke config at 16 px on all of digits (not TINY's subset)."""
    return tiny_args(cache_dir, str(out), data__max_train_samples=None, train__max_steps=max_steps,
                     checkpoint__every_steps=EVERY, train__eval_every_steps=EVAL_EVERY, log__every_steps=1,
                     train__global_batch_size=16, train__micro_batch_size=8, ema__enabled="true", ema__decay=0.9,
                     mix__cutmix_alpha=1.0, mix__mixup_alpha=0.4, mix__prob=0.8, eval__precise_bn_images=64,
                     eval__flip_tta="true") + list(extra)


def train(cache_dir: str, out: Path, *extra: str, max_steps: int = MAX_STEPS, processes: int = 1,
          driver: Optional[Path] = None, plan: Optional[dict] = None) -> subprocess.CompletedProcess:
    """One run (helpers.train.run_train): `processes` processes, or one through `driver` with `plan`."""
    args = train_args(cache_dir, out, *extra, max_steps=max_steps)
    if driver is not None:
        assert processes == 1, "drivers run one process"
        args = [json.dumps(plan or {}), *args]
    return run_train(args, nprocs=processes, script=str(driver) if driver else None, timeout=TIMEOUT_S)


def output(run: subprocess.CompletedProcess) -> str:
    return run.stdout + "\n" + run.stderr


# The driver: wraps package functions to signal at precise points, then runs tinydist.train.main.
# Every signal it sends is announced on stdout ("driver: sending ..."), so a test can check it happened.
DRIVER = r'''
import json, os, signal, sys
import tinydist.train as train
from tinydist.ckpt.checkpointer import Checkpointer
from tinydist.ckpt.storage import Storage

plan = json.loads(sys.argv[1])
mode = plan["mode"]
sig = getattr(signal, plan.get("signal", "SIGTERM"))
state = {"transforms": 0, "saves": 0, "sent": 0, "folders": [], "shards": {}, "thread_sent": False}


def send(s, why):
    state["sent"] += 1
    print(f"driver: sending {signal.Signals(s).name} {why}", flush=True)
    os.kill(os.getpid(), s)


if mode in ("transform", "double"):
    original_transform = train.augment  # called once per micro-batch, on the loop's thread

    def train_transform(*args, **kwargs):
        state["transforms"] += 1
        if state["transforms"] == plan["n"]:
            send(sig, f"before micro-batch transform {plan['n']}")
        return original_transform(*args, **kwargs)

    train.augment = train_transform

if mode == "eval":
    import tinydist.loop.validation as validation
    original_evaluate = validation.evaluate

    def evaluate(*args, **kwargs):
        if state["sent"] == 0:
            send(sig, "during evaluation")
        return original_evaluate(*args, **kwargs)

    validation.evaluate = evaluate

original_save = Checkpointer.save


def save(self, step, *args, **kwargs):
    if mode == "double" and state["sent"] >= 1:
        state["final_save"] = True
        send(signal.SIGTERM, f"again, inside Checkpointer.save of step {step}")
    original_save(self, step, *args, **kwargs)
    state["saves"] += 1
    if mode == "after_save" and state["saves"] == 1:
        send(sig, f"right after the save of step {step} returned")


Checkpointer.save = save

original_write = Storage.write


def _write(self, path, data):
    folder, name = os.path.basename(os.path.dirname(path)), os.path.basename(path)
    if not folder.startswith("step-"):  # the lease, not a checkpoint
        return original_write(self, path, data)
    if folder not in state["folders"]:
        state["folders"].append(folder)
    if mode == "double" and state.get("final_save") and name.startswith("model-") and not state["thread_sent"]:
        state["thread_sent"] = True  # from the writer thread, while the main thread waits for the commit
        send(signal.SIGTERM, f"a third time, from the checkpoint writer thread before {folder}/{name}")
    original_write(self, path, data)
    if name.startswith("model-"):
        state["shards"][folder] = state["shards"].get(folder, 0) + 1
        if mode == "kill_in_save" and state["folders"].index(folder) == 1 and state["shards"][folder] == 2:
            print(f"driver: sending SIGKILL after writing {folder}/{name}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


Storage.write = _write

sys.exit(train.main(sys.argv[2:]))
'''


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("driver") / "driver.py"
    path.write_text(DRIVER)
    return path


# ---- reading results -------------------------------------------------------------------------------------


def step_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:08d}"


def committed_steps(out: Path) -> list[int]:
    root = out / "checkpoints"
    return sorted(int(p.name[5:]) for p in root.glob("step-*") if (p / "COMMITTED").is_file())


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train/loss"]) for r in metrics(out) if "train/loss" in r]


def events(out: Path) -> list[tuple[str, int]]:
    return [(r["event"], r["step"]) for r in metrics(out) if "event" in r]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_model_weights(str(folder))[0]


def ema_weights(out: Path, step: int = MAX_STEPS) -> dict[str, torch.Tensor]:
    """The weights' moving average, as the checkpoint of `step` holds it (its own sharded set)."""
    return load_model_weights(str(step_dir(out, step)), weights="ema")[0]


def assert_bitwise_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    assert any(k.endswith("running_var") for k in want) and any(k.endswith("num_batches_tracked") for k in want)
    differ = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    assert not differ, f"{len(differ)} of {len(want)} tensors differ from the uninterrupted run, e.g. {differ[:5]}"


def is_param(key: str) -> bool:
    return not key.endswith(("running_mean", "running_var", "num_batches_tracked"))


def max_param_diff(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    return max((got[k].double() - want[k].double()).abs().max().item() for k in want if is_param(k))


def assert_params_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], label: str) -> float:
    assert sorted(got) == sorted(want)
    diff = max_param_diff(got, want)
    print(f"{label}: max |param - reference| = {diff:.3g}")
    far = [k for k in want if is_param(k) and not torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-5)]
    assert not far, f"{label}: parameters {far[:5]} not allclose to the 1-process run (max diff {diff:.3g})"
    return diff


def link_copy(src: Path, dst: Path) -> None:
    """A cheap copy of checkpoint folders: hard links. tinydist writes files by temp + rename and deletes by
    unlinking, so nothing done through the copy can change the reference's files."""
    shutil.copytree(src, dst, copy_function=os.link)


def resumed_line(run: subprocess.CompletedProcess) -> str:
    lines = [line for line in run.stdout.splitlines() if line.startswith("resumed from ")]
    assert len(lines) == 1, describe(run)
    return lines[0]


# ---- the reference -----------------------------------------------------------------------------------------


class Reference(NamedTuple):
    out: Path
    weights: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    losses: list[tuple[int, float]]


@pytest.fixture(scope="module")
def reference(cache_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    out = tmp_path_factory.mktemp("reference")
    run = train(cache_dir, out)
    assert run.returncode == 0, describe(run)
    assert "tinydist: 1 process(es)" in run.stdout and "resumed from" not in output(run)
    assert committed_steps(out) == [8, 12], describe(run)
    ref_losses = losses(out)
    assert [s for s, _ in ref_losses] == list(range(1, MAX_STEPS + 1))
    assert events(out) == []
    assert [r["step"] for r in metrics(out) if "val_ema/top1_flip" in r] == [3, 6, 9, 12]
    ema = ema_weights(out)
    assert not torch.equal(ema["fc.weight"], weights(out / "model")["fc.weight"])  # an average, not a copy
    return Reference(out, weights(out / "model"), ema, ref_losses)


# ---- 1. SIGTERM at three awkward moments, resumed with the same command: bitwise the same run -------------


@pytest.mark.parametrize("plan, stop_step, announced", [
    # Between the two micro-batches of step 7: half an accumulation is thrown away and redone.
    ({"mode": "transform", "n": 14}, 7, "before micro-batch transform 14"),
    # Right after the (asynchronous) save of step 4 returned, while its files are still being written.
    ({"mode": "after_save"}, 5, "right after the save of step 4 returned"),
    # While the step-3 evaluation runs: the flag is read at the next step boundary, which is a save step.
    ({"mode": "eval"}, 4, "during evaluation"),
], ids=["mid-step", "after-save", "during-eval"])
def test_sigterm_then_resume_is_bitwise_identical(reference: Reference, cache_dir: str, driver: Path,
                                                  tmp_path: Path, plan: dict, stop_step: int,
                                                  announced: str) -> None:
    out = tmp_path / "run"
    first = train(cache_dir, out, driver=driver, plan=plan)
    assert first.returncode == EXIT_PREEMPTED, describe(first)
    assert f"driver: sending SIGTERM {announced}" in first.stdout, describe(first)
    assert "SIGTERM received" in first.stdout
    assert f"stopped at step {stop_step} after SIGTERM; checkpoint committed" in first.stdout, describe(first)
    assert stop_step in committed_steps(out) and max(committed_steps(out)) == stop_step
    assert not (out / "model").exists(), "a preempted run must not export a final model"

    second = train(cache_dir, out)  # the same command a relauncher would run
    assert second.returncode == 0, describe(second)
    assert resumed_line(second).startswith(
        f"resumed from {out}/checkpoints/step-{stop_step:08d} at step {stop_step} (saved by 1 process(es)")

    assert_bitwise_equal(weights(out / "model"), reference.weights)
    assert_bitwise_equal(ema_weights(out), reference.ema)
    # Each step's training loss is logged exactly once, and is the reference's, to the last bit.
    assert losses(out) == reference.losses
    assert [r["step"] for r in metrics(out) if "val/top1" in r] == [3, 6, 9, 12]
    assert events(out) == [("preempted", stop_step), ("resumed", stop_step)]
    assert [r.get("signal") for r in metrics(out) if r.get("event") == "preempted"] == ["SIGTERM"]


# ---- 2. SIGKILL in the middle of writing a checkpoint -------------------------------------------------------


def test_sigkill_during_save_resumes_from_previous_commit(reference: Reference, cache_dir: str, driver: Path,
                                                          tmp_path: Path) -> None:
    out = tmp_path / "run"
    killed = train(cache_dir, out, driver=driver, plan={"mode": "kill_in_save"})
    assert killed.returncode == -signal.SIGKILL, describe(killed)
    assert "driver: sending SIGKILL after writing step-00000008/model-" in killed.stdout, describe(killed)
    torn = step_dir(out, 8)
    assert torn.is_dir() and list(torn.glob("model-*.safetensors")), "the torn checkpoint should have some shards"
    assert not (torn / "COMMITTED").exists() and not (torn / "state.json").exists()
    assert committed_steps(out) == [4]

    resumed = train(cache_dir, out)
    assert resumed.returncode == 0, describe(resumed)
    assert "step-00000008" in resumed.stdout.split("resumed from")[0], "the skipped torn checkpoint is named"
    assert resumed_line(resumed).startswith(f"resumed from {out}/checkpoints/step-00000004 at step 4 ")
    assert_bitwise_equal(weights(out / "model"), reference.weights)
    assert losses(out) == reference.losses  # the killed run's steps 5.. were cut from metrics.jsonl
    assert events(out) == [("resumed", 4)]
    assert committed_steps(out) == [8, 12]  # step 8 written again, whole this time
    assert Checkpointer(str(out / "checkpoints"), keep_last=2, log=lambda m: None).latest() == \
        f"{out}/checkpoints/step-00000012"


# ---- 3. Elastic: another process count on resume ------------------------------------------------------------


@pytest.fixture(scope="module")
def two_then_one(cache_dir: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("two_then_one") / "run"
    two = train(cache_dir, out, max_steps=6, processes=2)
    one = train(cache_dir, out) if two.returncode == 0 else subprocess.CompletedProcess([], -1, "", "not run: the 2-process part failed")
    return out, two, one


def test_two_processes_then_one(reference: Reference, two_then_one: tuple[Path, subprocess.CompletedProcess, subprocess.CompletedProcess]) -> None:
    out, two, one = two_then_one
    assert two.returncode == 0, describe(two)
    assert "tinydist: 2 process(es)" in two.stdout and "8 x 2 processes x 1 accumulation" in two.stdout
    assert f"checkpoint {out}/checkpoints/step-00000006 committed" in two.stdout, describe(two)

    assert one.returncode == 0, describe(one)
    assert "tinydist: 1 process(es)" in one.stdout and "8 x 1 processes x 2 accumulation" in one.stdout
    assert resumed_line(one).startswith(
        f"resumed from {out}/checkpoints/step-00000006 at step 6 (saved by 2 process(es)")
    assert_params_close(weights(out / "model"), reference.weights, "2 processes -> 1")
    assert_params_close(ema_weights(out), reference.ema, "2 processes -> 1, EMA")
    assert [s for s, _ in losses(out)] == list(range(1, MAX_STEPS + 1))
    assert events(out) == [("resumed", 6)]


def test_bn_running_statistics_do_not_depend_on_the_world_size(reference: Reference,
                                                              two_then_one: tuple[Path, subprocess.CompletedProcess, subprocess.CompletedProcess]) -> None:
    out, _, one = two_then_one
    assert one.returncode == 0, describe(one)
    got = weights(out / "model")
    stats = [k for k in reference.weights if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    far = {k: (got[k] - reference.weights[k]).abs().max().item() for k in stats
           if not torch.allclose(got[k], reference.weights[k], rtol=1e-4, atol=1e-5)}
    assert not far, f"{len(far)} of {len(stats)} BN statistics differ, max {max(far.values()):.3g}"


def test_one_process_then_two(reference: Reference, cache_dir: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    link_copy(step_dir(reference.out, 8), step_dir(out, 8))  # the reference, saved by 1 process at step 8
    two = train(cache_dir, out, processes=2)
    assert two.returncode == 0, describe(two)
    assert "tinydist: 2 process(es)" in two.stdout
    assert resumed_line(two).startswith(
        f"resumed from {out}/checkpoints/step-00000008 at step 8 (saved by 1 process(es)")
    assert_params_close(weights(out / "model"), reference.weights, "1 process -> 2")
    assert_params_close(ema_weights(out), reference.ema, "1 process -> 2, EMA")
    assert committed_steps(out) == [8, 12]


# ---- 4. checkpoint.resume: never, a path, a checkpoint of another model ---------------------------------------


def test_resume_never_refuses_to_overwrite(reference: Reference, cache_dir: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    link_copy(reference.out / "checkpoints", out / "checkpoints")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    run = train(cache_dir, out, "--checkpoint.resume=never")
    assert run.returncode == EXIT_CONFIG, describe(run)
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, describe(run)
    assert "would be overwritten" in errors[0] and "2 committed checkpoints" in errors[0]
    assert "step-00000012" in errors[0] and "Traceback" not in output(run)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_resume_from_an_older_checkpoint_path(reference: Reference, cache_dir: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    link_copy(reference.out / "checkpoints", out / "checkpoints")  # steps 8 and 12: auto would pick 12
    older = f"{out}/checkpoints/step-00000008"
    run = train(cache_dir, out, f"--checkpoint.resume={older}")
    assert run.returncode == 0, describe(run)
    assert resumed_line(run).startswith(f"resumed from {older} at step 8 ")
    assert [s for s, _ in losses(out)] == list(range(9, MAX_STEPS + 1))  # trained 9..12 itself
    assert losses(out) == reference.losses[8:]
    assert_bitwise_equal(weights(out / "model"), reference.weights)


def test_checkpoint_of_another_model_is_refused_in_one_line(reference: Reference, cache_dir: str,
                                                            tmp_path: Path) -> None:
    # The reference has the ImageNet stem (conv1 7x7); this run builds the CIFAR stem (conv1 3x3).
    out = tmp_path / "run"
    link_copy(reference.out / "checkpoints", out / "checkpoints")
    run = train(cache_dir, out, "--model.stem=cifar", "--checkpoint.resume=auto")
    assert run.returncode == EXIT_CONFIG, describe(run)
    assert "Traceback" not in output(run), describe(run)
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, describe(run)
    # The state and config are checked before any tensor is read (docs/design.md, "Load"): the stem is a key a
    # resume cannot change, so that is what the line names. (Tensors that do not fit the model, when the config
    # would allow them, are refused by shape: tests/unit/ckpt/test_checkpoint.py.)
    assert "model.stem='cifar'" in errors[0] and "model.stem='imagenet'" in errors[0], errors[0]
    assert committed_steps(out) == [8, 12] and not (out / "model").exists()


# ---- 5. SIGINT and SIGUSR1 stop like SIGTERM ------------------------------------------------------------------


@pytest.mark.parametrize("signame", ["SIGINT", "SIGUSR1"])
def test_other_stop_signals(cache_dir: str, driver: Path, tmp_path: Path, signame: str) -> None:
    out = tmp_path / "run"
    run = train(cache_dir, out, driver=driver, plan={"mode": "transform", "n": 4, "signal": signame})
    assert run.returncode == EXIT_PREEMPTED, describe(run)
    assert f"driver: sending {signame} before micro-batch transform 4" in run.stdout
    assert f"stopped at step 2 after {signame}; checkpoint committed" in run.stdout, describe(run)
    assert "Traceback" not in output(run) and "KeyboardInterrupt" not in output(run)
    assert committed_steps(out) == [2]
    checkpointer = Checkpointer(str(out / "checkpoints"), keep_last=2, log=lambda m: None)
    assert checkpointer.latest() == f"{out}/checkpoints/step-00000002"  # checksums verified
    assert events(out) == [("preempted", 2)]
    assert [r["signal"] for r in metrics(out) if "event" in r] == [signame]


# ---- 5b. The same signals sent to `python -m tinydist.launch`, as a container runtime or SLURM would ---------


class LauncherStop(NamedTuple):
    run: subprocess.CompletedProcess
    out: Path
    workers_left: list[int]  # worker pids still alive once the launcher had exited


def stop_launcher(cache_dir: str, out: Path, logs: Path, signum: int) -> LauncherStop:
    """Start 2 processes, signal the launcher (its own process group: torchrun puts each worker in a session
    of its own) once step 3 is logged, wait for the launcher; kill whatever it left behind."""
    import psutil  # a dependency of accelerate

    cmd = train_command(train_args(cache_dir, out, max_steps=60), nprocs=2)
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "stdout", "w") as stdout, open(logs / "stderr", "w") as stderr:
        proc = subprocess.Popen(cmd, cwd=REPO, env=train_env(), stdout=stdout, stderr=stderr, start_new_session=True)
    family: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while "step 3 epoch" not in (logs / "stdout").read_text():
            assert proc.poll() is None, (logs / "stdout").read_text() + (logs / "stderr").read_text()
            assert time.monotonic() < deadline, "step 3 never came"
            time.sleep(0.2)
        family = psutil.Process(proc.pid).children(recursive=True)
        os.killpg(proc.pid, signum)
        returncode = proc.wait(timeout=TIMEOUT_S)
        time.sleep(1)
        left = []
        for p in family:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    left.append(p.pid)
            except psutil.NoSuchProcess:
                pass
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
        for p in family:  # workers this test started, by pid, whether or not the launcher is still there
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        proc.wait()
    result = subprocess.CompletedProcess(cmd, returncode, (logs / "stdout").read_text(), (logs / "stderr").read_text())
    return LauncherStop(result, out, left)


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGUSR1"])
def test_signal_to_the_launcher_stops_the_workers_and_exits_75(cache_dir: str, tmp_path: Path, signame: str) -> None:
    # Kubernetes signals the first process only (the launcher); SLURM's --signal=USR1 reaches it too.
    stop = stop_launcher(cache_dir, tmp_path / "run", tmp_path / "logs", getattr(signal, signame))
    run = stop.run
    stopped = [line for line in run.stdout.splitlines() if line.startswith("stopped at step ")]
    assert len(stopped) == 1 and stopped[0].endswith(f"after {signame}; checkpoint committed, exit 75"), describe(run)
    step = int(stopped[0].split()[3])
    assert step > 3 and max(committed_steps(stop.out)) == step
    assert Checkpointer(str(stop.out / "checkpoints"), keep_last=2, log=lambda m: None).latest() == \
        f"{stop.out}/checkpoints/step-{step:08d}"
    assert not stop.workers_left, f"workers {stop.workers_left} outlived the launcher"
    assert run.returncode == EXIT_PREEMPTED, describe(run)
    assert "Traceback" not in run.stderr, describe(run)


# ---- 6. More SIGTERMs while the final checkpoint is being written ----------------------------------------------


def test_second_sigterm_during_final_save(reference: Reference, cache_dir: str, driver: Path,
                                          tmp_path: Path) -> None:
    out = tmp_path / "run"
    # First SIGTERM during step 8, a save step; the second inside Checkpointer.save on the main thread, a
    # third from the writer thread while the main thread waits for the commit.
    run = train(cache_dir, out, driver=driver, plan={"mode": "double", "n": 16})
    assert run.returncode == EXIT_PREEMPTED, describe(run)
    assert "driver: sending SIGTERM before micro-batch transform 16" in run.stdout
    assert "driver: sending SIGTERM again, inside Checkpointer.save of step 8" in run.stdout, describe(run)
    assert "driver: sending SIGTERM a third time, from the checkpoint writer thread" in run.stdout, describe(run)
    assert run.stdout.count("SIGTERM received") == 1
    assert "stopped at step 8 after SIGTERM; checkpoint committed" in run.stdout, describe(run)
    assert "Traceback" not in output(run)
    assert committed_steps(out) == [4, 8]
    checkpointer = Checkpointer(str(out / "checkpoints"), keep_last=2, log=lambda m: None)
    assert checkpointer.latest() == f"{out}/checkpoints/step-00000008"  # checksums verified
    assert not list(step_dir(out, 8).glob("*.tmp-*"))
    # The stop checkpoint is the reference's own step 8, tensor for tensor.
    assert_bitwise_equal(weights(step_dir(out, 8)), weights(step_dir(reference.out, 8)))

"""The local tier as a user meets it: SIGKILLs with no warning at random steps, each relaunch resuming at
most one step behind the last step it finished, the final weights bitwise those of a run never
killed, one continuous metrics curve; a wiped local tier (a new machine) resumes from the durable
tier; on two machines whose local tiers differ, both resume from the step they both have."""

from __future__ import annotations

import json
import random
import re
import shutil
import signal
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

from helpers.faultinject import free_port, kill_tree
from helpers.machines import finish_all, machine
from helpers.train import describe, load_model_dir, read_metrics, run_train, start, tiny_args, train_command, wait_for

pytestmark = pytest.mark.slow  # training processes killed and relaunched

# Epochs of 4 steps (256 images, batch 64): a durable save at each epoch end, a local one every step.
STEPS = {"train__max_steps": 26, "log__every_steps": 1}


@pytest.fixture
def shm() -> Path:
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm on this machine")
    path = Path(f"/dev/shm/tinydist-test-{uuid.uuid4().hex[:8]}")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def progress(local: Path) -> int:
    """The last step the run on this machine finished (its local tier's progress file), -1 if none yet."""
    for found in local.glob("*/progress.json"):
        try:
            return json.loads(found.read_text())["step"]
        except (OSError, ValueError, KeyError):
            return -1  # replaced right now: read again
    return -1


def kill_at(proc: subprocess.Popen, local: Path, step: int) -> tuple[int, str]:
    """SIGKILL the run (its whole tree) once it has finished `step` steps: (the last step it finished, its stdout)."""
    try:
        wait_for(lambda: progress(local) >= step or proc.poll() is not None, 240, f"step {step}")
    finally:
        kill_tree(proc.pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"exit {proc.returncode} before the kill\n{out[-3000:]}\n{err[-3000:]}"
    return progress(local), out


def resumed(stdout: str) -> tuple[str, int, str, int | None]:
    """(checkpoint path, step, tier, steps lost or None) of the run's resume line."""
    line = next((ln for ln in stdout.splitlines() if ln.startswith("resumed from ")), None)
    assert line is not None, stdout[-3000:]
    m = re.match(r"resumed from (\S+) at step (\d+) .*; from the (local|durable) tier, "
                 r"(?:(\d+) step\(s\) lost|steps lost: unknown)$", line)
    assert m, line
    return m.group(1), int(m.group(2)), m.group(3), None if m.group(4) is None else int(m.group(4))


@pytest.fixture(scope="module")
def never_killed(tmp_path_factory: pytest.TempPathFactory, cache_dir: str) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("never-killed")
    result = run_train(tiny_args(cache_dir, str(out), **STEPS))  # no local tier: it must not change a bit
    assert result.returncode == 0, describe(result)
    return load_model_dir(str(out / "model"))


def test_sigkills_lose_at_most_a_step_and_the_weights_are_those_of_a_run_never_killed(tmp_path, cache_dir, shm,
                                                                                      never_killed):
    out = tmp_path / "out"
    args = tiny_args(cache_dir, str(out), **STEPS, checkpoint__local_dir=str(shm))
    targets = sorted(random.Random(19).sample(range(3, 24, 3), 3))  # three steps, at least 3 apart
    finished, stdouts = [], []
    for target in targets:
        step, stdout = kill_at(start(train_command(args)), shm, target)
        finished.append(step)
        stdouts.append(stdout)
    for before, stdout in zip(finished, stdouts[1:]):  # each relaunch but the first was killed in turn
        path, step, tier, lost = resumed(stdout)
        assert tier == "local" and path.startswith(str(shm)) and before - 1 <= step <= before, (before, path)
        assert lost == before - step
    # A new machine: nothing local. The durable tier (a copy of a local commit at each epoch end) takes over.
    shutil.rmtree(shm)
    last = run_train(args)
    assert last.returncode == 0, describe(last)
    path, step, tier, lost = resumed(last.stdout)
    assert tier == "durable" and lost is None and path.startswith(str(out / "checkpoints"))
    assert step <= finished[-1] and step % 4 == 0, (step, finished)
    got = load_model_dir(str(out / "model"))
    assert set(got) == set(never_killed)
    assert all(torch.equal(got[k], never_killed[k]) for k in got), [k for k in got if not torch.equal(got[k], never_killed[k])]
    # One curve: every step's loss once, in order, across four processes and three kills.
    steps = [r["step"] for r in read_metrics(str(out)) if "train/loss" in r]
    assert steps == list(range(1, 27))
    assert not any(shm.glob("*/step-*")), "a finished run removes its local checkpoints"


def test_two_machines_resume_from_the_local_step_both_have(tmp_path, shm):
    # 16 steps per epoch: no durable checkpoint before the kill, the local tiers alone decide.
    overrides = dict(train__max_steps=12, data__max_train_samples=1024, checkpoint__dir=str(tmp_path / "shared-ck"))
    local = [shm / "machine0", shm / "machine1"]
    port = free_port()
    procs = [machine(r, port, tmp_path, str(tmp_path), **overrides, checkpoint__local_dir=str(local[r])) for r in (0, 1)]
    try:
        wait_for(lambda: progress(local[0]) >= 5 or any(p.poll() is not None for p in procs), 300, "step 5")
    finally:
        for proc in procs:
            kill_tree(proc.pid, signal.SIGKILL)
    outputs = [proc.communicate(timeout=30) for proc in procs]
    assert [p.returncode for p in procs] == [-signal.SIGKILL] * 2, outputs
    (run0,) = local[0].glob("*/")
    run1 = local[1] / run0.name
    steps0 = sorted(p.name for p in run0.glob("step-*") if (p / "COMMITTED").exists())
    assert len(steps0) == 2, steps0
    # Machine 1 lost its newest local checkpoint (say it was mid-save when it died): it has only the older.
    for folder in run1.glob("step-*"):
        shutil.rmtree(folder)
    shutil.copytree(run0 / steps0[0], run1 / steps0[0])  # DDP replicas: the same bytes on every machine
    both = int(steps0[0].split("-")[1])
    assert not list((tmp_path / "shared-ck").glob("step-*/COMMITTED")), "expected no durable checkpoint yet"

    port = free_port()
    results = finish_all([machine(r, port, tmp_path, str(tmp_path), **overrides, checkpoint__local_dir=str(local[r]))
                          for r in (0, 1)], 400)
    for r in results:
        assert r.returncode == 0, describe(r)
    assert "tinydist: 2 process(es)" in results[0].stdout, describe(results[0])
    path, step, tier, _ = resumed(results[0].stdout)
    assert (path, step, tier) == (str(run0 / steps0[0]), both, "local"), describe(results[0])
    assert (tmp_path / "out" / "model").is_dir()


def test_two_processes_on_one_machine_share_one_local_tier(tmp_path, cache_dir, shm):
    """One writer per machine (its first process); the other rank saves nothing locally but takes part in
    every save's collectives, and reads the same local tier on restore."""
    args = tiny_args(cache_dir, str(tmp_path / "out"), train__max_steps=10, checkpoint__local_dir=str(shm))
    finished, _ = kill_at(start(train_command(args, nprocs=2)), shm, 4)
    result = run_train(args, nprocs=2)
    assert result.returncode == 0, describe(result)
    assert "tinydist: 2 process(es)" in result.stdout, describe(result)
    path, step, tier, lost = resumed(result.stdout)
    assert tier == "local" and finished - 1 <= step <= finished and lost == finished - step, (finished, path)
    assert (tmp_path / "out" / "model").is_dir()

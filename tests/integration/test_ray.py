"""`python -m tinydist.ray`: tinydist's own training in Ray Train workers, run for real on a local Ray
instance on 127.0.0.1 (CPU processes, a gloo group), and the exit-code contract mapped onto Ray.

- a Ray Train worker SIGKILLed after the first commit: Ray restarts the group, which resumes from that
  commit; then SIGTERM to the driver: the workers save, Ray does not restart them, exit 75; the relaunch
  finishes with the same weights, bit for bit, as `accelerate launch --multi_gpu --num_processes 2` that
  was never stopped;
- bad input (config, data, checkpoint dir) exits 2 in one line before Ray starts: tests/unit/engines/.

Every Ray process a test starts carries a marker in its environment (helpers.ray_procs); each test
checks that the driver stopped them all, and kills any that are left, whatever happened. Two Ray runs
(each paying ~15 s to start its instance and worker group) and one accelerate run; the unit tests of the
same mapping (tests/unit/engines/) take a second.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
import torch

from helpers.ray_procs import left_running, marked_processes, new_mark, ray_available, ray_command, ray_env, stop_marked
from helpers.train import (committed_checkpoints, describe, error_lines, finish, load_model_dir, read_metrics,
                           run_train, start, tiny_args, train_env, wait_for)

pytestmark = pytest.mark.skipif(not ray_available(), reason="ray is not installed (pip install -e '.[ray]')")

TIMEOUT_S = 300
STEPS, EVERY = 30, 5  # long enough that a worker killed at the first commit (step 5) dies mid-run


@pytest.fixture
def mark() -> Iterator[str]:
    """A marker for this test's Ray processes; whatever is left of them at the end is killed."""
    tag = new_mark()
    yield tag
    left = left_running(tag)
    stop_marked(tag)
    assert not left, f"Ray processes outlived the driver (killed now): {left}"


def args(cache_dir: str, out: Path) -> list[str]:
    return tiny_args(cache_dir, str(out), train__max_steps=STEPS, checkpoint__every_steps=EVERY, log__every_steps=1,
                     train__global_batch_size=16, train__micro_batch_size=8, train__seed=11)


def groups_started(result: subprocess.CompletedProcess) -> int:
    """How many worker groups Ray Train's controller started (its log line, forwarded to the driver)."""
    return (result.stdout + result.stderr).count("Started training worker group of size")


def assert_bitwise_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], label: str) -> None:
    assert sorted(got) == sorted(want), label
    assert any(k.endswith("running_var") for k in want)
    differ = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    assert not differ, f"{label}: {len(differ)} of {len(want)} tensors differ, e.g. {differ[:5]}"


@pytest.fixture(scope="module")
def accelerate_two(cache_dir: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The weights of the same run under `accelerate launch --multi_gpu --num_processes 2`, never stopped."""
    out = tmp_path_factory.mktemp("accelerate2")
    reference = run_train(args(cache_dir, out), nprocs=2, env=train_env(), timeout=TIMEOUT_S)
    assert reference.returncode == 0, describe(reference)
    assert "tinydist: 2 process(es)" in reference.stdout, describe(reference)
    return load_model_dir(str(out / "model"))


@pytest.mark.slow
def test_a_killed_worker_and_a_stopped_driver_end_with_the_weights_of_accelerate_two_processes(
        accelerate_two, cache_dir: str, tmp_path: Path, mark: str):
    """One Ray run meets both faults, then the relaunch finishes it:
    - SIGKILL to one `ray::RayTrainWorker` after the first commit: Ray restarts the worker group
      (FailureConfig), `train` resumes from the newest commit;
    - then SIGTERM to the driver (Kubernetes stops its pod): every worker saves at the next step boundary,
      Ray does not restart them, the driver exits 75;
    - the same command finishes the run: bit for bit the weights of accelerate's two processes that were
      never stopped, one curve with each step once. (Each Ray run pays ~15 s to start its instance and
      group: one run with both faults, not one per fault.)"""
    out = tmp_path / "ray"
    proc = start(ray_command(args(cache_dir, out), 2), env=ray_env(mark))
    try:
        wait_for(lambda: committed_checkpoints(str(out)) or proc.poll() is not None, TIMEOUT_S, "the first commit")
        workers = marked_processes(mark, "ray::RayTrainWorker")
        assert proc.poll() is None and len(workers) == 2, f"expected 2 live Ray Train workers, found {workers}"
        os.kill(max(workers), signal.SIGKILL)
        first = committed_checkpoints(str(out))[-1]
        wait_for(lambda: committed_checkpoints(str(out))[-1] != first or proc.poll() is not None, TIMEOUT_S,
                 "a commit by the restarted group")
        assert proc.poll() is None, "the run ended before the SIGTERM"
        proc.send_signal(signal.SIGTERM)
    finally:
        result = finish(proc, TIMEOUT_S)
    assert result.returncode == 75, describe(result)
    output = result.stdout + result.stderr
    # A real group of two, on loopback: the world size that formed, and where it met.
    assert "tinydist.ray: 2 worker(s), process group at 127.0.0.1:" in result.stdout, describe(result)
    assert "tinydist: 2 process(es), device cpu" in result.stdout, describe(result)
    assert "global batch 16 = 8 x 2 processes x 1 accumulation" in result.stdout, describe(result)
    assert "resumed from" in output, f"no resume after the kill\n{describe(result)}"
    assert "SIGTERM received" in result.stdout, describe(result)
    # One restart, by Ray's FailureConfig for the kill; none for the stop the driver asked for.
    assert groups_started(result) == 2, describe(result)
    assert result.stderr.splitlines()[-1] == "tinydist.ray: training exited with 75", describe(result)
    stopped_at = int(Path(committed_checkpoints(str(out))[-1]).name[5:])
    assert 2 * EVERY <= stopped_at < STEPS, describe(result)

    again = finish(start(ray_command(args(cache_dir, out), 2), env=ray_env(mark)), TIMEOUT_S)
    assert again.returncode == 0 and f"at step {stopped_at}" in again.stdout, describe(again)
    assert not error_lines(again), describe(again)
    assert committed_checkpoints(str(out))[-1].endswith(f"step-{STEPS:08d}")
    assert not list(out.glob("ray*")), "Ray's bookkeeping belongs in a temporary folder, not the output"
    assert_bitwise_equal(load_model_dir(str(out / "model")), accelerate_two,
                         "Ray's 2 workers, killed, stopped and relaunched vs accelerate launch's 2 processes")
    # Cut back to each resumed commit, then continued: one curve, each step once.
    assert [m["step"] for m in read_metrics(str(out)) if "train/loss" in m] == list(range(1, STEPS + 1))

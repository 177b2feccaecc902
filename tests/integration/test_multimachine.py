"""Two machines, for real, on loopback: two `launch/one_node.sh` invocations (`--num_machines 2`, machine
ranks 0 and 1, main process 127.0.0.1, one process each), each with its own data cache dir (separate
nodes have separate disks) and one shared checkpoint.dir. They train what one process trains; a
SIGTERM to one machine's launcher makes both save and exit 75; relaunching both resumes and finishes."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from helpers.faultinject import free_port, kill_tree
from helpers import machines as two_machines
from helpers.machines import finish_all
from helpers.train import PYTHON, REPO, describe, load_model_dir, run_train, start, tiny_args, train_env

pytestmark = pytest.mark.slow  # two machines on localhost: launchers and training processes

STEPS = {"train__max_steps": 24, "checkpoint__every_steps": 2}


def machine(rank: int, port: int, tmp_path: Path, cache_root: str) -> subprocess.Popen:
    return two_machines.machine(rank, port, tmp_path, cache_root, **STEPS, checkpoint__dir=str(tmp_path / "shared-ck"))


def assert_close_to(model_dir: Path, reference: dict[str, torch.Tensor]) -> None:
    got = load_model_dir(str(model_dir))
    assert set(got) == set(reference)
    for key, want in reference.items():
        if want.is_floating_point():
            assert torch.allclose(got[key], want, rtol=1e-4, atol=1e-6), (key, (got[key] - want).abs().max())
        else:
            assert torch.equal(got[key], want), key


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory, cache_dir: str) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("one-process")
    result = run_train(tiny_args(cache_dir, str(out), **STEPS))
    assert result.returncode == 0, describe(result)
    return load_model_dir(str(out / "model"))


def test_two_machines_train_like_one_process(tmp_path, one_process):
    port = free_port()
    results = finish_all([machine(0, port, tmp_path, str(tmp_path)), machine(1, port, tmp_path, str(tmp_path))], 400)
    for r in results:
        assert r.returncode == 0, describe(r)
    assert "tinydist: 2 process(es)" in results[0].stdout, describe(results[0])
    # Each machine decoded its own cache: nothing shared but the checkpoint dir.
    assert (tmp_path / "machine0").is_dir() and (tmp_path / "machine1").is_dir()
    assert_close_to(tmp_path / "out" / "model", one_process)


def test_sigterm_to_one_machine_stops_both_with_a_commit_and_both_resume(tmp_path, one_process):
    port = free_port()
    procs = [machine(0, port, tmp_path, str(tmp_path)), machine(1, port, tmp_path, str(tmp_path))]
    first_commit = tmp_path / "shared-ck" / "step-00000002" / "COMMITTED"
    deadline = time.monotonic() + 300
    while not first_commit.exists() and all(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first_commit.exists(), "no first commit"
    procs[1].send_signal(signal.SIGTERM)  # machine 1's launcher only, as its VM's shutdown would
    results = finish_all(procs, 300)
    assert [r.returncode for r in results] == [75, 75], "\n".join(describe(r) for r in results)
    stopped = [line for line in results[0].stdout.splitlines() if line.startswith("stopped at step")]
    assert stopped, describe(results[0])
    step = int(stopped[0].split()[3])
    assert step < 24 and (tmp_path / "shared-ck" / f"step-{step:08d}" / "COMMITTED").exists()

    port = free_port()  # a fresh rendezvous for the relaunch
    results = finish_all([machine(0, port, tmp_path, str(tmp_path)), machine(1, port, tmp_path, str(tmp_path))], 400)
    for r in results:
        assert r.returncode == 0, describe(r)
    assert f"resumed from {tmp_path / 'shared-ck'}/step-{step:08d}" in results[0].stdout, describe(results[0])
    assert_close_to(tmp_path / "out" / "model", one_process)


# ---- elastic: losing a machine does not end the job ---------------------------------------------------


def elastic_machine(rank: int, port: int, tmp_path: Path, cache_root: str) -> subprocess.Popen:
    env = train_env({"NUM_GPUS": "1", "NUM_MACHINES": "2", "MIN_MACHINES": "1", "MACHINE_RANK": str(rank),
                     "MAIN_PROCESS_IP": "127.0.0.1", "MAIN_PROCESS_PORT": str(port), "PYTHON": PYTHON,
                     "RDZV_ID": f"test-{port}", "MAX_RESTARTS": "3",
                     # quick re-rendezvous on one machine: wait 3 s (not 30) for latecomers
                     "RDZV_CONF": "last_call_timeout=3,join_timeout=120"})
    args = tiny_args(f"{cache_root}/machine{rank}", str(tmp_path / "out"), **ELASTIC_STEPS,
                     checkpoint__dir=str(tmp_path / "shared-ck"), train__peer_timeout_s=60)
    return start([REPO / "launch" / "one_node.sh", *args], env)


ELASTIC_STEPS = {"train__max_steps": 40, "checkpoint__every_steps": 2}


@pytest.fixture(scope="module")
def one_process_elastic(tmp_path_factory: pytest.TempPathFactory, cache_dir: str) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("one-process-elastic")
    result = run_train(tiny_args(cache_dir, str(out), **ELASTIC_STEPS))
    assert result.returncode == 0, describe(result)
    return load_model_dir(str(out / "model"))


def test_elastic_run_survives_losing_a_machine(tmp_path, one_process_elastic):
    from helpers.faultinject import children_of

    port = free_port()
    survivor = elastic_machine(0, port, tmp_path, str(tmp_path))
    time.sleep(1.0)  # machine 0 hosts the rendezvous (it is MAIN_PROCESS_IP): let it bind first
    doomed = elastic_machine(1, port, tmp_path, str(tmp_path))
    try:
        commit = tmp_path / "shared-ck" / "step-00000004" / "COMMITTED"
        deadline = time.monotonic() + 300
        while not commit.exists() and survivor.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert commit.exists(), "no commit with two machines"
        assert children_of(doomed.pid), "machine 1 has no workers"
        kill_tree(doomed.pid, signal.SIGKILL)  # the whole machine: launcher, agent and worker
        (result,) = finish_all([survivor], 400)
    finally:
        for proc in (survivor, doomed):
            if proc.poll() is None:
                kill_tree(proc.pid, signal.SIGKILL)
        doomed.communicate()
    assert result.returncode == 0, describe(result)
    out = result.stdout + result.stderr
    assert "tinydist: 2 process(es)" in out and "tinydist: 1 process(es)" in out, describe(result)
    resumed = [line for line in result.stdout.splitlines() if line.startswith("resumed from")]
    assert resumed and "saved by 2 process(es)" in resumed[-1], describe(result)
    assert "accumulation" in out
    assert_close_to(tmp_path / "out" / "model", one_process_elastic)

"""The faults spot jobs really meet, injected for real on one machine: a bucket that goes away (moto
behind a loopback TCP proxy that is stopped), a full disk (a small tmpfs), a second job on the same
checkpoint dir, a checkpoint edited with its checksums fixed up, storage down at start-up.

Each run ends either with weights bitwise equal to the same run that met no fault (same process
count), or with a one-line refusal and the exit code of the contract (tinydist/exitcodes.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch

from helpers.faultinject import S3_ENV_UNSET, TcpProxy, make_bucket, moto_server, reseal, s3_env, tmpfs
from helpers.train import (PYTHON, REPO, describe, error_lines, finish, load_model_dir, run_train, start, tiny_args,
                           train_command, train_env, wait_for)

pytestmark = pytest.mark.slow  # every test here trains in subprocesses and injects a fault

STEPS = {"train__max_steps": 12, "checkpoint__every_steps": 2}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, cache_dir: str) -> dict[str, torch.Tensor]:
    """The exported weights of the run that meets no fault."""
    out = tmp_path_factory.mktemp("reference")
    result = run_train(tiny_args(cache_dir, str(out), **STEPS))
    assert result.returncode == 0, describe(result)
    return load_model_dir(str(out / "model"))


def assert_same_weights(model_dir: Path, reference: dict[str, torch.Tensor]) -> None:
    got = load_model_dir(str(model_dir))
    assert set(got) == set(reference)
    different = [k for k in reference if not torch.equal(got[k], reference[k])]
    assert not different, f"tensors differ from the run without faults: {different[:5]}"


# ---- a bucket that goes away ---------------------------------------------------------------------------


def _bucket_keys(endpoint: str, bucket: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", []))


def _spot_loop(tmp_path: Path, cache_dir: str, proxy_url: str, bucket: str, **overrides) -> subprocess.Popen:
    env = train_env(s3_env(proxy_url), unset=S3_ENV_UNSET)
    env.update(TRAIN_CMD=f"{PYTHON} -m tinydist.train", CHECKPOINT_DIR=f"s3://{bucket}/ck", BACKOFF_S="1",
               MAX_BACKOFF_S="2", MAX_ATTEMPTS="8", PREEMPT_DELAY_S="0")
    args = tiny_args(cache_dir, str(tmp_path / "out"), **STEPS, checkpoint__retry_s=0.2, **overrides)
    return start([REPO / "launch" / "spot_relaunch.sh", *args], env)


def test_bucket_outage_is_ridden_out_without_a_relaunch(tmp_path, cache_dir, reference):
    """The bucket vanishes for seconds mid-run: saves fail, are retried while training goes on, and the
    run finishes at its first launch with the weights of a run that never saw an outage."""
    with moto_server() as endpoint:
        bucket = make_bucket(endpoint)
        with TcpProxy(("127.0.0.1", urlparse(endpoint).port)).start() as proxy:
            proc = _spot_loop(tmp_path, cache_dir, proxy.url, bucket)
            wait_for(lambda: "ck/step-00000002/COMMITTED" in _bucket_keys(endpoint, bucket) or proc.poll() is not None,
                     240, "the first commit")
            proxy.outage(6.0)
            result = finish(proc, 300)
        keys = _bucket_keys(endpoint, bucket)
    assert result.returncode == 0, describe(result)
    log = result.stdout + result.stderr
    assert log.count("spot_relaunch: launch ") == 1, log
    failures = [line for line in log.splitlines() if "save failed" in line]
    assert failures and all("retrying in" in line for line in failures), log
    assert "ck/step-00000012/COMMITTED" in keys
    assert not [k for k in keys if "step-" in k and k.split("/")[1] not in ("step-00000010", "step-00000012")], keys
    assert_same_weights(tmp_path / "out" / "model", reference)


def test_bucket_outage_past_the_budget_exits_transient_and_the_loop_resumes(tmp_path, cache_dir, reference):
    """An outage longer than checkpoint.max_outage_s stops the run with 69; the relaunch loop backs off,
    relaunches (start-ups meeting the outage exit 69 too, never 1 or 2) and the run finishes bitwise."""
    with moto_server() as endpoint:
        bucket = make_bucket(endpoint)
        with TcpProxy(("127.0.0.1", urlparse(endpoint).port)).start() as proxy:
            proc = _spot_loop(tmp_path, cache_dir, proxy.url, bucket, checkpoint__max_outage_s=1)
            wait_for(lambda: "ck/step-00000002/COMMITTED" in _bucket_keys(endpoint, bucket) or proc.poll() is not None,
                     240, "the first commit")
            proxy.outage(12.0)
            result = finish(proc, 400)
    assert result.returncode == 0, describe(result)
    log = result.stdout + result.stderr
    assert "exit 69: relaunching" in log and "transient failure (69)" in log, log
    assert "exit 2:" not in log and "exit 1:" not in log and "Traceback" not in log, log
    assert log.count("spot_relaunch: launch ") >= 2
    assert "resumed from s3://" in log
    assert_same_weights(tmp_path / "out" / "model", reference)


def test_storage_down_at_start_is_transient_not_a_crash(tmp_path, cache_dir):
    with moto_server() as endpoint:
        bucket = make_bucket(endpoint)
        with TcpProxy(("127.0.0.1", urlparse(endpoint).port)).start() as proxy:
            proxy.down()
            env = train_env(s3_env(proxy.url, max_attempts=1), unset=S3_ENV_UNSET)
            result = run_train(tiny_args(cache_dir, str(tmp_path / "out"), checkpoint__dir=f"s3://{bucket}/ck",
                                         checkpoint__max_outage_s=1), env=env, timeout=240)
    assert result.returncode == 69, describe(result)
    assert "Traceback" not in result.stderr
    assert len(error_lines(result)) == 1 and f"s3://{bucket}/ck" in error_lines(result)[0], describe(result)


def test_missing_bucket_fails_in_one_line_before_any_training(tmp_path, cache_dir):
    with moto_server() as endpoint:
        result = run_train(tiny_args(cache_dir, str(tmp_path / "out"), checkpoint__dir="s3://no-such-bucket/ck"),
                           env=train_env(s3_env(endpoint), unset=S3_ENV_UNSET), timeout=240)
    assert result.returncode == 2, describe(result)
    (line,) = error_lines(result)
    assert "checkpoint.dir=s3://no-such-bucket/ck cannot be written" in line and "bucket does not exist" in line, line
    assert "step 1" not in result.stdout and "Traceback" not in result.stderr


# ---- a full disk ---------------------------------------------------------------------------------------


def test_full_disk_costs_a_warning_and_leaves_nothing_behind(tmp_path, cache_dir, reference):
    """checkpoint.dir on a disk with room for one checkpoint (~90 MB each): the first commits, the
    others fail; each failure removes what it wrote and says why; the run finishes, bitwise."""
    out = tmp_path / "out"
    with tmpfs(tmp_path / "disk", 140 * 10**6) as disk:
        result = run_train(tiny_args(cache_dir, str(out), **{**STEPS, "checkpoint__every_steps": 4},
                                     checkpoint__keep_last=1, checkpoint__dir=str(disk / "ck")))
        left = sorted(str(p.relative_to(disk)) for p in disk.rglob("*"))
        committed = json.loads((disk / "ck" / "step-00000004" / "state.json").read_text())
    assert result.returncode == 0, describe(result)
    warnings = [line for line in result.stdout.splitlines() if "no space left on device" in line]
    assert len(warnings) == 2, describe(result)  # step 8 and the final save at step 12
    assert all("MB per checkpoint" in w and "MB free" in w and "what it wrote is removed" in w for w in warnings)
    assert "training goes on" in warnings[0] and "no final checkpoint" in result.stdout
    # Only the committed checkpoint: no half-written folder, no temp file, no lease.
    assert left == ["ck", "ck/step-00000004"] + sorted(f"ck/step-00000004/{n}" for n in
                                                        [*committed["files"], "COMMITTED", "state.json",
                                                         "part-00000.json"]), left
    assert_same_weights(out / "model", reference)


# ---- two jobs, one checkpoint dir -----------------------------------------------------------------------


def test_second_job_on_a_live_lease_is_refused_while_the_first_finishes(tmp_path, cache_dir, reference):
    ck = tmp_path / "shared-ck"
    first = start(train_command(tiny_args(cache_dir, str(tmp_path / "a"), **STEPS, checkpoint__dir=str(ck))),
                  train_env())
    try:
        wait_for(lambda: (ck / "LEASE.json").exists() or first.poll() is not None, 240, "the first job's lease")
        os.kill(first.pid, signal.SIGSTOP)  # hold it mid-run, so the second job surely meets it alive
        started = time.monotonic()
        second = run_train(tiny_args(cache_dir, str(tmp_path / "b"), **STEPS, checkpoint__dir=str(ck)), timeout=120)
        refused_after = time.monotonic() - started
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 69, describe(second)
    (line,) = error_lines(second)
    assert "is in use by" in line and f"pid {first.pid}" in line and "another checkpoint.dir" in line, line
    assert not (tmp_path / "b" / "model").exists()
    assert refused_after < 60, refused_after  # the start-up plus an immediate refusal, not a lease timeout
    result = finish(first, 300)
    assert result.returncode == 0, describe(result)
    assert_same_weights(tmp_path / "a" / "model", reference)
    assert not (ck / "LEASE.json").exists()  # released on the way out


# ---- a checkpoint edited by someone else ------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory: pytest.TempPathFactory, cache_dir: str) -> Path:
    out = tmp_path_factory.mktemp("saved")
    result = run_train(tiny_args(cache_dir, str(out), train__max_steps=4, checkpoint__every_steps=2))
    assert result.returncode == 0, describe(result)
    return out


def _edit_state(**changes):
    def edit(folder: Path) -> None:
        state = json.loads((folder / "state.json").read_text())
        for dotted, value in changes.items():
            target, *path, last = [state, *dotted.split("__")]
            for key in path:
                target = target[key]
            target[last] = value
        (folder / "state.json").write_text(json.dumps(state))
    return edit


def _wrong_shape_momentum(folder: Path) -> None:
    import safetensors.torch

    index = json.loads((folder / "optimizer.safetensors.index.json").read_text())
    shard = folder / index["weight_map"]["fc.weight.momentum_buffer"]
    tensors = safetensors.torch.load(shard.read_bytes())
    tensors["fc.weight.momentum_buffer"] = torch.zeros(3, 3)
    shard.write_bytes(safetensors.torch.save(tensors, metadata={"format": "pt"}))


@pytest.mark.parametrize("edit,reason", [
    (_edit_state(step=10**30), "says step 1000000000000000000000000000000; expected the folder's own step 4"),
    (_edit_state(step=-1), "says step -1"),
    (_edit_state(step="abc"), "says step 'abc'"),
    (_edit_state(epoch=99.0), "epoch 99.0 at step 4"),
    (_edit_state(samples=1), "samples 1 at step 4"),
    (_edit_state(optimizer__param_groups=[]), "param groups differ"),
    (_wrong_shape_momentum, "fc.weight.momentum_buffer is (3, 3)"),
], ids=["step-huge", "step-negative", "step-text", "epoch", "samples", "groups", "optimizer-shape"])
def test_edited_checkpoint_is_refused_in_one_line(tmp_path, saved_run, cache_dir, edit, reason):
    out = tmp_path / "run"
    shutil.copytree(saved_run, out)
    folder = out / "checkpoints" / "step-00000004"
    edit(folder)
    reseal(folder)
    result = run_train(tiny_args(cache_dir, str(out), train__max_steps=6, checkpoint__every_steps=2))
    assert result.returncode == 2, describe(result)
    assert "Traceback" not in result.stderr, describe(result)
    (line,) = error_lines(result)
    assert "step-00000004" in line and reason in line, line
    assert "done:" not in result.stdout

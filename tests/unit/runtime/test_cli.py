"""Every entry point under one wrapper (cli.run): the exit-code contract and one `error:` line, whatever
went wrong; evaluate's metric names; storage that refuses writes; SIGHUP as a stop signal; the console
scripts of setup.cfg.

In-process calls of each `main(argv)` where possible (capsys reads what the user would see); real
processes (marked slow) only where the process itself is the point: no traceback on the way out, a
training run stopped by SIGHUP, a read-only checkpoint dir refused before any step.
"""

from __future__ import annotations

import configparser
import contextlib
import importlib
import inspect
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from helpers.faultinject import aws_test_env, free_port
from tinydist.bench import suite as bench
from tinydist import config
from tinydist.loop import evaluate
from tinydist.runtime import launch
from tinydist.export import predict
from tinydist.runtime import preempt
from tinydist.runtime.cli import exit_code_for
from tinydist.runtime.exitcodes import EXIT_CONFIG, EXIT_PREEMPTED, EXIT_TRANSIENT, PermanentError
from tinydist.ckpt.storage import Storage, StorageError, StorageRefusedError
from helpers.train import (PYTHON, REPO, SMOKE, committed_checkpoints, describe, error_lines, run, run_train,
                           tiny_args, train_env)


def one_error(err: str) -> str:
    """The single `error:` line of `err` (stderr); fails on a traceback or on more than one."""
    assert "Traceback" not in err, err
    lines = error_lines(err)
    assert len(lines) == 1, err
    return lines[0]


# ---- setup.cfg's console scripts -----------------------------------------------------------------------------


def console_scripts() -> dict[str, str]:
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    entries = [line.strip() for line in parser["options.entry_points"]["console_scripts"].splitlines() if line.strip()]
    return dict(tuple(part.strip() for part in line.split("=", 1)) for line in entries)  # type: ignore[misc]


def test_every_console_script_points_at_an_importable_main() -> None:
    scripts = console_scripts()
    assert {"tinydist-train", "tinydist-launch", "tinydist-evaluate", "tinydist-predict", "tinydist-data",
            "tinydist-config", "tinydist-report", "tinydist-bench"} <= set(scripts), scripts
    for name, target in scripts.items():
        module_name, _, function = target.partition(":")
        assert function == "main", f"{name} = {target}: expected module:main"
        main = getattr(importlib.import_module(module_name), function)
        assert callable(main), target
        # A console script calls main() with no argument and exits with what it returns.
        assert list(inspect.signature(main).parameters) == ["argv"], target
        assert inspect.signature(main).parameters["argv"].default is None, target


def test_every_module_run_with_python_m_is_a_console_script() -> None:
    """`python -m tinydist.X` (a module with a __main__ block, or a package with __main__.py) and its console
    script run the same main."""
    root = REPO / "tinydist"
    runnable = {f"tinydist.{p.stem}" for p in root.glob("*.py") if 'if __name__ == "__main__":' in p.read_text()}
    runnable |= {f"tinydist.{p.parent.name}" for p in root.glob("*/__main__.py")}
    mains = {}
    for name in runnable:
        module = importlib.import_module(name + (".__main__" if (root / name.split(".")[1]).is_dir() else ""))
        mains[name] = module.main
    targets = {getattr(importlib.import_module(t.partition(":")[0]), "main") for t in console_scripts().values()}
    assert {name for name, main in mains.items() if main not in targets} == set()
    assert len(runnable) == len(console_scripts()), (sorted(runnable), console_scripts())


# ---- each entry point: its own errors through cli.run ---------------------------------------------------------


@pytest.fixture
def signal_handlers() -> Iterator[None]:
    """launch.main installs its forwarding handlers in this process: put pytest's back afterwards."""
    saved = {s: signal.getsignal(s) for s in preempt.SIGNALS}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


ENTRY_POINTS = ["tinydist.train", "tinydist.launch", "tinydist.evaluate", "tinydist.predict", "tinydist.data.cache",
                "tinydist.config", "tinydist.report", "tinydist.bench.suite", "tinydist.bench.gpu", "tinydist.bench.quality"]


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_a_bad_flag_is_a_returned_2_never_a_raised_exit(module: str, capsys: pytest.CaptureFixture[str],
                                                       signal_handlers: None) -> None:
    """A console script exits with what main returns; main itself never raises (SystemExit included)."""
    assert importlib.import_module(module).main(["--no-such-flag"]) == EXIT_CONFIG
    out, err = capsys.readouterr()
    assert out == "" and "error: " in err and "Traceback" not in err, err  # argparse's words, or ours


def test_config_error_is_2_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert config.main(["--optim.bogus=1"]) == EXIT_CONFIG
    out, err = capsys.readouterr()
    assert out == "" and one_error(err).startswith("error: override `--optim.bogus=1`: unknown config key")


def test_bench_quality_config_error_is_2_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["quality", "--optim.bogus=1"]) == EXIT_CONFIG
    out, err = capsys.readouterr()
    assert out == "" and "unknown config key `optim.bogus`" in one_error(err)


def test_launch_missing_training_script_is_2_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          signal_handlers: None) -> None:
    assert launch.main(["--cpu", "--num_processes", "1", str(tmp_path / "nope.py")]) == EXIT_CONFIG
    out, err = capsys.readouterr()
    assert one_error(err) == (f"error: training script '{tmp_path / 'nope.py'}': no such file (relative to "
                              f"{os.getcwd()}); expected a path like tinydist/train.py, or -m with a module name")
    assert "training exited" not in err  # nothing was launched
    assert launch.EXIT_DIR_ENV not in os.environ


def test_launch_usage_error_keeps_argparse_code(capsys: pytest.CaptureFixture[str], signal_handlers: None) -> None:
    assert launch.main(["--no-such-flag", "train.py"]) == EXIT_CONFIG
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_predict_model_on_unreachable_storage_is_transient(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # a cached client would keep an earlier test's endpoint
    try:
        with aws_test_env(f"http://127.0.0.1:{free_port()}"), pytest.MonkeyPatch.context() as patch:
            patch.setenv("AWS_MAX_ATTEMPTS", "1")
            code = predict.main(["--model", "s3://bucket/model", str(tmp_path)])
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    out, err = capsys.readouterr()
    assert code == EXIT_TRANSIENT, err
    assert out == "" and one_error(err).startswith("error: reading s3://bucket/model/model.safetensors.index.json: ")


# ---- evaluate: which errors are which, and what it calls its metrics -----------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An untrained model exported as training would (config.json carries the run's config): digits at
    16 px, its decode cache in a temp folder, 64 images per scored split."""
    from tinydist.config import load_config
    from tinydist.export.writer import export_model
    from tinydist.model.build import build_model

    root = tmp_path_factory.mktemp("evaluate")
    cfg = load_config(["--config", SMOKE, "--data.image_size=16", f"--data.cache_dir={root / 'cache'}",
                       "--data.max_val_samples=64", "--train.eval_batch_size=64"])
    classes = [str(i) for i in range(10)]
    export_model(build_model(cfg.model, len(classes)), str(root / "model"), cfg=cfg, classes=classes)
    return str(root / "model")


def test_evaluate_names_metrics_after_the_split(exported: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert evaluate.main(["--checkpoint", exported, "--split", "train", "--json"]) == 0
    scores = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert set(scores) == {"train/top1", "train/top5", "train/loss", "split", "images"}, scores
    assert scores["split"] == "train" and scores["images"] == 64
    assert evaluate.main(["--checkpoint", exported, "--split", "train"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert re.fullmatch(rf"{re.escape(exported)}: train top-1 [\d.]+  top-5 [\d.]+  loss [\d.]+  "
                        r"\(64 images of split train of digits\)", line), line
    # The run's own validation split keeps training's names (metrics.jsonl, checkpoint.best_metric).
    assert evaluate.main(["--checkpoint", exported, "--json"]) == 0
    scores = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert {"val/top1", "val/top5", "val/loss"} <= set(scores) and scores["split"] == "valid", scores


def test_evaluate_missing_local_path_is_2_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert evaluate.main(["--checkpoint", str(tmp_path / "nope")]) == EXIT_CONFIG
    out, err = capsys.readouterr()
    assert out == "" and one_error(err) == (
        f"error: --checkpoint {tmp_path / 'nope'}: no such folder; expected a checkpoint folder "
        "({checkpoint.dir}/step-N) or an exported model folder ({train.output_dir}/model)")


def test_evaluate_folder_that_is_no_model_is_2_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert evaluate.main(["--checkpoint", str(tmp_path)]) == EXIT_CONFIG
    assert "no model.safetensors.index.json" in one_error(capsys.readouterr().err)


def test_evaluate_unreachable_hub_is_transient(exported: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # conftest: the hub is out of reach for every test
    monkeypatch.chdir(tmp_path)  # no local folder named like the hub id
    assert evaluate.main(["--checkpoint", exported, "--data.source=zh-plus/tiny-imagenet"]) == EXIT_TRANSIENT
    err = capsys.readouterr().err
    assert one_error(err).startswith("error: cannot reach the Hugging Face hub for `zh-plus/tiny-imagenet`"), err


@contextlib.contextmanager
def s3_without_credentials(endpoint: str) -> Iterator[None]:
    """AWS settings with no credentials anywhere botocore looks (environment, files, instance metadata)."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # a cached client would keep an earlier test's credentials
    with aws_test_env(endpoint), pytest.MonkeyPatch.context() as patch:
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                    "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                    "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
            patch.delenv(key, raising=False)
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/tinydist-test/credentials")
        patch.setenv("AWS_CONFIG_FILE", "/nonexistent/tinydist-test/config")
        patch.setenv("AWS_MAX_ATTEMPTS", "1")
        try:
            yield
        finally:
            s3fs.S3FileSystem.clear_instance_cache()


def test_evaluate_unreachable_s3_is_transient(capsys: pytest.CaptureFixture[str]) -> None:
    import s3fs

    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with aws_test_env(endpoint), pytest.MonkeyPatch.context() as patch:
            patch.setenv("AWS_MAX_ATTEMPTS", "1")
            code = evaluate.main(["--checkpoint", "s3://b/x"])
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    out, err = capsys.readouterr()
    assert code == EXIT_TRANSIENT, err
    line = one_error(err)
    assert line.startswith("error: looking for s3://b/x/") and "Could not connect to the endpoint URL" in line, line


def test_evaluate_s3_without_credentials_is_2_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    # 2, not 69: see storage.Storage.faults (no credentials anywhere is the environment's configuration).
    with s3_without_credentials(f"http://127.0.0.1:{free_port()}"):
        code = evaluate.main(["--checkpoint", "s3://b/x"])
    out, err = capsys.readouterr()
    assert code == EXIT_CONFIG, err
    line = one_error(err)
    assert line.startswith("error: looking for s3://b/x/") and "no credentials found (NoCredentialsError" in line, line
    assert "AWS_ACCESS_KEY_ID" in line


@pytest.mark.slow  # a fresh interpreter: the process's own exit code and stderr, as a shell sees them
def test_evaluate_command_with_s3_out_of_reach_exits_69_without_traceback() -> None:
    env = train_env({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_ACCESS_KEY_ID": "testing",
                     "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                     "AWS_EC2_METADATA_DISABLED": "true", "AWS_MAX_ATTEMPTS": "1"},
                    unset=("AWS_PROFILE", "AWS_SESSION_TOKEN", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"))
    result = run([PYTHON, "-m", "tinydist.evaluate", "--checkpoint", "s3://b/x"], env=env, timeout=180)
    assert result.returncode == EXIT_TRANSIENT, describe(result)
    assert result.stdout == "" and "Could not connect to the endpoint URL" in one_error(result.stderr), describe(result)


# ---- storage that refuses writes --------------------------------------------------------------------------------


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[Path]:
    """A real read-only file system (a 1 MB tmpfs mounted ro). Root ignores a folder's mode bits, so
    chmod 0555 would prove nothing here. Skipped, with mount's own words, where mounting is refused."""
    mount = shutil.which("mount")
    if mount is None:
        pytest.skip("read-only mount: no `mount` command on this machine")
    where = tmp_path / "ro"
    where.mkdir()
    result = subprocess.run([mount, "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(where)],
                            capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        pytest.skip(f"read-only mount refused (uid {os.geteuid()}): "
                    f"{(result.stderr or result.stdout).strip() or result.returncode}")
    try:
        yield where
    finally:
        umount = shutil.which("umount") or "umount"
        if subprocess.run([umount, str(where)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run([umount, "-l", str(where)], capture_output=True, timeout=30)


def test_read_only_file_system_is_permanent_not_transient(read_only: Path) -> None:
    storage = Storage(str(read_only))
    for action in (lambda: storage.write("state.json", b"{}"), lambda: storage.makedirs("step-00000001")):
        with pytest.raises(StorageRefusedError) as e:
            action()
        assert not isinstance(e.value, StorageError)  # never retried as an outage
        assert exit_code_for(e.value) == EXIT_CONFIG
        assert "read-only file system" in str(e.value) and "\n" not in str(e.value)
    assert storage.sizes() == {}  # reading is fine


def test_a_save_to_a_read_only_checkpoint_dir_is_not_retried_as_an_outage(read_only: Path) -> None:
    import torch

    from tinydist.ckpt.checkpointer import Checkpointer

    model = torch.nn.Linear(4, 2)
    logs: list[str] = []
    checkpointer = Checkpointer(str(read_only), keep_last=1, log=logs.append, max_outage_s=600, retry_s=1)
    with pytest.raises(StorageRefusedError) as e:
        checkpointer.save(1, model, torch.optim.SGD(model.parameters(), lr=0.1), {"epoch": 0}, blocking=True)
    assert "read-only file system" in str(e.value) and exit_code_for(e.value) == EXIT_CONFIG
    assert not [line for line in logs if "retrying" in line], logs
    assert checkpointer.committed() == [] and os.listdir(read_only) == []


@pytest.mark.parametrize("key", ["checkpoint.dir", "train.output_dir"])
def test_read_only_location_is_refused_before_training_by_rank_0(read_only: Path, tmp_path: Path, key: str) -> None:
    from tinydist.config import ConfigError, load_config
    from tinydist.ckpt.lease import claim_storage
    from tinydist.runtime.peers import Peers

    location = read_only / "run"
    cfg = load_config([f"--train.output_dir={tmp_path / 'out'}", f"--checkpoint.dir={tmp_path / 'ck'}",
                       f"--{key}={location}"])
    stop = preempt.StopFlag(log=lambda m: None)
    try:
        with pytest.raises(PermanentError) as e:
            claim_storage(cfg, stop, Peers(1, 0, 10.0), say=lambda m: None)
    finally:
        stop.restore()
    assert isinstance(e.value, ConfigError)  # what claim_storage tells the other ranks about
    assert exit_code_for(e.value) == EXIT_CONFIG
    assert str(e.value).startswith(f"{key}={location} cannot be written: creating {location}: read-only file system")


@pytest.mark.slow  # a training process; it must stop before its first step, so it is short
def test_train_with_a_read_only_checkpoint_dir_exits_2_in_one_line(read_only: Path, tmp_path: Path,
                                                                     cache_dir: str) -> None:
    result = run_train(tiny_args(cache_dir, str(tmp_path / "out"), checkpoint__dir=str(read_only)), timeout=240)
    assert result.returncode == EXIT_CONFIG, describe(result)
    line = one_error(result.stderr)
    assert line.startswith(f"error: checkpoint.dir={read_only} cannot be written: ") and \
        "read-only file system" in line, line
    assert "step 1" not in result.stdout and not (tmp_path / "out" / "model").exists(), describe(result)


# ---- SIGHUP ------------------------------------------------------------------------------------------------------


def test_sighup_is_a_stop_signal() -> None:
    assert signal.SIGHUP in preempt.SIGNALS
    stop = preempt.StopFlag(log=lambda m: None)
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        assert stop.requested and stop.signal_name == "SIGHUP"
    finally:
        stop.restore()


def test_sighup_inherited_ignored_stays_ignored(capsys: pytest.CaptureFixture[str], signal_handlers: None) -> None:
    """nohup: the user asked the run to outlive its terminal; neither the flag nor the launcher take SIGHUP."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    stop = preempt.StopFlag(log=lambda m: None)
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        assert not stop.requested
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    launch.main(["--cpu", "no-such-script.py"])  # fails at once, after installing its handlers
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN  # so its children inherit it ignored
    assert signal.getsignal(signal.SIGTERM) == launch._forward


# A driver: sends SIGHUP to its own process before micro-batch transform N, then runs tinydist.train.main,
# as tests/test_resume.py's driver does for SIGINT and SIGUSR1.
HUP_DRIVER = r'''
import os, signal, sys
import tinydist.train as train

n, seen = int(sys.argv[1]), [0]
original = train.augment  # once per micro-batch, on the loop's thread


def augment(*args, **kwargs):
    seen[0] += 1
    if seen[0] == n:
        print(f"driver: sending SIGHUP before micro-batch transform {n}", flush=True)
        os.kill(os.getpid(), signal.SIGHUP)
    return original(*args, **kwargs)


train.augment = augment
sys.exit(train.main(sys.argv[2:]))
'''


@pytest.mark.slow  # a training process
def test_sighup_saves_at_the_step_boundary_and_exits_75(tmp_path: Path, cache_dir: str) -> None:
    from tinydist.ckpt.checkpointer import Checkpointer

    driver = tmp_path / "driver.py"
    driver.write_text(HUP_DRIVER)
    out = tmp_path / "run"
    # 2 micro-batches per step: transform 4 is step 2's second, so the stop comes after step 2.
    args = tiny_args(cache_dir, str(out), train__max_steps=12, checkpoint__every_steps=4, train__global_batch_size=16,
                     train__micro_batch_size=8, log__every_steps=1)
    result = run_train(["4", *args], script=str(driver), timeout=300)
    assert result.returncode == EXIT_PREEMPTED, describe(result)
    assert "driver: sending SIGHUP before micro-batch transform 4" in result.stdout
    assert "stopped at step 2 after SIGHUP; checkpoint committed, exit 75" in result.stdout, describe(result)
    assert "Traceback" not in result.stdout + result.stderr
    assert committed_checkpoints(str(out)) == [f"{out}/checkpoints/step-00000002"]
    latest = Checkpointer(str(out / "checkpoints"), keep_last=2, log=lambda m: None).latest()  # checksums verified
    assert latest == f"{out}/checkpoints/step-00000002"
    assert not (out / "model").exists()  # stopped, not finished: nothing exported

"""Trackers are best-effort: a dashboard never stops (or stalls) a training run.

- WANDB_MODE=online with no API key is the one tracker fault that stops a run: a ConfigError (exit 2)
  in one line, from make_accelerator, before any data is loaded, with no network call.
- W&B that cannot reach its server comes up offline within `log.tracker_timeout_s` (here wandb's own
  WANDB_INIT_TIMEOUT, which tinydist honours when shorter), under the run id the checkpoint keeps, with
  one warning naming `wandb sync <dir>`; the run trains, exits 0, and a resume continues the same id.
- A tracker that cannot start, or whose log raises, is dropped with one warning; training goes on.

The W&B server is a closed loopback port: nothing here leaves the machine, and every wait is bounded
by wandb's init timeout and the subprocess timeout of helpers.train.run.
"""

from __future__ import annotations

import glob
import json
import os
import types
from pathlib import Path
from typing import Any, Optional

import pytest

from helpers.faultinject import free_port
from helpers.train import describe, error_lines, read_metrics, run_train, tiny_args, train_env, wandb_history

from tinydist.loop.accel import make_accelerator
from tinydist.runtime.cli import exit_code_for
from tinydist.config import Config, ConfigError
from tinydist.runtime.exitcodes import EXIT_CONFIG
from tinydist.loop.tracking import RunLog, check_wandb_credentials, wandb_credentials

FAKE_KEY = "x" * 40  # a well-formed key no server knows
SUBPROCESS_TIMEOUT = 240


@pytest.fixture
def no_wandb_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No key anywhere wandb looks: no variables, an empty home (no ~/.netrc), no saved settings."""
    home = tmp_path / "home"
    home.mkdir()
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "NETRC", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / ".config" / "wandb"))
    return home


def _wandb_cfg(output_dir: str = "runs/unused") -> Config:
    cfg = Config()
    cfg.log.report_to = ["wandb"]
    cfg.train.output_dir = output_dir
    return cfg


# ---- (a) WANDB_MODE=online without a key: exit 2 before the data --------------------------------------------


def test_online_without_key_is_one_line_config_error_from_make_accelerator(no_wandb_key, monkeypatch):
    """make_accelerator is train()'s first step, before load_split: the error comes before any data."""
    monkeypatch.setenv("WANDB_MODE", "online")
    with pytest.raises(ConfigError) as caught:
        make_accelerator(_wandb_cfg())
    message = str(caught.value)
    assert "WANDB_API_KEY" in message and "`wandb login`" in message, message
    assert "\n" not in message, message
    assert exit_code_for(caught.value) == EXIT_CONFIG


@pytest.mark.parametrize("mode", [None, "offline", "disabled", "dryrun"])
def test_without_key_only_an_explicit_online_mode_is_refused(no_wandb_key, monkeypatch, mode: Optional[str]):
    """Unset WANDB_MODE is wandb's default, not the user's demand: the run logs offline (RunLog says so)."""
    if mode:
        monkeypatch.setenv("WANDB_MODE", mode)
    check_wandb_credentials()


def _netrc(home: Path, host: str) -> None:
    path = home / ".netrc"
    path.write_text(f"machine {host}\n  login user\n  password {FAKE_KEY}\n")
    path.chmod(0o600)


@pytest.mark.parametrize("where", ["env", "token_file", "netrc", "netrc_base_url", "netrc_saved_host", "NETRC"])
def test_online_with_a_key_wandb_would_find_passes(no_wandb_key, monkeypatch, tmp_path, where: str):
    """Where wandb itself looks (wandb/sdk/lib/wbauth): a key any of these has is never refused."""
    monkeypatch.setenv("WANDB_MODE", "online")
    home = no_wandb_key
    if where == "env":
        monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    elif where == "token_file":
        monkeypatch.setenv("WANDB_IDENTITY_TOKEN_FILE", str(tmp_path / "token.jwt"))
    elif where == "netrc":
        _netrc(home, "api.wandb.ai")
    elif where == "netrc_base_url":
        monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")
        _netrc(home, "wandb.example.com")
    elif where == "netrc_saved_host":  # `wandb login --host https://wandb.example.com` saves both
        settings = home / ".config" / "wandb" / "settings"
        settings.parent.mkdir(parents=True)
        settings.write_text("[default]\nbase_url = https://wandb.example.com\n")
        _netrc(home, "wandb.example.com")
    else:
        path = tmp_path / "elsewhere.netrc"
        path.write_text(f"machine api.wandb.ai login user password {FAKE_KEY}\n")
        monkeypatch.setenv("NETRC", str(path))
    assert wandb_credentials() is not None
    check_wandb_credentials()


def test_a_netrc_entry_for_another_host_is_no_key(no_wandb_key, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    _netrc(no_wandb_key, "github.com")
    assert wandb_credentials() is None
    with pytest.raises(ConfigError):
        check_wandb_credentials()


@pytest.mark.slow
def test_train_online_without_key_exits_2_before_loading_data(no_wandb_key, cache_dir, tmp_path):
    """End to end: one `error:` line naming the fix, exit 2, no traceback. The data source does not
    exist: had the data been loaded first, the error would name it instead."""
    out = str(tmp_path / "run")
    env = train_env({"WANDB_MODE": "online", "HOME": str(no_wandb_key),
                     "WANDB_CONFIG_DIR": os.environ["WANDB_CONFIG_DIR"]},
                    unset=("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "NETRC"))
    result = run_train(tiny_args(cache_dir, out, log__report_to="[wandb]", data__source=str(tmp_path / "no-such-data")),
                       env=env, timeout=SUBPROCESS_TIMEOUT)
    assert result.returncode == EXIT_CONFIG, describe(result)
    errors = error_lines(result)
    assert len(errors) == 1 and "WANDB_API_KEY" in errors[0] and "wandb login" in errors[0], describe(result)
    assert "Traceback" not in result.stderr and "no-such-data" not in result.stderr, describe(result)
    assert not os.path.exists(os.path.join(out, "wandb")), describe(result)


# ---- (b) a key, but the server unreachable: offline, same run id, exit 0 ---------------------------------------


def _offline_runs(out: str) -> list[str]:
    return sorted(glob.glob(os.path.join(out, "wandb", "offline-run-*", "run-*.wandb")))


def _checkpoint_run_id(out: str) -> str:
    newest = sorted(glob.glob(os.path.join(out, "checkpoints", "step-*", "state.json")))[-1]
    with open(newest) as f:
        return json.load(f)["wandb_run_id"]


@pytest.mark.slow
def test_unreachable_wandb_server_falls_back_offline_and_resume_keeps_the_run(no_wandb_key, cache_dir, tmp_path):
    """WANDB_MODE=online and a key, but the server's port is closed: wandb.init gives up after the
    init timeout; the run logs offline under the id the checkpoint keeps (one `wandb sync` uploads one
    run), with one warning, trains and exits 0. A resume, still offline, continues the same run id."""
    out = str(tmp_path / "run")
    env = train_env({"WANDB_MODE": "online", "WANDB_API_KEY": FAKE_KEY, "HOME": str(no_wandb_key),
                     "WANDB_BASE_URL": f"http://127.0.0.1:{free_port()}", "WANDB_INIT_TIMEOUT": "3",
                     "WANDB_CONFIG_DIR": os.environ["WANDB_CONFIG_DIR"]},
                    unset=("NETRC", "WANDB_IDENTITY_TOKEN_FILE"))
    warnings: list[str] = []
    for steps in (2, 3):
        result = run_train(tiny_args(cache_dir, out, train__max_steps=steps, log__every_steps=1,
                                     log__report_to="[wandb]", preemption__notice="off"),
                           env=env, timeout=SUBPROCESS_TIMEOUT)
        assert result.returncode == 0, describe(result)
        assert "Traceback" not in result.stderr, describe(result)
        warnings = [line for line in result.stdout.splitlines() if line.startswith("warning: W&B")]
        assert len(warnings) == 1, describe(result)
        assert all(part in warnings[0] for part in ("could not start online", "init_timeout 3 s", "`wandb sync ")), \
            warnings
    assert "resumed from" in result.stdout, describe(result)

    run_id = _checkpoint_run_id(out)
    runs = _offline_runs(out)
    assert [os.path.basename(path) for path in runs] == [f"run-{run_id}.wandb"] * 2, runs
    assert os.path.dirname(runs[-1]) in warnings[0], (warnings, runs)  # the hint names the very dir
    steps = [sorted(row["_step"] for row in wandb_history(path) if "train/loss" in row) for path in runs]
    assert steps == [[1, 2], [3]], steps
    logged = {m["step"]: m["train/loss"] for m in read_metrics(out) if "train/loss" in m}
    assert sorted(logged) == [1, 2, 3], logged


# ---- (c) a tracker that fails is dropped, once, and training's records go on -----------------------------------


class FakeTracker:
    """The part of Accelerate's GeneralTracker that RunLog uses; `fail_on` names the method that raises.
    Registered in place of a tracker class: RunLog's `cls(project, ...)` gets this very instance."""

    requires_logging_directory = False

    def __init__(self, name: str, fail_on: str = "") -> None:
        self.name, self.fail_on = name, fail_on
        self.logged: list[tuple[dict[str, float], Optional[int]]] = []
        self.finished = 0

    def __call__(self, *args: Any, **kwargs: Any) -> "FakeTracker":
        return self

    def _maybe_fail(self, method: str) -> None:
        if method == self.fail_on:
            raise ConnectionResetError(f"{self.name}: connection reset by peer\nsecond line")

    def start(self) -> None:
        self._maybe_fail("start")

    def store_init_configuration(self, values: dict[str, Any]) -> None:
        self._maybe_fail("store_init_configuration")

    def log(self, values: dict[str, float], step: Optional[int] = None) -> None:
        self._maybe_fail("log")
        self.logged.append((values, step))

    def finish(self) -> None:
        self.finished += 1

    @property
    def tracker(self) -> "FakeTracker":
        return self


def _runlog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fakes: dict[str, FakeTracker]) -> tuple[RunLog, list[str]]:
    """A RunLog whose trackers are `fakes` (by report_to name), on a stand-in main process."""
    from accelerate import tracking

    for name, fake in fakes.items():
        monkeypatch.setitem(tracking.LOGGER_TYPE_TO_CLASS, name, fake)
    said: list[str] = []
    accelerator = types.SimpleNamespace(is_main_process=True, print=said.append, end_training=lambda: None)
    cfg = Config()
    cfg.train.output_dir = str(tmp_path / "run")
    cfg.log.report_to = list(fakes)
    return RunLog(accelerator, cfg, None, None, dataset_size=64), said


def test_a_tracker_whose_log_raises_is_dropped_with_one_warning(tmp_path, monkeypatch):
    broken, healthy = FakeTracker("broken", fail_on="log"), FakeTracker("healthy")
    runlog, said = _runlog(tmp_path, monkeypatch, {"tensorboard": broken, "mlflow": healthy})
    assert runlog.trackers == [broken, healthy] and said == []
    for step in (1, 2, 3):
        runlog.log({"train/loss": 1.0 / step}, step)
    runlog.finish(preempted=False)

    assert len(said) == 1, said
    assert said[0].startswith("warning: broken dropped:") and "ConnectionResetError" in said[0], said
    assert "\n" not in said[0] and "training goes on" in said[0], said
    assert [step for _, step in healthy.logged] == [1, 2, 3]
    assert broken.logged == [] and runlog.trackers == []
    assert broken.finished == healthy.finished == 1  # the dropped one is still closed, once, quietly
    assert [m["step"] for m in read_metrics(str(tmp_path / "run"))] == [1, 2, 3]


@pytest.mark.parametrize("fail_on", ["start", "store_init_configuration"])
def test_a_tracker_that_cannot_start_is_dropped_with_one_warning(tmp_path, monkeypatch, fail_on: str):
    broken, healthy = FakeTracker("broken", fail_on=fail_on), FakeTracker("healthy")
    runlog, said = _runlog(tmp_path, monkeypatch, {"tensorboard": broken, "mlflow": healthy})
    assert runlog.trackers == [healthy]
    assert len(said) == 1 and said[0].startswith("warning: tensorboard dropped: it could not start"), said
    runlog.log({"train/loss": 0.5}, 1)
    runlog.finish(preempted=True)
    assert healthy.logged == [({"train/loss": 0.5}, 1)] and len(said) == 1, said

"""The exit-code contract mapped onto Ray (tinydist/engines/ray_train.py), without starting Ray: what a
worker raises (Ray restarts the group) or returns (it does not), what the driver makes of restarts
used up, and bad input refused in one line before Ray would start. The runs: tests/integration/test_ray.py."""

from __future__ import annotations

import pickle
import sys
import types
from typing import Any

import pytest

import tinydist.train
from tinydist.config import ConfigError
from tinydist.engines import ray_train
from tinydist.engines.ray_train import WorkerExit, failure_code, restarts, worker_loop
from tinydist.runtime.exitcodes import TransientError
from tinydist.runtime.preempt import StopFlag

from helpers.train import SMOKE, error_lines


@pytest.mark.parametrize("code, restart", [(0, False), (2, False), (75, True), (69, True), (1, True), (3, True)])
def test_which_codes_make_ray_restart_the_worker_group(code: int, restart: bool) -> None:
    assert restarts(code) is restart


def _worker(monkeypatch: pytest.MonkeyPatch, outcome: Any, driver_asked: bool = False) -> tuple[int, str]:
    """worker_loop with `train` standing in: it returns `outcome`, or raises it."""
    def train(cfg: Any, stop: Any) -> int:
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    monkeypatch.setattr(tinydist.train, "train", train)
    monkeypatch.setattr(ray_train, "_watch_channel", lambda channel, stop: (lambda: driver_asked))
    return worker_loop({"cfg": None, "stop": None})


@pytest.mark.parametrize("outcome, code", [
    (75, 75),  # saved and stopped (a notice, a signal to a worker): restart, resume from that commit
    (TransientError("storage unreachable"), 69),
    (RuntimeError("a bug"), 1),
])
def test_relaunch_codes_are_raised_so_ray_restarts(monkeypatch: pytest.MonkeyPatch, outcome: Any, code: int) -> None:
    with pytest.raises(WorkerExit) as raised:
        _worker(monkeypatch, outcome)
    assert raised.value.code == code
    if code == 69:
        assert raised.value.message == "error: storage unreachable"


def test_done_and_permanent_codes_are_returned_so_ray_does_not_restart(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _worker(monkeypatch, 0) == (0, "")
    code, message = _worker(monkeypatch, ConfigError("checkpoint of another model"))
    assert (code, message) == (2, "error: checkpoint of another model")


def test_a_stop_the_driver_asked_for_is_returned_not_restarted(monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM to the driver: the workers save and return 75; Ray must not start them again."""
    assert _worker(monkeypatch, 75, driver_asked=True) == (75, "")


class _Channel:
    """The driver's StopChannel actor as a worker sees it: `read.remote()` hands back the reason."""

    def __init__(self, reason: Any) -> None:
        self.read = type("Method", (), {"remote": staticmethod(lambda: reason)})


@pytest.mark.parametrize("reason, asked", [("SIGTERM to the Ray driver", True), (None, False)])
def test_a_stop_the_watch_had_not_seen_yet_is_read_at_the_end(monkeypatch: pytest.MonkeyPatch, reason: Any,
                                                               asked: bool) -> None:
    """A peer can stop this worker (the stop is agreed across ranks) before this worker's own poll
    reads the driver's request: the end of the watch reads the channel once more, else rank 1 would
    raise its 75 and Ray would restart a group the driver asked to stop (seen in CI)."""
    fake_ray = types.SimpleNamespace(get=lambda ref, timeout: ref,
                                     exceptions=types.SimpleNamespace(RayError=RuntimeError))
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    stop = StopFlag(log=lambda line: None, signals=False)
    end = ray_train._watch_channel(_Channel(reason), stop, poll_s=3600)  # its poll never comes
    assert end() is asked


def test_worker_exit_survives_pickling() -> None:
    again = pickle.loads(pickle.dumps(WorkerExit(69, "error: x")))
    assert (again.code, again.message) == (69, "error: x")


class _Wrapped(Exception):
    """What Ray hands back for a worker's exception: the original as `_base_exc`."""

    def __init__(self, base: BaseException) -> None:
        super().__init__(str(base))
        self._base_exc = base


class _GroupError(Exception):
    def __init__(self, failures: dict[int, BaseException]) -> None:
        super().__init__("Training failed due to worker errors")
        self.worker_failures = failures


def test_restarts_used_up_exit_with_the_workers_code() -> None:
    assert failure_code(_GroupError({0: _Wrapped(WorkerExit(75)), 1: _Wrapped(WorkerExit(75))})) == (75, "")
    assert failure_code(_GroupError({0: _Wrapped(WorkerExit(69, "error: lost")), 1: _Wrapped(WorkerExit(75))})) \
        == (69, "error: lost")
    # A worker process that died has no code of its own: transient, like a lost peer.
    code, message = failure_code(_GroupError({1: RuntimeError("The actor died unexpectedly")}))
    assert code == 69 and message.startswith("error: a Ray worker was lost: RuntimeError")


class _NoRay:
    """Stands in for the ray module: bad input must be refused before Ray starts."""

    def init(self, **kwargs: Any) -> None:
        raise AssertionError("ray.init was called although the input is bad")


@pytest.mark.parametrize("bad, says", [
    (["--optim.name=adamx"], "adamx"),
    (["--data.source=/nonexistent/tinydist-data"], "/nonexistent/tinydist-data"),
    (["--checkpoint.dir=/proc/tinydist-cannot-write"], "checkpoint.dir=/proc/tinydist-cannot-write"),
])
def test_bad_input_exits_2_in_one_line_before_ray_starts(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                                         tmp_path: Any, bad: list[str], says: str) -> None:
    monkeypatch.setattr(ray_train, "_import_ray", lambda local: _NoRay())
    argv = ["--num-workers", "2", "--config", SMOKE, f"--train.output_dir={tmp_path}",
            f"--data.cache_dir={tmp_path / 'cache'}", *bad]
    assert ray_train.main(argv) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and says in errors[0], errors


@pytest.mark.parametrize("options, says", [
    (["--num-workers", "0"], "--num-workers 0"),
    (["--num-workers", "2", "--min-workers", "3"], "--min-workers 3"),
    (["--num-workers", "two"], "invalid int value: 'two'"),
    ([], "--num-workers"),
])
def test_bad_ray_options_exit_2_in_one_line(capsys: pytest.CaptureFixture, options: list[str], says: str) -> None:
    assert ray_train.main([*options, "--config", SMOKE]) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and says in errors[0], errors


def test_without_ray_one_line_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(ray_train.importlib.util, "find_spec", lambda name, *a: None)
    assert ray_train.main(["--num-workers", "2", "--config", SMOKE]) == 2
    assert error_lines(capsys.readouterr().err) == ["error: Ray is not installed: pip install -e '.[ray]'"]


def test_help_lists_the_ray_options_and_the_config_keys(capsys: pytest.CaptureFixture) -> None:
    assert ray_train.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "--num-workers N" in text and "--min-workers" in text and "train.max_steps" in text

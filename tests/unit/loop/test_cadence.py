"""Saves by the clock: checkpoint.every_minutes (a number or Young/Daly's `auto`), agreed by all ranks."""

from __future__ import annotations

import math
import re

import pytest

from tinydist.loop import cadence
from tinydist.config.units import parse_every_minutes
from tinydist.loop.cadence import SaveClock, young_daly_minutes
from tinydist.config import ConfigError, load_config
from helpers.train import describe, run_train, tiny_args


def test_young_daly_interval():
    # sqrt(2 x 30 s x 3600 s) = 464.8 s = 7.75 min
    assert young_daly_minutes(30.0, 60.0) == pytest.approx(math.sqrt(2 * 30 * 3600) / 60)
    assert young_daly_minutes(120.0, 60.0) == pytest.approx(2 * young_daly_minutes(30.0, 60.0))  # sqrt scaling
    assert young_daly_minutes(0.001, 60.0) == cadence.MIN_AUTO_MINUTES  # a fast copy does not mean saving every second


def test_parse_every_minutes_and_config():
    assert parse_every_minutes("off") is None and parse_every_minutes("0") is None
    assert parse_every_minutes("15") == 15.0 and math.isnan(parse_every_minutes("auto"))
    assert load_config(["--checkpoint.every_minutes=2.5"]).checkpoint.every_minutes == "2.5"
    for bad in ("-3", "soon", "inf"):
        with pytest.raises(ConfigError, match="checkpoint.every_minutes"):
            load_config([f"--checkpoint.every_minutes={bad}"])


def test_clock_is_due_after_the_interval_and_restarts_at_each_save(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(cadence.time, "monotonic", lambda: now[0])
    logs: list[str] = []
    clock = SaveClock("2", 60.0, logs.append)
    clock.start(0.0)
    assert not clock.due()
    now[0] += 119.0
    assert not clock.due()
    now[0] += 1.0
    assert clock.due()
    clock.saved(0.01)  # any save restarts the clock, whatever triggered it
    assert not clock.due()
    assert logs == ["checkpoint: saving every 2 min by the clock (and every_steps, epoch ends)"]


def test_auto_clock_learns_the_measured_cost(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(cadence.time, "monotonic", lambda: now[0])
    logs: list[str] = []
    clock = SaveClock("auto", 60.0, logs.append)
    clock.start(estimated_cost_s=30.0)
    assert clock.minutes == pytest.approx(young_daly_minutes(30.0, 60.0))
    assert "estimated at start" in logs[0] and "mtbf 60 min" in logs[0]
    clock.saved(blocked_s=90.0)  # saves are dearer than estimated: save less often
    assert clock.minutes == pytest.approx(young_daly_minutes(60.0, 60.0))
    assert "measured" in logs[-1]


def test_from_config_reads_the_checkpoint_section():
    logs: list[str] = []
    clock = SaveClock.from_config(load_config(["--checkpoint.every_minutes=auto", "--checkpoint.mtbf_minutes=30"]),
                                  logs.append)
    assert clock.auto and clock.mtbf_minutes == 30.0 and clock.log == logs.append
    assert SaveClock.from_config(load_config([])).minutes is None  # off by default


@pytest.mark.slow
def test_a_run_saves_by_the_clock(tmp_path, cache_dir):
    out = tmp_path / "out"
    result = run_train(tiny_args(cache_dir, str(out), train__max_steps=30, checkpoint__every_steps=0,
                                 checkpoint__every_minutes=0.005, checkpoint__keep_last=100, data__max_train_samples=1024))
    assert result.returncode == 0, describe(result)
    steps = [int(s) for s in re.findall(r"step-(\d+) committed", result.stdout)]
    # 16 steps per epoch: epoch ends at 16 and the final step 30; everything else came from the clock.
    by_clock = [s for s in steps if s not in (16, 30)]
    assert by_clock, describe(result)
    assert "saving every 0.005 min by the clock" in result.stdout


@pytest.mark.slow
def test_auto_cadence_is_logged_at_start(tmp_path, cache_dir):
    result = run_train(tiny_args(cache_dir, str(tmp_path / "out"), train__max_steps=2,
                                 checkpoint__every_minutes="auto", checkpoint__mtbf_minutes=30))
    assert result.returncode == 0, describe(result)
    line = next(l for l in result.stdout.splitlines() if l.startswith("checkpoint.every_minutes=auto"))
    assert "estimated at start" in line and "mtbf 30 min" in line

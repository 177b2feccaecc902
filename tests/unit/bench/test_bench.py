"""python -m tinydist.bench: the verdict part of a figure line, the command's figures, and `all --quick` end to
end (every figure runs at tiny sizes and prints its line; the numbers it measured parse, the ratios are not shown)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from tinydist.bench import suite as bench
from tinydist.bench.common import verdict
from helpers.train import PYTHON, describe, run, train_env

QUICK = "not shown (quick sizes: ratios mean nothing)"
NUMBER = r"(-?\d+(?:\.\d+)?)"
# Each figure's line at --quick sizes, up to its bracketed details: the two measurements it compares.
QUICK_LINES = {
    "data": rf"data: tinydist {NUMBER} img/s vs per-image PIL pipeline {NUMBER} img/s -> ratio {re.escape(QUICK)} \[",
    "step": rf"step: tinydist loop {NUMBER} s/step vs bare PyTorch loop {NUMBER} s/step -> overhead {re.escape(QUICK)} \[",
    "checkpoint": rf"checkpoint: extra loop time per save {NUMBER} s vs torch.save {NUMBER} s -> ratio {re.escape(QUICK)} \[",
    "resume": (rf"resume: spawn to exit at 99% of an epoch \(step \d+, epoch {NUMBER}\) {NUMBER} s vs at an epoch start "
               rf"\(step \d+, epoch {NUMBER}\) {NUMBER} s -> ratio {re.escape(QUICK)} \["),
    "checkpoint every step": (rf"checkpoint every step: \d+ steps with a local-tier save after each {NUMBER} s vs no "
                              rf"saves {NUMBER} s -> overhead {re.escape(QUICK)} \["),
    "resume after a crash": (rf"resume after a crash: spawn to the first step done, from the local tier {NUMBER} s vs "
                             rf"from the durable tier {NUMBER} s -> ratio {re.escape(QUICK)} \["),
}


def test_verdict_keeps_the_full_line_and_drops_ratios_when_quick() -> None:
    assert verdict(False, "ratio", "4.8x", ">= 5") == "-> ratio 4.8x (goal >= 5)"
    assert verdict(False, "overhead", "+7.2%", "<= 3%") == "-> overhead +7.2% (goal <= 3%)"
    quick = verdict(True, "overhead", "-138.7%", "<= 3%")
    assert quick == f"-> overhead {QUICK}"
    assert not any(c.isdigit() for c in quick) and "goal" not in quick


def test_figures_cover_every_name_the_cli_offers(capsys: pytest.CaptureFixture[str]) -> None:
    assert set(bench.FIGURES) == {"data", "step", "checkpoint", "resume", "gpu"}
    assert bench.main(["nonsense"]) == 2  # argparse's usage error, returned through cli.run
    assert "invalid choice: 'nonsense'" in capsys.readouterr().err


@pytest.mark.slow  # every figure at tiny sizes, two training processes included: minutes on 2 busy cores
def test_all_quick_prints_every_figure_with_numbers_that_parse(tmp_path) -> None:
    result = run([PYTHON, "-m", "tinydist.bench", "all", "--quick"], env=train_env({"TMPDIR": str(tmp_path)}),
                 timeout=600, cwd=tmp_path)
    assert result.returncode == 0, describe(result)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("bench: machine ") and "quick sizes" in lines[0], describe(result)
    for name, pattern in QUICK_LINES.items():
        found = [m for m in (re.match(pattern, line) for line in lines) if m]
        assert len(found) == 1, f"no single `{name}:` line of the expected form: {describe(result)}"
        values = [float(v) for v in found[0].groups()]
        assert all(math.isfinite(v) for v in values), (name, values)
        # Differences of two timings (the save's extra loop time; tinydist's per-step time, T(long) - T(short)
        # runs of train()) are noise at quick sizes and can come out negative; every other figure is a time.
        if name not in ("checkpoint", "step"):
            assert all(v > 0 for v in values), (name, values)
        elif name == "step":
            assert values[1] > 0, (name, values)  # the bare loop's time per step is measured directly
    gpu = [line for line in lines if line.startswith("gpu: ")]
    assert len(gpu) == 1, describe(result)
    if not torch.cuda.is_available():
        assert gpu[0].startswith("gpu: skipped: no CUDA device"), gpu[0]
    assert "goal" not in result.stdout and "Traceback" not in result.stderr, describe(result)

"""A resume with a changed config: what can change mid-run is applied from the resume step on and said;
what cannot is refused in one line with a way forward that works (and is tested to work)."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from helpers.train import describe, read_metrics, run_train, tiny_args

pytestmark = pytest.mark.slow  # every test here trains and resumes in subprocesses


def test_changed_learning_rate_applies_from_the_resume_step(tmp_path, cache_dir):
    out = tmp_path / "run"
    first = run_train(tiny_args(cache_dir, str(out), train__max_steps=4, log__every_steps=1))
    assert first.returncode == 0, describe(first)
    old_lr = [r["train/lr"] for r in read_metrics(str(out)) if "train/lr" in r]
    second = run_train(tiny_args(cache_dir, str(out), train__max_steps=6, log__every_steps=1, optim__lr=0.5))
    assert second.returncode == 0, describe(second)
    assert "config changed since that checkpoint, in effect from step 4: optim.lr: 0.05 -> 0.5" in second.stdout
    rates = {r["step"]: r["train/lr"] for r in read_metrics(str(out)) if "train/lr" in r}
    assert rates[4] == old_lr[3] and 0.4 < rates[5] <= 0.5 and 0.4 < rates[6] < rates[5]  # 10x the old schedule
    # What the run records is what is in effect.
    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["lr"] == 0.5
    state = json.loads((out / "checkpoints" / "step-00000006" / "state.json").read_text())
    assert state["config"]["optim"]["lr"] == 0.5
    assert {g["lr"] for g in state["optimizer"]["param_groups"]} == {rates[6]}


def test_changed_global_batch_is_refused_with_a_way_forward_that_works(tmp_path, cache_dir):
    out = tmp_path / "run"
    assert run_train(tiny_args(cache_dir, str(out), train__max_steps=2)).returncode == 0
    refused = run_train(tiny_args(cache_dir, str(out), train__max_steps=4, train__global_batch_size=128))
    assert refused.returncode == 2, describe(refused)
    (line,) = [l for l in refused.stderr.splitlines() if l.startswith("error:")]
    assert "train.global_batch_size=128" in line and "train.global_batch_size=64" in line
    keep = re.search(r"pass (--train\.global_batch_size=\S+) to continue", line).group(1)
    branch = re.search(r"\(e\.g\. (--checkpoint\.dir=\S+)\)", line).group(1)
    # Both ways forward work as written.
    kept = run_train(tiny_args(cache_dir, str(out), train__max_steps=4) + [keep])
    assert kept.returncode == 0 and "resumed from" in kept.stdout, describe(kept)
    branched = run_train(tiny_args(cache_dir, str(tmp_path / "new"), train__max_steps=2, train__global_batch_size=128)
                         + [branch])
    assert branched.returncode == 0, describe(branched)


def test_resume_never_over_checkpoints_names_a_way_forward_that_works(tmp_path, cache_dir):
    out = tmp_path / "run"
    assert run_train(tiny_args(cache_dir, str(out), train__max_steps=2)).returncode == 0
    refused = run_train(tiny_args(cache_dir, str(out), train__max_steps=2, checkpoint__resume="never"))
    assert refused.returncode == 2, describe(refused)
    (line,) = [l for l in refused.stderr.splitlines() if l.startswith("error:")]
    branch = re.search(r"\(e\.g\. (--checkpoint\.dir=\S+)\)", line).group(1)
    fresh = run_train(tiny_args(cache_dir, str(out), train__max_steps=2, checkpoint__resume="never") + [branch])
    assert fresh.returncode == 0 and "resumed from" not in fresh.stdout, describe(fresh)

"""One run carried through every launcher and process count in turn, and still one run.

    leg 1  python -m tinydist.train                                       1 process    step 1
    leg 2  python -m tinydist.launch --torchrun (elastic, c10d)           2 processes  step 2
    leg 3  python -m tinydist.ray --num-workers 4 (Ray Train)             4 processes  step 3
    leg 4  launch/spot_relaunch.sh (TRAIN_CMD: python -m tinydist.train)  1 process    step 4

Each leg stops at its step with --train.max_steps (a finished run, exported; the next leg's larger
max_steps resumes it: the schedule's length comes from train.epochs, not from max_steps). The run
that never moved (1 process, 4 steps) is the yardstick:
- weights and BN buffers within 1% of its last step's length of it at the end (the process count
  changed, so float rounding differs), and bitwise equal at leg 1's commit, where it had not changed yet;
- every commit's state.json counts samples = step x global batch;
- one W&B run id (offline) in every leg and every checkpoint; metrics.jsonl one curve, steps 1..4 once each.

One step per leg, because this little network is chaotic early in training (16x16 digits, BN over
micro-batches of 8, the ImageNet stem): a difference of one float rounding, which any change of the
process count makes (another summation order), grows about 30-fold per step (measured: 1e-7 after
the torchrun leg, 4e-5 one step later, 1e-3 the next). Four legs of one step keep what is compared
to rounding; the mechanics (checkpoints written by one launcher and process count, read by another)
are the same for one step as for many.

Global batch 32 = micro 8 x processes x accumulation (4, 2, 1, 4). PreciseBN is off: the legs validate
at their last steps (1, 2, 3), the yardstick does not, and PreciseBN would rewrite the running statistics
there. Budget: about 2.5 minutes on an idle 2-core machine, most of it the Ray leg (4 workers) and
process start-up.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import pytest
import torch

from helpers.faultinject import free_port
from helpers.ray_procs import left_running, new_mark, ray_available, ray_command, ray_env, stop_marked
from helpers.train import PYTHON, REPO, describe, read_metrics, run, run_train, tiny_args, train_env
from tinydist.export.writer import load_model_weights

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not ray_available(), reason="ray is not installed (pip install -e '.[ray]')")]

GLOBAL, EVERY, LAST = 32, 1, 4
TIMEOUT_S = 300


def args(cache_dir: str, out: Path, max_steps: int) -> list[str]:
    return tiny_args(cache_dir, str(out), train__max_steps=max_steps, train__global_batch_size=GLOBAL,
                     train__micro_batch_size=8, train__seed=5, checkpoint__every_steps=EVERY, checkpoint__keep_last=4,
                     log__every_steps=1, log__report_to="[wandb]", ema__enabled="false", eval__precise_bn_images=0,
                     preemption__notice="off")


def step_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:08d}"


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_model_weights(str(folder))[0]


def states(out: Path) -> list[dict]:
    return [json.loads(Path(p).read_text()) for p in sorted(glob.glob(str(out / "checkpoints" / "step-*" / "state.json")))]


@pytest.fixture(scope="module")
def reference(cache_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("never-moved")
    result = run_train(args(cache_dir, out, LAST), timeout=TIMEOUT_S)
    assert result.returncode == 0, describe(result)
    return out


def test_one_run_through_every_launcher_and_process_count(reference: Path, cache_dir: str, tmp_path: Path) -> None:
    out = tmp_path / "moved"
    env = train_env()

    leg = run_train(args(cache_dir, out, 1), env=env, timeout=TIMEOUT_S)
    assert leg.returncode == 0 and "tinydist: 1 process(es)" in leg.stdout, describe(leg)

    torchrun = [PYTHON, "-m", "tinydist.launch", "--torchrun", "--nnodes", "1:1", "--nproc-per-node", "2",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "matrix",
                "--max-restarts", "0", "tinydist/train.py", *args(cache_dir, out, 2)]
    leg = run(torchrun, env=env, timeout=TIMEOUT_S)
    assert leg.returncode == 0 and "tinydist: 2 process(es)" in leg.stdout, describe(leg)
    assert "resumed from" in leg.stdout, describe(leg)

    mark = new_mark()
    try:
        leg = run(ray_command(args(cache_dir, out, 3), 4), env=ray_env(mark), timeout=TIMEOUT_S)
        left = left_running(mark)
    finally:
        stop_marked(mark)
    assert leg.returncode == 0, describe(leg)
    assert "tinydist.ray: 4 worker(s), process group at 127.0.0.1:" in leg.stdout, describe(leg)
    assert "global batch 32 = 8 x 4 processes x 1 accumulation" in leg.stdout, describe(leg)
    assert not left, f"the Ray driver left processes running: {left}"

    spot = {"CHECKPOINT_DIR": str(out / "checkpoints"), "TRAIN_CMD": f"{PYTHON} -m tinydist.train",
            "MAX_ATTEMPTS": "1"}
    leg = run([str(REPO / "launch" / "spot_relaunch.sh"), *args(cache_dir, out, LAST)], env=train_env(spot),
              timeout=TIMEOUT_S)
    assert leg.returncode == 0 and "spot_relaunch: launch 1/1" in leg.stderr, describe(leg)
    assert "global batch 32 = 8 x 1 processes x 4 accumulation" in leg.stdout, describe(leg)

    # Bitwise where the process count had not changed yet; at the end, after 1 -> 2 -> 4 -> 1, close to the
    # run that never moved, measured against the size of its last step. A process-count change reorders
    # float sums and this little network amplifies that ~30-fold a step (the largest |difference| at steps
    # 2, 3, 4: 1.5e-8, 1e-6, 6e-4 with the packages of 2026-12-04; 1e-5 at step 4 with those of 12-03), so an
    # absolute tolerance is a bet on the rounding. A resume fault (a lost momentum buffer, a wrong rate or
    # batch, a step repeated or skipped) changes a step by a good part of itself; rounding moved the last one
    # by 0.07% of its length (L2 over every weight and buffer).
    early, want_early = weights(step_dir(out, 1)), weights(step_dir(reference, 1))
    assert sorted(early) == sorted(want_early)
    assert all(torch.equal(early[k], want_early[k]) for k in want_early), "leg 1 is not the reference, bit for bit"
    got, want = weights(out / "model"), weights(reference / "model")
    before_last = weights(step_dir(reference, LAST - 1))
    assert sorted(got) == sorted(want) == sorted(before_last)

    def flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[k].double().flatten() for k in sorted(tensors)])

    gap, last_step = (flat(got) - flat(want)).norm().item(), (flat(want) - flat(before_last)).norm().item()
    worst = max((got[k].double() - want[k].double()).abs().max().item() for k in want)
    print(f"after 1 -> 2 -> 4 -> 1 processes: |weights - never moved| = {gap:.3g} = {gap / last_step:.2%} of the "
          f"last step's {last_step:.3g} (max per element {worst:.3g})")  # -s shows it
    assert last_step > 0, "the last leg trained nothing"
    assert gap <= 0.01 * last_step, (f"after 1 -> 2 -> 4 -> 1 processes the weights are {gap:.3g} from the run that "
                                     f"never moved: {gap / last_step:.2%} of its last step ({last_step:.3g})")
    assert any(not torch.equal(got[k], early[k]) for k in got), "the legs after the first trained nothing"

    # The position is one integer: samples = step x global batch in every commit; one W&B run throughout.
    recorded = states(out)
    assert [s["step"] for s in recorded] == [1, 2, 3, 4]
    assert all(s["samples"] == s["step"] * GLOBAL for s in recorded), [(s["step"], s["samples"]) for s in recorded]
    run_ids = {s.get("wandb_run_id") for s in recorded}
    assert len(run_ids) == 1 and None not in run_ids, run_ids
    (run_id,) = run_ids
    offline = sorted(os.path.basename(p) for p in glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert offline == [f"run-{run_id}.wandb"] * 4, offline

    # One continuous curve: each step once, in order, whichever leg logged it.
    metrics = read_metrics(str(out))
    assert [m["step"] for m in metrics if "train/loss" in m] == list(range(1, LAST + 1))
    assert [m["step"] for m in metrics if m.get("event") == "resumed"] == [1, 2, 3]

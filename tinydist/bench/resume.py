"""`bench resume`: a resume costs the same wherever in an epoch it lands (the sampler seeks in O(1)).
Process start to exit of a one-step run, resumed at 99% of an epoch vs at an epoch's start."""

from __future__ import annotations

import math
import shutil
import statistics
import subprocess
import sys
import time

import torch

from tinydist import config as config_lib
from tinydist.bench.common import create_momentum, digits_args, interleaved, quiet, subprocess_env, verdict
from tinydist.ckpt.checkpointer import Checkpointer
from tinydist.data.cache import load_split
from tinydist.data.sampler import GlobalSampler
from tinydist.model.build import build_model
from tinydist.model.optim import build_optimizer


def bench_resume(tmp: str, quick: bool, device: torch.device) -> None:
    """Process start to first step (spawn to exit of a 1-step run), resuming at 99% of an epoch vs at its start."""
    args = digits_args(tmp, 16, 8, 8) + ["--checkpoint.resume=auto"]
    cfg = config_lib.load_config(args)
    with quiet():  # both caches now, so no timed run builds them
        data = load_split(cfg.data, cfg.data.train_split, cfg.data.max_train_samples, log=print)
        load_split(cfg.data, cfg.data.val_split, cfg.data.max_val_samples, log=print)
    sampler = GlobalSampler(len(data), cfg.train.global_batch_size, cfg.train.micro_batch_size, 1, 0, cfg.train.seed)
    per_epoch = sampler.steps_per_epoch
    # Step s+1 of either run must not end an epoch (true with >= 100 steps per epoch), or that run alone
    # would pay an extra eval + save.
    assert per_epoch >= 100, f"digits at global batch {cfg.train.global_batch_size}: {per_epoch:.1f} steps per epoch"
    start, late = math.ceil(per_epoch), math.floor((2 + 0.99) * per_epoch)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, len(data.classes))
    optimizer = build_optimizer(cfg.optim, model)
    create_momentum(model, optimizer)
    for step in (start, late):
        # The meta loop/run.py's save() writes (the learning rate is a function of the step: nothing to save).
        meta = {"epoch": sampler.epoch_at(step), "samples": step * cfg.train.global_batch_size,
                "global_batch_size": cfg.train.global_batch_size, "device": "cpu",
                "config": config_lib.to_dict(cfg), "wandb_run_id": None}
        Checkpointer(f"{tmp}/resume-source-{step}", keep_last=2, max_shard_size=cfg.checkpoint.max_shard_size,
                     log=lambda _: None).save(step, model, optimizer, meta, blocking=True)
    env, runs = subprocess_env(), iter(range(10**6))

    def launch(step: int) -> float:
        run_dir = f"{tmp}/resume-run-{next(runs)}"
        shutil.copytree(f"{tmp}/resume-source-{step}", f"{run_dir}/checkpoints")  # holds only that checkpoint
        cmd = [sys.executable, "-m", "tinydist.train", *args, f"--checkpoint.dir={run_dir}/checkpoints",
               f"--train.max_steps={step + 1}", f"--train.output_dir={run_dir}"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
        elapsed, output = time.perf_counter() - t0, proc.stdout + proc.stderr
        if proc.returncode != 0 or "resumed from" not in output or f"at step {step} " not in output:
            raise RuntimeError(f"resume bench: `{' '.join(cmd)}` exited {proc.returncode} without resuming from step "
                               f"{step}; its output ends:\n{output[-3000:]}")
        shutil.rmtree(run_dir)
        return elapsed

    repeats = 1 if quick else 5
    if not quick:
        launch(start)  # warm-up: the first interpreter start reads every import from disk
    results = interleaved([lambda: launch(start), lambda: launch(late)], repeats)
    (t_start, t_late), repeats = map(statistics.median, results), len(results[0])
    ratio = verdict(quick, "ratio", f"{t_late / t_start:.3f}", "<= 1.1")
    print(f"resume: spawn to exit at 99% of an epoch (step {late}, epoch {sampler.epoch_at(late):.3f}) {t_late:.2f} s "
          f"vs at an epoch start (step {start}, epoch {sampler.epoch_at(start):.3f}) {t_start:.2f} s "
          f"{ratio} [python -m tinydist.train: start-up, resume, 1 step, eval of "
          f"{cfg.data.max_val_samples} images, save, export; {per_epoch:.1f} steps per epoch; median of {repeats}]")

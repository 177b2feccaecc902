"""`bench resume`: a resume costs the same wherever in an epoch it lands (the sampler seeks in O(1)):
process start to exit of a one-step run, resumed at 99% of an epoch vs at an epoch's start. And after a
crash: spawn to the first step done, from the local tier vs from the durable tier."""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from tinydist import config as config_lib
from tinydist.bench.common import create_momentum, digits_args, interleaved, quiet, subprocess_env, verdict
from tinydist.ckpt.checkpointer import Checkpointer
from tinydist.ckpt.local import PROGRESS, LocalTier, run_identity
from tinydist.ckpt.storage import Storage
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
        # The meta loop/saving.py's save() writes (the learning rate is a function of the step: nothing to save).
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
    if os.path.isdir("/dev/shm"):
        bench_resume_tiers(tmp, quick, args, cfg, model, optimizer, late, sampler.epoch_at(late))


def bench_resume_tiers(tmp: str, quick: bool, args: list[str], cfg: config_lib.Config, model: torch.nn.Module,
                       optimizer: torch.optim.Optimizer, step: int, epoch: float) -> None:
    """A crash with no warning, then the relaunch: spawn to the first step done, resuming from this machine's
    local tier (/dev/shm) vs from the durable tier (a new machine: its local tier is empty)."""
    durable_source = f"{tmp}/tiers-durable"
    run_id = run_identity(Storage(durable_source), fresh=True)
    meta = {"epoch": epoch, "samples": step * cfg.train.global_batch_size, "run_id": run_id,
            "global_batch_size": cfg.train.global_batch_size, "device": "cpu", "config": config_lib.to_dict(cfg)}
    sets = {"model": model, "optimizer": optimizer}
    Checkpointer(durable_source, keep_last=2, log=lambda _: None).save(step, sets=sets, state=meta, blocking=True)
    env, runs = subprocess_env(), iter(range(10**6))

    def launch(local_tier: bool) -> float:
        name = next(runs)
        run_dir, shm = f"{tmp}/tiers-run-{name}", tempfile.mkdtemp(prefix="tinydist-bench-resume-", dir="/dev/shm")
        shutil.copytree(durable_source, f"{run_dir}/checkpoints")
        if local_tier:  # what this machine's local tier held when the process died: the same step
            local = LocalTier(shm, run_id, 1, writer=True, max_shard_size=cfg.checkpoint.max_shard_size, log=print)
            local.save(step, sets, meta)
            local.close()
        cmd = [sys.executable, "-m", "tinydist.train", *args, f"--checkpoint.dir={run_dir}/checkpoints",
               f"--train.max_steps={step + 5}", f"--train.output_dir={run_dir}", f"--checkpoint.local_dir={shm}"]
        progress = f"{shm}/{run_id}/{PROGRESS}"
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp)
        try:
            while proc.poll() is None and time.perf_counter() - t0 < 300 and not _done(progress, step + 1):
                time.sleep(0.005)
            elapsed = time.perf_counter() - t0
        finally:
            proc.kill()  # the next crash: what the run would do after its first step is not timed
            output = proc.communicate()[0]
        tier = "local" if local_tier else "durable"
        if not _done(progress, step + 1) or f"from the {tier} tier" not in output:
            raise RuntimeError(f"resume bench: `{' '.join(cmd)}` did not resume from the {tier} tier at step {step} "
                               f"and take a step; its output ends:\n{output[-3000:]}")
        shutil.rmtree(run_dir)
        shutil.rmtree(shm)
        return elapsed

    repeats = 1 if quick else 5
    results = interleaved([lambda: launch(True), lambda: launch(False)], repeats)
    (t_local, t_durable), repeats = map(statistics.median, results), len(results[0])
    ratio = verdict(quick, "ratio", f"{t_local / t_durable:.3f}", "<= 1")
    print(f"resume after a crash: spawn to the first step done, from the local tier {t_local:.2f} s vs from the "
          f"durable tier {t_durable:.2f} s {ratio} [python -m tinydist.train, checkpoint of step {step} "
          f"(resnet18, model + SGD momentum); the durable tier is a folder on this machine's disk here (a bucket "
          f"is slower), the local tier /dev/shm; besides this, the durable tier redoes the steps since its last "
          f"save (checkpoint.every_steps / every_minutes), the local tier at most one; median of {repeats}]")


def _done(progress: str, step: int) -> bool:
    try:
        with open(progress) as f:
            return json.load(f).get("step", -1) >= step
    except (OSError, ValueError):
        return False

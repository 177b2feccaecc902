"""`bench step`: what tinydist's loop costs per step. `train()` itself, in this process (so every step is
`train_step` with the stop-flag agreement, triggers and logging around it), against a bare PyTorch loop
on pre-normalised tensors: same model, micro batch, accumulation and device."""

from __future__ import annotations

import math
import shutil
import statistics

import torch

from tinydist import config as config_lib
from tinydist.bench.common import digits_args, interleaved, quiet, timed, verdict
from tinydist.bench.floor import BareSteps
from tinydist.data.cache import load_split
from tinydist.data.sampler import GlobalSampler
from tinydist.train import train


def bench_step(tmp: str, quick: bool, device: torch.device) -> None:
    """tinydist's per-step time = (T(train `long` steps) - T(train `short` steps)) / (long - short), so
    start-up, the final eval and the export cancel out; vs the bare loop's per-step time."""
    args = digits_args(tmp, 32, 32, 64) + ["--checkpoint.resume=never"]
    cfg = config_lib.load_config(args)
    with quiet():  # build the decoded caches now, outside every timing
        data = load_split(cfg.data, cfg.data.train_split, cfg.data.max_train_samples, log=print)
        load_split(cfg.data, cfg.data.val_split, cfg.data.max_val_samples, log=print)
    # Both runs stop before the first epoch end: it would add an eval and a save to the longer run only.
    before_epoch_end = math.ceil(len(data) / cfg.train.global_batch_size) - 1
    short, long, pairs = (1, min(3, before_epoch_end), 1) if quick else (3, before_epoch_end, 5)
    steps, runs = long - short, iter(range(10**6))

    def run_train(max_steps: int) -> None:
        out_dir = f"{tmp}/step-run-{next(runs)}"  # resume=never refuses a folder holding checkpoints
        run_cfg = config_lib.load_config(args + [f"--train.max_steps={max_steps}", f"--train.output_dir={out_dir}"])
        with quiet():
            code = train(run_cfg)
        if code != 0:
            raise RuntimeError(f"train() with max_steps={max_steps} returned exit code {code}")
        shutil.rmtree(out_dir)

    # The floor's bare loop (bench/floor.py): the same model (as the runs' schedule resolves it), optimizer,
    # batch shapes and device, nothing else.
    schedule = math.ceil(cfg.train.epochs * GlobalSampler.from_config(cfg, len(data), 1, 0).steps_per_epoch)
    bare = BareSteps(cfg, len(data.classes), device, total_steps=schedule)
    micro, side, accumulation = cfg.train.micro_batch_size, cfg.data.image_size, bare.accumulation

    run_train(short)  # warm-up: the first Accelerator, lazy imports, allocator
    bare.steps(3)
    fns = [lambda: timed(lambda: run_train(long)), lambda: timed(lambda: run_train(short)),
           lambda: timed(lambda: bare.steps(steps))]
    results = interleaved(fns, pairs)
    (t_long, t_short, t_bare), pairs = map(statistics.median, results), len(results[0])
    ours, base = (t_long - t_short) / steps, t_bare / steps
    overhead = verdict(quick, "overhead", f"{100 * (ours / base - 1):+.1f}%", "<= 3%")
    print(f"step: tinydist loop {ours:.4f} s/step vs bare PyTorch loop {base:.4f} s/step "
          f"{overhead} [micro {micro} x accumulation {accumulation}, {side}px, "
          f"{cfg.model.stem} stem, {device.type}; ours = (T(train {long} steps) - T(train {short} steps)) / {steps}, "
          f"median of {pairs} each]")

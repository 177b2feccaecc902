"""Where the recipe defaults come from: one training run (train_step, as train.py runs it) that keeps an
EMA per candidate `ema.half_life` beside the weights, then scores each set of weights with PreciseBN at
each candidate `eval.precise_bn_images` (0 = the running statistics), with and without flip TTA, and
times each PreciseBN. One trajectory for every candidate: the differences are the tools', not the seeds'.

    python -m tinydist.bench.sweep [--seeds 0 1 2] [--half-lives 0.02 0.05 0.1 0.2 0.3]
                                   [--precise 0 256 1024 4096] [--config FILE] [--section.key=VALUE ...]

Prints one line per (weights, PreciseBN size): top-1 (and flip-TTA top-1) per seed, their mean, and the
mean seconds PreciseBN took.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from typing import Optional, Sequence

import numpy as np
import torch

from tinydist import config as config_lib
from tinydist.bench.common import SMOKE_RECIPE, machine_threads
from tinydist.data.cache import load_train_val
from tinydist.loop.accel import make_accelerator
from tinydist.loop.evaluate import evaluate
from tinydist.loop.run import build_run
from tinydist.model.ema import ModelEma
from tinydist.model.precise_bn import recompute_bn_statistics
from tinydist.train import train_step


def sweep_seed(cfg: config_lib.Config, seed: int, half_lives: Sequence[float],
               precise: Sequence[int]) -> dict[tuple[str, int], tuple[float, float, float]]:
    """{(weights, precise_bn_images): (top-1, flip top-1, PreciseBN seconds)} after one run of `seed`."""
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed),
                              ema=dataclasses.replace(cfg.ema, enabled=False))
    accelerator = make_accelerator(cfg)
    run = build_run(cfg, accelerator, *load_train_val(cfg.data, log=lambda _: None))
    emas = {f"ema h={h:g}": ModelEma(run.bare_model, dataclasses.replace(cfg.ema, decay=None, half_life=h),
                                     run.total_steps) for h in half_lives}
    run.start_loop()
    try:
        while run.step < run.last_step:
            step = run.step
            train_step(run)
            for ema in emas.values():
                ema.update(step)
    finally:
        run.close()
    out: dict[tuple[str, int], tuple[float, float, float]] = {}
    candidates = {"raw": run.bare_model, **{name: ema.module for name, ema in emas.items()}}
    for name, module in candidates.items():
        if module is not run.bare_model:
            for mine, theirs in zip(module.buffers(), run.bare_model.buffers()):
                mine.copy_(theirs)
        running = copy.deepcopy(module.state_dict())
        for images in precise:
            module.load_state_dict(running)
            began = time.perf_counter()
            if images:
                recompute_bn_statistics(module, run.train_data, images, seed, run.device,
                                        channels_last=cfg.model.channels_last)
            spent = time.perf_counter() - began
            m = evaluate(module, run.val_data, cfg.train.eval_batch_size, run.device,
                         channels_last=cfg.model.channels_last, flip=True)
            out[(name, images)] = (m["val/top1"], m["val/top1_flip"], spent)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tinydist.bench.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--half-lives", nargs="+", type=float, default=[0.02, 0.05, 0.1, 0.2, 0.3])
    parser.add_argument("--precise", nargs="+", type=int, default=[0, 256, 1024, 4096])
    parser.add_argument("--epochs", type=float, default=3.0)
    opts, overrides = parser.parse_known_args(argv)
    recipe = [] if any(a == "--config" or a.startswith("--config=") for a in overrides) else ["--config", SMOKE_RECIPE]
    cfg = config_lib.load_config(recipe + [f"--train.epochs={opts.epochs}", "--log.report_to=[]"] + overrides)
    torch.set_num_threads(machine_threads())
    print(f"sweep: {cfg.data.source} at {cfg.data.image_size}px, {cfg.train.epochs:g} epochs, seeds {opts.seeds}, "
          f"half-lives {opts.half_lives}, PreciseBN sizes {opts.precise}", flush=True)
    per_seed = [sweep_seed(cfg, seed, opts.half_lives, opts.precise) for seed in opts.seeds]
    for key in per_seed[0]:
        top1 = [100 * r[key][0] for r in per_seed]
        flip = [100 * r[key][1] for r in per_seed]
        spent = float(np.mean([r[key][2] for r in per_seed]))
        print(f"  {key[0]:<10} precise_bn {key[1]:>5}: top-1 {' '.join(f'{a:6.2f}' for a in top1)} mean "
              f"{np.mean(top1):6.2f}; flip TTA mean {np.mean(flip):6.2f}; PreciseBN {spent:.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

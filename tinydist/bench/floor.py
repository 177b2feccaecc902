"""The physical limit of a run's wall time on this machine, for `bench quality`: a bare loop over the
same number of optimizer steps on pre-made tensors: the same model, optimizer, schedule, micro-batch
shapes, accumulation, loss and threads, and nothing else (no data work, no validation, no saves, no
EMA). What a run spends beyond it is its overhead: `bench quality` prints the ratio and the phases.

The machine's speed drifts by a quarter within minutes (a shared 2-core VM), so a run and the bare loop
timed a minute apart can differ by more than the 8% being judged. `interleaved_step_ratios` cancels the
drift for the steps themselves: `train_step` and the bare step alternate in short chunks in one process."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from tinydist import config as config_lib
from tinydist.model.build import build_model
from tinydist.model.optim import build_optimizer, lr_at, set_lr


class BareSteps:
    """The bare loop, resumable: `steps(k)` runs the next k optimizer steps and returns their seconds."""

    def __init__(self, cfg: config_lib.Config, num_classes: int, device: torch.device, total_steps: int,
                 warmup_steps: int = 0) -> None:
        torch.manual_seed(cfg.train.seed)
        memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
        # The run's model as build_run resolves it for this schedule (the identity start from 150 steps).
        model_cfg = dataclasses.replace(cfg.model, zero_init_residual=config_lib.zero_init_residual(cfg.model, total_steps))
        self.model = build_model(model_cfg, num_classes).to(device, memory_format=memory_format).train()
        self.optimizer = build_optimizer(cfg.optim, self.model)
        micro, side = cfg.train.micro_batch_size, cfg.data.image_size
        self.accumulation = cfg.train.global_batch_size // micro
        # Fixed, normalised, on the device, in the loop's memory format: nothing but the step itself.
        self.inputs = [torch.randn(micro, 3, side, side, device=device).contiguous(memory_format=memory_format)
                       for _ in range(self.accumulation)]
        self.targets = torch.randint(0, num_classes, (self.accumulation, micro), device=device)
        self.cfg, self.device, self.total, self.warmup, self.step = cfg, device, total_steps, warmup_steps, 0

    def steps(self, count: int) -> float:
        """Seconds of the next `count` bare steps (the schedule's rate set each step, as a run does)."""
        started = time.perf_counter()
        for _ in range(count):
            set_lr(self.optimizer, *lr_at(self.cfg.optim, self.step, self.total, self.warmup))
            for x, y in zip(self.inputs, self.targets):
                loss = F.cross_entropy(self.model(x), y, label_smoothing=self.cfg.optim.label_smoothing)
                (loss / self.accumulation).backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - started


def bare_floor_seconds(cfg: config_lib.Config, steps: int, num_classes: int, device: torch.device,
                       total_steps: int = 0, warmup_steps: int = 0) -> float:
    """Seconds of `steps` bare optimizer steps from step 0 of a `total_steps` schedule."""
    return BareSteps(cfg, num_classes, device, total_steps or steps, warmup_steps).steps(steps)


def interleaved_step_ratios(cfg: config_lib.Config, device: torch.device, chunks: Optional[int] = None,
                            chunk_steps: int = 2) -> list[float]:
    """`train_step`'s time over the bare step's, one ratio per pair of `chunk_steps`-step chunks, `chunks`
    pairs (default: as many as the run's steps allow) alternating in this process; empty for a run too short
    to lend two chunks to each side. `train_step` of a run built as `train` builds it (data, augmentation,
    the BN rule, the EMA when on); not the loop's bookkeeping around it (0.1% of the steps on the 12k photo
    set, timed around every train_step of a run).

    Short chunks, many pairs: a pair's ratio spreads by the steps' own jitter, not by the drift between its
    halves (12k photo run, AMD EPYC, 2 cores: s.d. 0.078 for 2-step chunks, 0.068 for 10-step ones, the
    means 1.018 and 1.013), so in the same minutes 2-step chunks give five times the pairs and half the
    noise of the mean (± 0.009 against ± 0.018)."""
    from tinydist.data.cache import load_train_val
    from tinydist.loop.accel import make_accelerator
    from tinydist.loop.run import build_run
    from tinydist.train import train_step

    accelerator = make_accelerator(cfg)
    run = build_run(cfg, accelerator, *load_train_val(cfg.data, accelerator.local_main_process_first,
                                                      log=lambda _: None))
    bare = BareSteps(cfg, run.num_classes, device, run.total_steps, run.warmup_steps)
    spare = run.last_step - 2  # two steps of each side run untimed, below
    chunk_steps = max(1, min(chunk_steps, spare // (chunks or 2)))  # a short run has fewer steps to lend
    chunks = min(chunks or spare, spare // chunk_steps)
    if chunks < 2:
        return []
    run.start_loop()
    try:
        def ours(count: int) -> float:
            started = time.perf_counter()
            for _ in range(count):
                train_step(run)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - started

        ours(2), bare.steps(2)  # first use of each side's kernels and buffers, untimed
        ratios = []
        for chunk in range(chunks):  # which side goes first alternates: neither always follows the other
            if chunk % 2:
                theirs, mine = bare.steps(chunk_steps), ours(chunk_steps)
            else:
                mine, theirs = ours(chunk_steps), bare.steps(chunk_steps)
            ratios.append(mine / theirs)
        return ratios
    finally:
        run.close()


# ---- the judgement: the lines `bench quality` prints ----------------------------------------------------


def floor_line(times: Sequence[dict[str, float]], floors: Sequence[tuple[float, float]], steps: int,
               cache_s: float = 0.0) -> str:
    """tinydist's end-to-end wall time (mean over its runs) against the bare loop's (the mean of the samples
    taken just before and just after each run), where the rest went, and the one-off decode-cache build."""
    wall = float(np.mean([t["time/wall_s"] for t in times]))
    samples = [f for pair in floors for f in pair]
    floor = float(np.mean(samples))
    phases = [(name, float(np.mean([t.get(f"time/{key}_s", 0.0) for t in times])))
              for name, key in (("data", "data"), ("start-up", "startup"), ("validation", "validation"),
                                ("saves", "saves"), ("export", "export"))]
    steps_s = float(np.mean([t["time/steps_s"] for t in times]))
    drag = float(np.mean([t.get("time/save_drag_s", 0.0) for t in times]))
    rest = ", ".join(f"{name} {s:.1f} s ({100 * s / wall:.0f}%)" for name, s in phases)
    # Each run against the two samples around it: their spread says how far the machine's drift lets this judge.
    ratios = [t["time/wall_s"] / float(np.mean(pair)) for t, pair in zip(times, floors)]
    per_run = ", ".join(f"{r:.2f}" for r in ratios)
    return (f"floor: tinydist end-to-end {wall:.1f} s vs bare loop {floor:.1f} s ({steps} steps on pre-made tensors, "
            f"{len(samples)} samples {min(samples):.1f}-{max(samples):.1f} s around the runs) -> ratio "
            f"{wall / floor:.2f} (per run {per_run}; goal <= {FLOOR_GOAL}; with the decode cache built by the run, as "
            "on a fresh machine: "
            f"{(wall + cache_s) / floor:.2f}); beyond the floor: {rest}, steps {steps_s:.1f} s = "
            f"{steps_s / floor:.2f} x floor (data loading, augmentation, EMA, logging inside the steps; {drag:.1f} s of "
            "them slowed by saves writing in the background); "
            + floor_verdict(ratios))


FLOOR_GOAL = 1.08  # issue 21: end-to-end within 8% of the bare steps


def drift_free_line(times: Sequence[dict[str, float]], step_ratios: Sequence[float]) -> str:
    """The end-to-end ratio without the drift between a run and its floor samples: each run's wall time over
    its own steps less what background saves slowed them by (the same minute: what start-up, validation,
    saves and export add; the chunks below save nothing) times `train_step`'s time over the bare step's from
    interleaved chunks (`interleaved_step_ratios`: what the steps add), each a mean with two standard
    errors, combined; a word only where the noise allows one."""
    beyond = [t["time/wall_s"] / (t["time/steps_s"] - t.get("time/save_drag_s", 0.0)) for t in times]
    step, step_noise = _mean_and_noise(step_ratios)
    extra, extra_noise = _mean_and_noise(beyond)
    estimate = extra * step
    noise = estimate * math.hypot(step_noise / step, extra_noise / extra)
    return (f"floor, drift cancelled: train_step {step:.3f} ± {step_noise:.3f} x the bare step ({len(step_ratios)} "
            f"interleaved chunk pairs in one process; mean ± 2 s.e.), the runs' phases beyond their steps (saves' "
            f"slowdown of the steps included) "
            f"+{100 * (extra - 1):.1f} ± {100 * extra_noise:.1f}% of them ({len(beyond)} runs) -> end-to-end "
            f"{estimate:.3f} ± {noise:.3f} x the floor (goal <= {FLOOR_GOAL}): {_judged(estimate, noise)}")


def _mean_and_noise(values: Sequence[float]) -> tuple[float, float]:
    """Mean and two standard errors (0 for a single value: nothing to say how far it may be off)."""
    mean = float(np.mean(values))
    return mean, (2 * float(np.std(values, ddof=1)) / math.sqrt(len(values)) if len(values) > 1 else 0.0)


def _judged(mean: float, noise: float) -> str:
    return ("within the goal" if mean + noise <= FLOOR_GOAL else
            "above the goal" if mean - noise > FLOOR_GOAL else "at the goal within the noise: not judged")


def floor_verdict(ratios: Sequence[float]) -> str:
    """The per-run ratios judged against FLOOR_GOAL as the accuracy gap is against zero: their mean, two
    standard errors, and a word only where the noise allows one."""
    if len(ratios) < 2:
        return "one run: too few to judge against the machine's drift (--seeds)"
    mean, noise = _mean_and_noise(ratios)
    return f"per-run ratios {mean:.3f}, 2 s.e. {noise:.3f} over {len(ratios)} runs: {_judged(mean, noise)}"

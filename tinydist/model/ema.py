"""An exponential moving average of the weights (Polyak averaging; timm's ModelEmaV3: a decay with
warm-up), kept as a second module with the model's own key names, so it is validated, saved and
exported like the model.

The decay scales with the run: by default it is the one whose half-life is `ema.half_life` of the
schedule's optimizer steps (config.ema_decay), so a 3-epoch run and a 300-epoch one average over the
same share of their trajectory; a fixed `ema.decay` suits one length only (0.9998 never left the
warm-up in a few hundred steps). Both come from the config and the step count, never the clock.

Only the parameters are averaged, identically on every rank: every rank holds the same parameters after
the step, whatever the world size (docs/design.md, principles 1, 2). The average is updated after every
`update_every` optimizer steps (config.ema_update_every: 1/20 of the half-life, 1 to 10 steps), the
decays of the steps in between compounded, and after the schedule's last step: a pure function of the
step, so resumed and uninterrupted runs hold the same average, and what reads it (a validation, a save,
the export) sees it as of the last update, at most update_every - 1 steps old. The update reads and writes
every parameter twice, ~2.5% of a step on 2 CPU cores; averaging every few steps costs a fraction of that
(ema-pytorch's `update_every`, Composer's `update_interval`).
BN running statistics are not averaged: under DDP each rank's differ until they are synchronised,
and averaged statistics would not belong to the averaged weights anyway. They are set for the
averaged weights where they are used: before each validation and the export (train.py), from the
model's synchronised ones, then recomputed by PreciseBN when it is on (precise_bn.py).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from tinydist.config import EmaConfig, ema_decay, ema_update_every


class ModelEma:
    def __init__(self, model: nn.Module, cfg: EmaConfig, total_steps: int = 0) -> None:
        """`total_steps`: the schedule's length, which sets the decay from `cfg.half_life` when
        `cfg.decay` is null (config.ema_decay)."""
        self.module = copy.deepcopy(model).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)
        self.decay, self.warmup_power = ema_decay(cfg, total_steps), cfg.warmup_power
        self.every, self.total_steps = ema_update_every(cfg, self.decay), total_steps
        self._averaged = [p for p in self.module.parameters()]
        self._live = [p for p in model.parameters()]

    def decay_at(self, step: int) -> float:
        """Decay applied after optimizer step `step` (0-based): 0 at the first step (the average starts
        as the weights), rising as 1 - (1 + step) ** -power, capped at `decay`."""
        if self.warmup_power <= 0:
            return self.decay
        return min(self.decay, 1.0 - (1.0 + step) ** -self.warmup_power)

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step `step` (0-based), when it ends a stretch of `every` steps or the schedule:
        averaged += (1 - keep) * (live - averaged), one foreach op, `keep` the product of the stretch's
        decays (with every = 1: the step's own decay)."""
        if (step + 1) % self.every and step + 1 != self.total_steps:
            return
        keep = math.prod(self.decay_at(s) for s in range(step // self.every * self.every, step + 1))
        torch._foreach_lerp_(self._averaged, self._live, 1.0 - keep)

    @torch.no_grad()
    def take_buffers(self, model: nn.Module) -> None:
        """The model's (synchronised) BN statistics into the average, before it is evaluated."""
        for mine, theirs in zip(self.module.buffers(), model.buffers()):
            mine.copy_(theirs)

"""Optimizer and learning-rate schedule, both functions of the optimizer step only, so they are
the same whatever the number of processes."""

from __future__ import annotations

import math

import torch
from torch import nn

from tinydist.config import OptimConfig
from tinydist.model import no_decay


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    decay, plain = [], []
    for name, param in model.named_parameters():
        (plain if no_decay(name, param) else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))


def build_schedule(cfg: OptimConfig, optimizer: torch.optim.Optimizer, total_steps: int,
                   warmup_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per optimizer step on every rank (never through Accelerate, which would step it
    once per process and tie the schedule to the world size)."""
    total_steps = max(total_steps, 1)
    if cfg.schedule == "onecycle":
        pct = warmup_steps / total_steps if warmup_steps else 0.3
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, total_steps=total_steps, pct_start=min(max(pct, 1e-3), 0.999),
            cycle_momentum=cfg.momentum > 0)

    def warmup_cosine(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine)


def apply_hyperparameters(cfg: OptimConfig, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The config's hyper-parameters (momentum, weight decay, betas...) onto an optimizer whose groups
    were just loaded from a checkpoint: the config a run records is the config in effect. Build the
    schedule after this: learning rates are the schedule's (schedule_at)."""
    fresh = build_optimizer(cfg, model)
    for live, new in zip(optimizer.param_groups, fresh.param_groups):
        for key in [k for k in live if k not in new]:  # a schedule's own keys (initial_lr, max_lr...):
            del live[key]  # the schedule built next sets them from the config, not from the checkpoint
        live.update({key: value for key, value in new.items() if key != "params"})


def schedule_at(schedule: torch.optim.lr_scheduler.LRScheduler, step: int) -> None:
    """Put a freshly built schedule (and its optimizer's learning rates) at `step`. Both schedules here
    are closed-form in the step, so this gives exactly the rates that `step` calls of `.step()` would;
    on resume it applies the config in effect (a new lr, epochs or warmup) from that step on."""
    import warnings

    schedule.last_epoch = step
    with warnings.catch_warnings():  # get_lr() outside step() warns; here it is the point
        warnings.simplefilter("ignore")
        rates = schedule.get_lr()
    for group, rate in zip(schedule.optimizer.param_groups, rates):
        group["lr"] = rate
    schedule._last_lr = list(rates)

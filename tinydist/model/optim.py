"""Optimizer and learning-rate schedule, the schedule a pure function of the config and the optimizer
step, so it is the same whatever the number of processes and needs no saved state."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from tinydist.config import OptimConfig
from tinydist.model.build import no_decay


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    decay, plain = [], []
    for name, param in model.named_parameters():
        (plain if no_decay(name, param) else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))


def lr_at(cfg: OptimConfig, step: int, total_steps: int, warmup_steps: int) -> tuple[float, Optional[float]]:
    """The learning rate (and, for onecycle, the momentum) of optimizer step `step` (0-based): a pure
    function of the config and the step, as nanoGPT's `get_lr(it)`. Nothing to save in a checkpoint,
    nothing to replay on resume, and a resumed run with a new lr, epochs or warmup applies it from
    its resume step on (docs/design.md, principle 1)."""
    total_steps = max(total_steps, 1)
    if cfg.schedule == "onecycle":
        return _one_cycle(cfg, step, total_steps, warmup_steps)
    if step < warmup_steps:
        return cfg.lr * (step + 1) / warmup_steps, None
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))), None


def _one_cycle(cfg: OptimConfig, step: int, total_steps: int, warmup_steps: int) -> tuple[float, Optional[float]]:
    """torch's OneCycleLR (two phases, cosine annealing, its defaults: start at lr/25, end at lr/25e4,
    momentum cycled 0.95 -> 0.85 -> 0.95 when momentum is used) in closed form."""
    pct = min(max(warmup_steps / total_steps if warmup_steps else 0.3, 1e-3), 0.999)
    start, peak = cfg.lr / 25.0, cfg.lr
    phases = [(pct * total_steps - 1, start, peak, 0.95, 0.85), (total_steps - 1, peak, start / 1e4, 0.85, 0.95)]
    begin = 0.0
    for i, (end, lr_from, lr_to, m_from, m_to) in enumerate(phases):
        if step <= end or i == len(phases) - 1:
            frac = (step - begin) / (end - begin) if end > begin else 1.0
            cos = math.cos(math.pi * frac) + 1
            lr = lr_to + (lr_from - lr_to) / 2.0 * cos
            momentum = m_to + (m_from - m_to) / 2.0 * cos
            return lr, (momentum if cfg.momentum > 0 else None)
        begin = end
    raise AssertionError("unreachable")


def set_lr(optimizer: torch.optim.Optimizer, lr: float, momentum: Optional[float] = None) -> None:
    """Before each optimizer step: the step's rates into every group (SGD's momentum, AdamW's beta1)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        if momentum is not None:
            if "betas" in group:
                group["betas"] = (momentum, *group["betas"][1:])
            else:
                group["momentum"] = momentum


def apply_hyperparameters(cfg: OptimConfig, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The config's hyper-parameters (momentum, weight decay, betas...) onto an optimizer whose groups
    were just loaded from a checkpoint: the config a run records is the config in effect (learning
    rates are set before every step from `lr_at`)."""
    fresh = build_optimizer(cfg, model)
    for live, new in zip(optimizer.param_groups, fresh.param_groups):
        for key in [k for k in live if k not in new]:  # keys of an older format's scheduler (initial_lr...)
            del live[key]
        live.update({key: value for key, value in new.items() if key != "params"})



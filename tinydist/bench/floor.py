"""The physical limit of a run's wall time on this machine, for `bench quality`: a bare loop over the
same number of optimizer steps on pre-made tensors: the same model, optimizer, schedule, micro-batch
shapes, accumulation, loss and threads, and nothing else (no data work, no validation, no saves, no
EMA). What a run spends beyond it is its overhead: `bench quality` prints the ratio and the phases."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from tinydist import config as config_lib
from tinydist.model.build import build_model
from tinydist.model.optim import build_optimizer, lr_at, set_lr


def bare_floor_seconds(cfg: config_lib.Config, steps: int, num_classes: int, device: torch.device,
                       total_steps: int = 0, warmup_steps: int = 0) -> float:
    """Seconds of `steps` bare optimizer steps (the schedule's rate set each step, as a run does)."""
    torch.manual_seed(cfg.train.seed)
    memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    model = build_model(cfg.model, num_classes).to(device, memory_format=memory_format).train()
    optimizer = build_optimizer(cfg.optim, model)
    micro, side = cfg.train.micro_batch_size, cfg.data.image_size
    accumulation = cfg.train.global_batch_size // micro
    # Fixed, normalised, on the device, in the loop's memory format: nothing but the step itself.
    inputs = [torch.randn(micro, 3, side, side, device=device).contiguous(memory_format=memory_format)
              for _ in range(accumulation)]
    targets = torch.randint(0, num_classes, (accumulation, micro), device=device)
    total = total_steps or steps
    started = time.perf_counter()
    for step in range(steps):
        set_lr(optimizer, *lr_at(cfg.optim, step, total, warmup_steps))
        for x, y in zip(inputs, targets):
            loss = F.cross_entropy(model(x), y, label_smoothing=cfg.optim.label_smoothing) / accumulation
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started

"""`bench quality`'s other side: the plain per-image torchvision/DataLoader loop a user would write by hand
(PIL decode per item, RandomResizedCrop(antialias=True), flip, ToTensor, Normalize; plain cross-entropy on
hard labels; BN statistics from every forward; torchvision's initialisation), on the same data rows,
micro-batches, model, optimizer, schedule and seed as tinydist's run."""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from tinydist import config as config_lib
from tinydist.data.augment import IMAGENET_MEAN, IMAGENET_STD
from tinydist.data.cache import _subset, open_source
from tinydist.data.sampler import GlobalSampler
from tinydist.model.build import build_model
from tinydist.model.optim import build_optimizer, lr_at, set_lr


def baseline_setup(cfg: config_lib.Config, train_rows: int, seed: int) -> tuple[GlobalSampler, int, int]:
    """(one process's sampler, total steps, warm-up steps) of a run of `train_rows` images: train.py's."""
    sampler = GlobalSampler(train_rows, cfg.train.global_batch_size, cfg.train.micro_batch_size, 1, 0, seed)
    total = math.ceil(cfg.train.epochs * sampler.steps_per_epoch)
    warmup = round(cfg.optim.warmup_epochs * sampler.steps_per_epoch)
    return sampler, total, warmup


def _model(cfg: config_lib.Config, num_classes: int, seed: int) -> tuple[Any, Any]:
    torch.manual_seed(seed)  # as train.py: the same initial weights as tinydist's run of this seed...
    # ...but for the residual BN scales: a hand-written loop's `resnet18(num_classes=n)` starts them at 1
    # (torchvision's default) whatever tinydist's side uses (model.zero_init_residual: at 0 from 150 steps).
    model = build_model(dataclasses.replace(cfg.model, zero_init_residual=False), num_classes)
    model = model.to(memory_format=torch.channels_last if cfg.model.channels_last else torch.contiguous_format)
    return model, build_optimizer(cfg.optim, model)


def _optimizer_step(cfg: config_lib.Config, optimizer: Any, step: int, total: int, warmup: int) -> None:
    set_lr(optimizer, *lr_at(cfg.optim, step, total, warmup))  # the schedule: a pure function of the step
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class PilImages(torch.utils.data.Dataset):
    """One split of the source as the rows of its decode cache (same subset, same order, labels by
    sorted class name), each decoded with PIL per item and passed through `transform`."""

    def __init__(self, cfg: config_lib.DataConfig, split: str, max_samples: Optional[int], transform: Any):
        src = open_source(cfg.source, split)
        subset = _subset(len(src.dataset), max_samples)
        self.ds = src.dataset if subset is None else src.dataset.select(subset)
        remap = np.argsort(np.argsort(src.classes)).astype(np.int64)
        self.labels = remap[np.asarray(self.ds["label"], np.int64)]
        self.classes, self.transform = sorted(src.classes), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        image = self.ds[int(i)]["image"]
        with Image.open(io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]) as im:
            return self.transform(im.convert("RGB")), int(self.labels[i])


def run_torchvision(cfg: config_lib.Config, seed: int, device: torch.device, workers: int = 0) -> float:
    """The plain per-image loop (see the module docstring); val top-1."""
    from torchvision import transforms as T

    size, normal = cfg.data.image_size, T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = T.Compose([T.RandomResizedCrop(size, scale=tuple(cfg.data.crop_scale), antialias=True),
                          *([T.RandomHorizontalFlip()] if cfg.data.hflip else []), T.ToTensor(), normal])
    eval_tf = T.Compose([T.Resize(size, antialias=True), T.CenterCrop(size), T.ToTensor(), normal])
    train_set = PilImages(cfg.data, cfg.data.train_split, cfg.data.max_train_samples, train_tf)
    val_set = PilImages(cfg.data, cfg.data.val_split, cfg.data.max_val_samples, eval_tf)
    sampler, total, warmup = baseline_setup(cfg, len(train_set), seed)
    model, optimizer = _model(cfg, len(train_set.classes), seed)
    memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    batches = [m.indices for step in range(total) for m in sampler.rank_micro_batches(step)]
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=batches, num_workers=workers)
    model.to(device).train()
    for i, (x, y) in enumerate(loader):  # the transforms draw from torch's generator, seeded in _model
        x = x.to(device, memory_format=memory_format)
        loss = F.cross_entropy(model(x), y.to(device))  # a hand-written loop's nn.CrossEntropyLoss(): hard labels
        (loss / sampler.accumulation).backward()
        if (i + 1) % sampler.accumulation == 0:
            _optimizer_step(cfg, optimizer, i // sampler.accumulation, total, warmup)
    model.eval()
    hits = 0
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(val_set, batch_size=cfg.train.eval_batch_size, num_workers=workers):
            hits += int((model(x.to(device, memory_format=memory_format)).argmax(1).cpu() == y).sum())
    return hits / len(val_set)

"""PreciseBN: BatchNorm running statistics recomputed for the current weights before they are used.

During training BN keeps an exponential average of batch statistics, each computed by weights that
have changed since: at a high learning rate the average lags the weights, and an early validation
reads a loss of hundreds at chance accuracy while the train loss is low. Recomputing them over a
fixed set of training images (detectron2's and fvcore's PreciseBN) makes validation and the export
reflect the weights they score.

Which images, and how: the first `images` rows of a permutation drawn from (seed, PRECISE_BN_STREAM),
un-augmented (the eval transform): the statistics are those of the inputs they will normalise at
evaluation (train-test resolution discrepancy, Touvron et al. 2019). Batches of a fixed size go to
ranks round-robin; each rank sums the per-batch means and unbiased variances of every BN input and
the sums are all-reduced, so the result is the same on any number of processes up to float rounding
(docs/design.md, principle 2), and bitwise the same on the same number.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from tinydist.config import Config
from tinydist.data.augment import eval_transform, inference_channels_last, to_device

PRECISE_BN_STREAM = 0x5EED_B4  # second word of the seed of the image choice: not the training stream's
BATCH = 256  # fixed, not the micro batch: a batch's variance depends on its size, and this must not on the run


def precise_bn_indices(num_images: int, images: int, seed: int) -> list[np.ndarray]:
    """The fixed batches: `images` training rows (at most all of them), cut into whole batches."""
    images = min(images, num_images)
    batch = min(BATCH, images)
    chosen = np.random.default_rng([seed, PRECISE_BN_STREAM]).permutation(num_images)[: images - images % batch]
    return [chosen[i:i + batch] for i in range(0, len(chosen), batch)]


@torch.no_grad()
def recompute_bn_statistics(model: nn.Module, data: Any, images: int, seed: int, device: torch.device,
                            world_size: int = 1, rank: int = 0,
                            reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                            channels_last: bool = True, autocast: Any = None) -> int:
    """Set every BN layer's running mean and variance of the bare `model` to their average over the
    fixed batches; returns the number of batches (0: nothing done). num_batches_tracked is kept."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    batches = precise_bn_indices(len(data), images, seed)
    if not layers or not batches:
        return 0
    sums = [torch.zeros(2, m.num_features, dtype=torch.float64, device=device) for m in layers]

    def hook(index: int) -> Callable[..., None]:
        def record(_: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].float()
            # BN's own statistics kernel: one pass, ~3x cheaper on the CPU than x.mean + x.var over the
            # (N, H, W) dims (11 vs 33 ms per 256 images at 32 px, all 20 layers). It gives the biased
            # variance; BN's running_var averages the unbiased one.
            mean, biased_var = torch.batch_norm_update_stats(x, None, None, 0.0)
            count = x.numel() // x.shape[1]
            sums[index][0] += mean.double()
            sums[index][1] += biased_var.double() * (count / max(count - 1, 1))
        return record

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(layers)]
    tracked = [m.num_batches_tracked.clone() for m in layers if m.num_batches_tracked is not None]
    channels_last = inference_channels_last(channels_last, device)
    was_training = model.training
    model.train()  # BN normalises with each batch's own statistics, as in training
    try:
        for indices in batches[rank::world_size]:
            images_, _ = to_device(data.gather(indices), data.labels[indices], device)
            with autocast() if autocast else contextlib.nullcontext():
                model(eval_transform(images_, channels_last, getattr(data, "image_size", None)))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    total = torch.cat(sums, dim=1)  # one all-reduce for every layer
    if reduce is not None:
        total = reduce(total)
    averages = (total / len(batches)).split([m.num_features for m in layers], dim=1)
    for m, (mean, var) in zip(layers, averages):
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
    for m, count in zip([m for m in layers if m.num_batches_tracked is not None], tracked):
        m.num_batches_tracked.copy_(count)
    return len(batches)


@dataclass(frozen=True)
class PreciseBN:
    """PreciseBN as a run configures it: `images` training images (0: off), chosen by `seed`, fed in
    the memory format the model trains in."""

    images: int
    seed: int
    channels_last: bool = True

    @classmethod
    def from_config(cls, cfg: Config) -> PreciseBN:
        return cls(cfg.eval.precise_bn_images, cfg.train.seed, cfg.model.channels_last)

    def recompute(self, model: nn.Module, data: Any, device: torch.device, world_size: int = 1, rank: int = 0,
                  reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, autocast: Any = None) -> int:
        """`recompute_bn_statistics` with these settings; 0 (nothing done) when off."""
        if not self.images:
            return 0
        return recompute_bn_statistics(model, data, self.images, self.seed, device, world_size, rank, reduce,
                                       self.channels_last, autocast)

"""CutMix and MixUp of whole micro-batches on the device, with soft (mixed, smoothed) targets.

Reference semantics: timm's `timm.data.mixup.Mixup` with `mode="batch"` and `correct_lam=True`:
one lambda (and for CutMix one box) per micro-batch, every image mixed with the batch flipped along
dim 0 (no permutation to draw), the CutMix box as timm's `rand_bbox` (side ratio sqrt(1 - lam),
uniform centre, clipped to the image) with lam corrected to the box actually pasted, and targets
`lam * smooth(onehot(y)) + (1 - lam) * smooth(onehot(y.flip(0)))`.

Why this shape:
- The mixing itself is a slice copy (CutMix) or one multiply-add (MixUp) on tensors already on the
  device, with a Python-float lam and Python-int box: no host sync, no loop over the batch.
- All randomness is drawn on the CPU, per micro-batch, from the generator `augment.batch_generator`
  derives from (seed, epoch, global micro-batch index). So a micro-batch is mixed the same way on
  any world size (it never depends on which other micro-batches a rank holds) and after any resume.
- `draw_mix` consumes exactly one value of that generator whatever it draws (the seed of a numpy
  Generator, which then supplies the Beta samples torch cannot draw from a given generator), so
  whatever the caller draws from the same generator afterwards does not shift with the outcome.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F

from tinydist.config import MixConfig


class MixParams(NamedTuple):
    """What was drawn for one micro-batch.

    lam: weight of the original images (for CutMix: 1 - box area / image area, after clipping).
    box: (top, left, bottom, right) in pixels, bottom/right exclusive, for CutMix; None otherwise.
    active: whether the micro-batch is mixed at all (False: images untouched, targets = smoothed y).
    """
    lam: float
    box: Optional[tuple[int, int, int, int]]
    active: bool


INACTIVE = MixParams(1.0, None, False)


def mix_enabled(cfg: MixConfig) -> bool:
    """Whether `cfg` can mix anything; when False, `draw_mix` draws nothing and mixing is skipped."""
    return (cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0) and cfg.prob > 0


def _rand_bbox(lam: float, height: int, width: int, cy: int, cx: int) -> tuple[int, int, int, int]:
    """timm's `rand_bbox` (no margin) for a given centre: a box of side ratio sqrt(1 - lam), clipped."""
    ratio = float(np.sqrt(1.0 - lam))
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    top, bottom = int(np.clip(cy - cut_h // 2, 0, height)), int(np.clip(cy + cut_h // 2, 0, height))
    left, right = int(np.clip(cx - cut_w // 2, 0, width)), int(np.clip(cx + cut_w // 2, 0, width))
    return top, left, bottom, right


def draw_mix(cfg: MixConfig, n: int, height: int, width: int, generator: torch.Generator) -> MixParams:
    """Draw one micro-batch's mixing (timm `Mixup._params_per_batch` + `cutmix_bbox_and_lam`).

    With mixing enabled this takes exactly one value from `generator`, whatever the outcome; with
    it disabled (`mix_enabled(cfg)` False) it takes none and returns inactive params. `n` (the
    micro-batch size) does not change the draws: batch mode uses one lam and box for all images."""
    if n < 1 or height < 1 or width < 1:
        raise ValueError(f"draw_mix needs a non-empty batch and image, got n={n}, {height}x{width}")
    if not mix_enabled(cfg):
        return INACTIVE
    # torch.distributions.Beta cannot sample from a given generator: seed numpy's from one torch draw.
    rng = np.random.default_rng(int(torch.randint(2 ** 63 - 1, (1,), generator=generator)))
    # Every value is drawn every time (only the alphas, fixed per config, decide which Beta draws
    # exist), so the numpy stream too is consumed the same way whatever the outcome.
    u_apply, u_switch = rng.uniform(size=2)
    lam_mixup = float(rng.beta(cfg.mixup_alpha, cfg.mixup_alpha)) if cfg.mixup_alpha > 0 else 1.0
    lam_cutmix = float(rng.beta(cfg.cutmix_alpha, cfg.cutmix_alpha)) if cfg.cutmix_alpha > 0 else 1.0
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))  # timm: np.random.randint(0, size)

    if u_apply >= cfg.prob:
        return INACTIVE
    if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
        use_cutmix = bool(u_switch < cfg.switch_prob)
    else:
        use_cutmix = cfg.cutmix_alpha > 0
    if not use_cutmix:
        return MixParams(lam_mixup, None, True)
    box = _rand_bbox(lam_cutmix, height, width, cy, cx)
    top, left, bottom, right = box
    # timm's correct_lam: the target weight is the share of pixels actually kept after clipping.
    lam = 1.0 - (bottom - top) * (right - left) / float(height * width)
    return MixParams(lam, box, True)


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float,
                   device: torch.device) -> torch.Tensor:
    """(N,) int64 -> (N, C) float32 with timm's smoothing: off = s / C, on = 1 - s + off."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    labels = labels.to(device=device, dtype=torch.int64, non_blocking=True).view(-1, 1)
    return torch.full((labels.shape[0], num_classes), off, device=device, dtype=torch.float32).scatter_(1, labels, on)


def apply_mix(images: torch.Tensor, labels: torch.Tensor, params: MixParams, num_classes: int,
              smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, H, W) float images + (N,) int64 labels -> (mixed images, (N, C) float32 soft targets),
    both on the images' device. The images' memory format is kept; the inputs are not modified.
    Inactive params: images returned as they are, targets the smoothed one-hot labels."""
    targets = smooth_one_hot(labels, num_classes, smoothing, images.device)
    if not params.active:
        return images, targets
    lam = float(params.lam)
    if params.box is not None:
        top, left, bottom, right = params.box
        mixed = images.clone()  # preserve_format: channels_last stays channels_last
        # Only the box is copied, flipped: the same pixels as timm's x.flip(0)[..., box] without
        # flipping the whole batch.
        mixed[:, :, top:bottom, left:right] = images[:, :, top:bottom, left:right].flip(0)
    else:
        mixed = images * lam  # keeps the memory format of `images`
        mixed.add_(images.flip(0), alpha=1.0 - lam)
    targets = targets * lam + targets.flip(0) * (1.0 - lam)
    return mixed, targets


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -(targets * log_softmax(logits)).sum(1), in float32 whatever the logits'
    dtype (timm's SoftTargetCrossEntropy). With smoothed one-hot targets this equals
    `F.cross_entropy(logits, y, label_smoothing=s)`, so the loop can use soft targets throughout."""
    return torch.sum(-targets.float() * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()

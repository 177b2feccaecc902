"""Augmentation of whole uint8 batches on the device: random resized crop + flip + normalisation.

One `affine_grid` + `grid_sample` does crop, resize and flip for the whole batch: the seed
report's per-image PIL pipeline was the bottleneck of training, this is not. The crop parameters
are drawn on the CPU from a generator seeded by (seed, epoch, global micro-batch index), so a
batch is augmented the same way on any device, any world size, and after any resume.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def batch_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator whose state is a pure function of (seed, epoch, micro-batch index)."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def crop_flip_params(n: int, height: int, width: int, generator: torch.Generator,
                     scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                     attempts: int = 10, hflip: bool = True) -> torch.Tensor:
    """torchvision's RandomResizedCrop sampling, vectorised, plus a coin flip: (n, 2, 3) affine thetas
    for `affine_grid` (align_corners=False) mapping output pixels to the crop box.

    All randomness is one draw from `generator`; the arithmetic is numpy's: on these tiny arrays a
    dozen torch ops cost ~2 ms per micro-batch in thread-pool start-ups alone, numpy ~50 us."""
    draws = torch.rand(n, 2 * attempts + 3, generator=generator, dtype=torch.float64).numpy()
    area = height * width
    target = area * (scale[0] + (scale[1] - scale[0]) * draws[:, :attempts])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * draws[:, attempts:2 * attempts])
    w = np.round(np.sqrt(target * aspect))
    h = np.round(np.sqrt(target / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    found = ok.any(1)
    first = ok.argmax(1)
    rows = np.arange(n)
    # torchvision's fallback when no attempt fits: the whole image, clamped to the ratio range.
    in_ratio = min(max(width / height, ratio[0]), ratio[1])
    fb_w = float(width) if width / height <= in_ratio else round(height * in_ratio)
    fb_h = float(height) if width / height >= in_ratio else round(width / in_ratio)
    w = np.where(found, w[rows, first], fb_w)
    h = np.where(found, h[rows, first], fb_h)
    top = np.where(found, draws[:, -3] * (height - h), (height - h) / 2)
    left = np.where(found, draws[:, -2] * (width - w), (width - w) / 2)
    flip = np.where(draws[:, -1] < 0.5, -1.0, 1.0) if hflip else np.ones(n)  # drawn either way: same crops
    theta = np.zeros((n, 2, 3))
    theta[:, 0, 0] = w / width * flip
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    return torch.from_numpy(theta.astype(np.float32))


_CONSTANTS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _normalise_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Made once per device: building them per batch was a pageable host-to-device copy, which makes
    the host wait for the GPU to finish its queued work, every micro-batch."""
    if device not in _CONSTANTS:
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        scale = 1.0 / (255.0 * std)
        shift = -torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) / std
        _CONSTANTS[device] = (scale.to(device), shift.to(device))
    return _CONSTANTS[device]


def normalise(images: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32, contiguous, (x / 255 - mean) / std, in one pass.
    Normalising before the crop gives the same result (bilinear sampling with border padding
    commutes with a per-channel affine map) and lets one multiply-add also do the uint8 conversion."""
    scale, shift = _normalise_constants(images.device)
    n, height, width, _ = images.shape
    out = torch.empty(n, 3, height, width, device=images.device)
    return torch.addcmul(shift, images.permute(0, 3, 1, 2), scale, out=out)


def _memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def crop_grid(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`affine_grid` for axis-aligned thetas (scale + shift, no rotation): an outer sum instead of a
    batched matrix product, several times cheaper on the CPU."""
    xs = (torch.arange(width, device=theta.device, dtype=theta.dtype) * 2 + 1) / width - 1  # pixel centres
    ys = (torch.arange(height, device=theta.device, dtype=theta.dtype) * 2 + 1) / height - 1
    grid = torch.empty(len(theta), height, width, 2, device=theta.device, dtype=theta.dtype)
    grid[..., 0] = theta[:, 0, 0, None, None] * xs[None, None, :] + theta[:, 0, 2, None, None]
    grid[..., 1] = theta[:, 1, 1, None, None] * ys[None, :, None] + theta[:, 1, 2, None, None]
    return grid


def resize_matrix(scale: torch.Tensor, shift: torch.Tensor, size_in: int, size_out: int) -> torch.Tensor:
    """(N, size_out, size_in) rows of antialiased bilinear weights along one axis, from the axis' part of
    crop thetas (`scale`, `shift`: (N,), as `crop_flip_params` makes them): what PIL's resize, and so
    torchvision's RandomResizedCrop(antialias=True), applies to a crop. A triangle filter whose radius
    is the downscale factor (1 when upscaling), taps only inside the crop box, renormalised; a
    negative scale (a flip) reverses the rows."""
    step = scale.abs() * size_in / size_out  # input pixels per output pixel
    u = (torch.arange(size_out, device=scale.device, dtype=scale.dtype) * 2 + 1) / size_out - 1
    centre = (scale[:, None] * u + shift[:, None] + 1) * (size_in / 2)  # (N, size_out), input pixel units
    lo = (shift - scale.abs() + 1) * (size_in / 2)  # crop box [lo, hi) in input pixels
    hi = (shift + scale.abs() + 1) * (size_in / 2)
    j = torch.arange(size_in, device=scale.device, dtype=scale.dtype) + 0.5  # input pixel centres
    radius = step.clamp(min=1.0)[:, None, None]
    # In place after the first: the same arithmetic, one (N, S, size_in) buffer instead of five (0.35 -> 0.2 ms).
    weights = (j - centre[:, :, None]).abs_().div_(radius).neg_().add_(1).clamp_(min=0)
    weights.mul_((j >= lo[:, None, None]) & (j < hi[:, None, None]))
    return weights.div_(weights.sum(-1, keepdim=True).clamp_(min=1e-12))


def augment(images: torch.Tensor, theta: torch.Tensor, channels_last: bool = True,
            size: Optional[int] = None) -> torch.Tensor:
    """(N, H, W, 3) uint8 + (N, 2, 3) crop/flip parameters on the same device -> normalised (N, 3, S, S)
    float32, S = `size` (default: the input's size, H = W).

    At the input's size (the 64-px Tiny ImageNet path): normalise, then crop, resize and flip in one
    bilinear `grid_sample`; a crop is never larger than the output there, so it is only ever upscaled
    and needs no antialiasing. At a smaller `size` (a cache kept at more detail than the output, see
    data.load_split's `detail`) crops are downscaled, so they are resampled like torchvision's
    antialiased resize instead: two batched matmuls with per-image weights (`resize_matrix`), once,
    from the cache's pixels, whatever the downscale factor. No host sync either way."""
    n, height, width, _ = images.shape
    x = normalise(images)  # weights sum to 1: resampling commutes with the per-channel affine map
    if size is None or (size == height and size == width):
        x = F.grid_sample(x, crop_grid(theta, height, width), mode="bilinear", padding_mode="border",
                          align_corners=False)
        return _memory_format(x, channels_last)
    if height == width:  # both axes' weights in one call: half the small ops (0.19 -> 0.14 ms a micro-batch, 2 cores)
        rows, cols = resize_matrix(theta[:, [1, 0], [1, 0]].T.reshape(-1), theta[:, [1, 0], 2].T.reshape(-1),
                                   height, size).split(n)
    else:
        rows = resize_matrix(theta[:, 1, 1], theta[:, 1, 2], height, size)  # (N, S, H)
        cols = resize_matrix(theta[:, 0, 0], theta[:, 0, 2], width, size)  # (N, S, W)
    # Rows first, both weight matrices broadcast over the channels. (Columns first, one (3H x W) @ (W x S)
    # product per image, was 0.91 vs 1.33 ms a 32-image micro-batch on 2 cores, but not these bits: a run moved
    # 1 -> 2 -> 4 -> 1 processes then ended 1e-3 from the unmoved one, where this order stays within 1e-5.)
    x = torch.matmul(torch.matmul(rows[:, None], x), cols[:, None].transpose(-1, -2))
    return _memory_format(x, channels_last)


def train_transform(images: torch.Tensor, seed: int, epoch: int, index: int, channels_last: bool = True,
                    scale: Sequence[float] = (0.08, 1.0), hflip: bool = True, size: Optional[int] = None) -> torch.Tensor:
    """(N, H, W, 3) uint8 on any device -> augmented, normalised (N, 3, S, S) float32 (S = `size`, default H).
    (The training loop draws the parameters ahead of time, in prefetch.py, and calls `augment`.)"""
    n, height, width, _ = images.shape
    generator = batch_generator(seed, epoch, index)
    theta = crop_flip_params(n, height, width, generator, (scale[0], scale[1]), hflip=hflip).to(images.device)
    return augment(images, theta, channels_last, size)


def inference_channels_last(channels_last: bool, device: torch.device) -> bool:
    """Whether forwards without a backward (validation, PreciseBN) feed NHWC inputs: the model's format,
    and always on a CPU, where oneDNN's NHWC inference path is faster even with NCHW weights (resnet18
    at 32 px, 2 cores: PreciseBN's 1024 + 2000 val images 0.69 s vs 0.81 s), while a training step there
    is 7% slower in NHWC (92 vs 99 ms), which is why the CPU recipes train in NCHW (smoke.yaml)."""
    return channels_last or device.type == "cpu"


def eval_transform(images: torch.Tensor, channels_last: bool = True, size: Optional[int] = None) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> normalised (N, 3, S, S) float32; no randomness. A cache kept at more detail
    than `size` is resized to it with antialiasing (as torchvision's Resize of a PIL image)."""
    x = normalise(images)
    if size is not None and (size, size) != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return _memory_format(x, channels_last)


def to_device(pixels: np.ndarray, labels: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Move a batch as uint8 (4x fewer bytes than float); pinned + non-blocking on a GPU so the copy
    overlaps compute. PyTorch's caching host allocator recycles the pinned blocks."""
    images, targets = torch.from_numpy(pixels), torch.from_numpy(labels)
    if device.type == "cuda":
        images, targets = images.pin_memory(), targets.pin_memory()
    return images.to(device, non_blocking=True), targets.to(device, non_blocking=True)

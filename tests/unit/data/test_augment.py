"""tinydist.data.augment: batched crop + flip + normalise, drawn from (seed, epoch, micro-batch index)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tinydist.data.augment import (IMAGENET_MEAN, IMAGENET_STD, batch_generator, crop_flip_params,
                              eval_transform, to_device, train_transform)

LOW = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))  # about -2.118
HIGH = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))  # about 2.640


def images(n: int = 16, size: int = 32, seed: int = 0) -> torch.Tensor:
    """(n, size, size, 3) uint8 with structure (a gradient) plus noise: any crop changes it."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, size)[None, :, None] + np.linspace(0, 50, size)[:, None, None]
    x = ramp[None] + rng.integers(0, 56, (n, size, size, 3))
    return torch.from_numpy(x.clip(0, 255).astype(np.uint8))


def asymmetric(n: int, size: int = 16) -> torch.Tensor:
    """Dark left half, bright right half, a stripe at column 2: mirrored, it reads differently."""
    x = np.zeros((n, size, size, 3), np.uint8)
    x[:, :, size // 2:] = 220
    x[:, :, 2] = 120
    return torch.from_numpy(x)


def test_deterministic_per_seed_epoch_and_index():
    x = images()
    a = train_transform(x, seed=1, epoch=2, index=3)
    assert torch.equal(a, train_transform(x, seed=1, epoch=2, index=3))
    assert not torch.allclose(a, train_transform(x, seed=1, epoch=2, index=4))
    assert not torch.allclose(a, train_transform(x, seed=1, epoch=3, index=3))
    assert not torch.allclose(a, train_transform(x, seed=2, epoch=2, index=3))


def test_shape_dtype_and_range():
    x = images(n=8, size=24)
    for out in (train_transform(x, 0, 0, 0), eval_transform(x)):
        assert out.shape == (8, 3, 24, 24) and out.dtype == torch.float32
        assert torch.isfinite(out).all()
        assert LOW - 1e-4 <= out.min() and out.max() <= HIGH + 1e-4
    # extremes map to the normalised bounds of each channel
    black_white = torch.zeros(2, 4, 4, 3, dtype=torch.uint8)
    black_white[1] = 255
    out = eval_transform(black_white)
    for c, (m, s) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD)):
        assert out[0, c].allclose(torch.tensor(-m / s)) and out[1, c].allclose(torch.tensor((1 - m) / s))


def test_crops_really_vary():
    x = images(n=1, size=32).expand(24, -1, -1, -1).contiguous()  # one image 24 times
    out = train_transform(x, seed=0, epoch=0, index=0, hflip=False)
    plain = eval_transform(x[:1])
    changed = [not torch.allclose(o, plain[0], atol=1e-3) for o in out]
    assert sum(changed) >= 20  # nearly every crop differs from the image (a full-size crop is rare)
    distinct = {tuple(o.flatten()[::97].round(decimals=3).tolist()) for o in out}
    assert len(distinct) >= 20  # and from each other
    theta = crop_flip_params(1000, 32, 32, batch_generator(0, 0, 0))
    area = theta[:, 0, 0].abs() * theta[:, 1, 1]  # fraction of the image each crop covers
    assert 0.08 - 0.02 <= area.min() and area.max() <= 1.0 + 1e-6 and area.std() > 0.15


def test_flips_really_happen():
    n = 32
    x = asymmetric(n)
    out = train_transform(x, seed=0, epoch=0, index=5, scale=(1.0, 1.0), hflip=True)
    plain = eval_transform(x)
    mirrored = plain.flip(-1)
    is_plain = [torch.allclose(o, p, atol=1e-4) for o, p in zip(out, plain)]
    is_mirrored = [torch.allclose(o, m, atol=1e-4) for o, m in zip(out, mirrored)]
    assert all(a != b for a, b in zip(is_plain, is_mirrored))  # each output is exactly one of the two
    assert 4 <= sum(is_mirrored) <= n - 4  # about half: P(fewer than 4 of 32) < 1e-5
    flips = crop_flip_params(n, 16, 16, batch_generator(0, 0, 5), scale=(1.0, 1.0))[:, 0, 0] < 0
    assert flips.tolist() == is_mirrored  # the sign of theta says which


def test_no_flip_when_hflip_is_off_and_same_crops_either_way():
    g = lambda: batch_generator(4, 1, 9)  # noqa: E731
    with_flip = crop_flip_params(64, 20, 20, g(), hflip=True)
    without = crop_flip_params(64, 20, 20, g(), hflip=False)
    assert (without[:, 0, 0] > 0).all()
    assert (with_flip[:, 0, 0] < 0).any()
    assert torch.equal(with_flip.abs(), without.abs())  # the flip coin does not shift the crops


@pytest.mark.parametrize("size", [16, 33])
def test_full_crop_without_flip_is_the_eval_transform(size):
    x = images(n=12, size=size, seed=size)
    out = train_transform(x, seed=3, epoch=1, index=7, scale=(1.0, 1.0), hflip=False)
    assert torch.allclose(out, eval_transform(x), atol=1e-4)


def test_eval_transform_has_no_randomness():
    x = images(n=4, size=16)
    torch.manual_seed(0)
    a = eval_transform(x)
    torch.manual_seed(1)
    torch.rand(100)
    b = eval_transform(x)
    assert torch.equal(a, b)
    expected = (x.permute(0, 3, 1, 2).float() / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(a, expected, atol=1e-6)


def test_global_rng_does_not_leak_into_training_augmentation():
    x = images(n=6, size=16)
    torch.manual_seed(0)
    a = train_transform(x, 0, 0, 1)
    torch.manual_seed(123)
    b = train_transform(x, 0, 0, 1)
    assert torch.equal(a, b)


@pytest.mark.parametrize("channels_last", [True, False])
def test_memory_format(channels_last):
    x = images(n=3, size=16)
    for out in (train_transform(x, 0, 0, 0, channels_last=channels_last), eval_transform(x, channels_last=channels_last)):
        if channels_last:
            assert out.is_contiguous(memory_format=torch.channels_last)
            assert out.stride()[1] == 1  # channels innermost
        else:
            assert out.is_contiguous()
    a = train_transform(x, 0, 0, 0, channels_last=True)
    b = train_transform(x, 0, 0, 0, channels_last=False)
    assert torch.equal(a, b)  # the same values either way


def test_params_come_from_a_cpu_generator_and_are_reproducible():
    g = batch_generator(7, 2, 11)
    assert g.device.type == "cpu"
    a = crop_flip_params(16, 64, 64, g)
    b = crop_flip_params(16, 64, 64, batch_generator(7, 2, 11))
    assert a.device.type == "cpu" and torch.equal(a, b)
    assert not torch.equal(a, crop_flip_params(16, 64, 64, batch_generator(7, 2, 12)))
    assert batch_generator(7, 2, 11).initial_seed() == g.initial_seed() != batch_generator(7, 3, 11).initial_seed()
    # crop boxes stay inside the image: |centre| + half-size <= 1 in affine_grid coordinates
    assert (a[:, 0, 2].abs() + a[:, 0, 0].abs() <= 1 + 1e-5).all()
    assert (a[:, 1, 2].abs() + a[:, 1, 1].abs() <= 1 + 1e-5).all()


def test_to_device_keeps_uint8():
    pixels = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    labels = np.array([3, 1], np.int64)
    images_, targets = to_device(pixels, labels, torch.device("cpu"))
    assert images_.dtype == torch.uint8 and targets.dtype == torch.int64
    assert np.array_equal(images_.numpy(), pixels) and targets.tolist() == [3, 1]


@pytest.mark.parametrize("height,width", [(64, 64), (48, 40)])
def test_downscaled_crops_are_torchvisions_antialiased_resized_crop(height, width):
    """At a smaller output size each crop is resampled as torchvision's `resized_crop(antialias=True)`
    resamples it (integer boxes here, where torchvision's are defined), flips mirrored: the matmul
    formulation in `augment` is a speed-up, not another filter."""
    from torchvision.transforms.v2 import functional as TF

    from tinydist.data.augment import augment, normalise

    x = images(n=6, size=64, seed=5)[:, :height, :width].contiguous()
    boxes = [(0, 0, height, width), (3, 5, 30, 22), (10, 1, 17, 37), (20, 8, 28, 28), (1, 2, 40, 33), (7, 7, 9, 12)]
    flips = [False, True, False, True, True, False]
    theta = torch.zeros(6, 2, 3)
    for k, ((top, left, h, w), flip) in enumerate(zip(boxes, flips)):
        theta[k, 0, 0] = w / width * (-1 if flip else 1)
        theta[k, 0, 2] = (2 * left + w) / width - 1
        theta[k, 1, 1] = h / height
        theta[k, 1, 2] = (2 * top + h) / height - 1
    out = augment(x, theta, channels_last=False, size=16)
    full = normalise(x)
    for k, ((top, left, h, w), flip) in enumerate(zip(boxes, flips)):
        expected = TF.resized_crop(full[k], top, left, h, w, [16, 16], antialias=True)
        expected = expected.flip(-1) if flip else expected
        assert torch.allclose(out[k], expected, atol=2e-5), (k, (out[k] - expected).abs().max())

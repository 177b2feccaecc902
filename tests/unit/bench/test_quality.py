"""`python -m tinydist.bench quality` and what it checks: crops resampled once, antialiased, from a cache
kept at more detail than the model's input (augment.resize_matrix, data.load_split(detail=2)); its tinydist
side is training itself (train_step, validate), the recipe as configured."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

try:
    import tinydist  # noqa: F401
except ImportError:  # the package is not installed into the venv: test the working tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from tinydist.data.augment import (IMAGENET_MEAN, IMAGENET_STD, augment, batch_generator,  # noqa: E402
                              crop_flip_params, eval_transform, train_transform)


def _theta(boxes: list[tuple[int, int, int, int, int]], side: int) -> torch.Tensor:
    theta = torch.zeros(len(boxes), 2, 3)
    for k, (top, left, h, w, flip) in enumerate(boxes):
        theta[k, 0, 0], theta[k, 0, 2] = w / side * flip, (2 * left + w) / side - 1
        theta[k, 1, 1], theta[k, 1, 2] = h / side, (2 * top + h) / side - 1
    return theta


def _levels(x: torch.Tensor) -> torch.Tensor:
    """Normalised (N, 3, S, S) back to 0-255."""
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return (x * std + mean) * 255


def test_downscaled_crops_match_torchvision_antialiased_resized_crop():
    from torchvision.transforms import functional as TF

    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.integers(0, 256, (1, 64, 64, 3), dtype=np.uint8))
    # downscale 40x30 -> 32, upscale 9x11 -> 32, the whole image, a near-whole one; each also mirrored
    boxes = [(5, 7, 40, 30, f) for f in (1, -1)] + [(10, 12, 9, 11, 1), (0, 0, 64, 64, -1), (3, 1, 50, 61, 1)]
    out = _levels(augment(pixels.expand(len(boxes), -1, -1, -1), _theta(boxes, 64), False, size=32))
    source = pixels[0].permute(2, 0, 1).float()
    for k, (top, left, h, w, flip) in enumerate(boxes):
        ref = TF.resized_crop(source, top, left, h, w, [32, 32], antialias=True)
        ref = ref.flip(-1) if flip < 0 else ref
        assert (out[k] - ref).abs().max() < 1e-3, (top, left, h, w, flip)


def test_same_size_path_unchanged_and_sizes():
    x = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8))
    assert torch.equal(train_transform(x, 0, 1, 2), train_transform(x, 0, 1, 2, size=32))  # the grid_sample path
    small = train_transform(x, 0, 1, 2, size=16)
    assert small.shape == (6, 3, 16, 16) and torch.isfinite(small).all()
    assert torch.equal(small, train_transform(x, 0, 1, 2, size=16))  # a pure function of (seed, epoch, index)
    assert eval_transform(x, size=16).shape == (6, 3, 16, 16)
    assert torch.equal(eval_transform(x, size=32), eval_transform(x))


def test_a_flat_image_stays_flat_and_the_full_crop_is_a_plain_resize():
    flat = torch.full((4, 64, 64, 3), 77, dtype=torch.uint8)
    theta = crop_flip_params(4, 64, 64, batch_generator(0, 0, 0))
    assert (_levels(augment(flat, theta, False, size=32)) - 77).abs().max() < 1e-3  # weights sum to 1
    x = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8))
    whole = augment(x, _theta([(0, 0, 64, 64, 1)] * 2, 64), False, size=32)
    assert torch.allclose(whole, eval_transform(x, False, size=32), atol=1e-4)


def test_detail_cache_keeps_source_pixels(tmp_path):
    from tinydist.config import DataConfig
    from tinydist.data.cache import load_split

    cfg = DataConfig(source="digits", image_size=16, cache_dir=str(tmp_path))
    plain = load_split(cfg, "valid", 40, log=lambda _: None)
    kept = load_split(cfg, "valid", 40, log=lambda _: None, detail=2)
    assert (plain.side, plain.image_size, kept.side, kept.image_size) == (16, 16, 32, 16)
    assert kept.gather(np.arange(3)).shape == (3, 32, 32, 3) and np.array_equal(plain.labels, kept.labels)
    assert plain.folder != kept.folder
    big = load_split(DataConfig(source="digits", image_size=48, cache_dir=str(tmp_path)), "valid", 40,
                     log=lambda _: None, detail=2)
    assert (big.side, big.image_size) == (64, 48)  # never more than the source's own 64 px


def test_table_and_verdict_parse():
    from tinydist.bench.quality import table

    lines = table({"tinydist": [0.851, 0.858], "torchvision": [0.856, 0.861]}, [0, 1])
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in lines[1:3]}
    assert rows == {"tinydist": [85.1, 85.8, 85.45], "torchvision": [85.6, 86.1, 85.85]}
    gap = re.search(r"= ([+-]\d+\.\d+) points", lines[-1])
    assert lines[-1].startswith("verdict: tinydist") and gap and float(gap.group(1)) == pytest.approx(-0.4)


def test_tinydist_side_trains_the_recipe_with_train_step(tmp_path, monkeypatch):
    """Every step is train.train_step; CutMix/MixUp, the EMA and PreciseBN all run when the config turns them on."""
    import tinydist.train as train
    from tinydist import config
    from tinydist.bench import quality

    calls = {"train_step": 0, "apply_mix": 0, "recompute_bn_statistics": 0}

    def counted(module, name):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    counted(quality, "train_step")
    counted(train, "apply_mix")
    counted(train, "recompute_bn_statistics")
    cfg = config.load_config(["--config", quality.SMOKE_RECIPE, f"--data.cache_dir={tmp_path}/cache",
                              "--data.image_size=16", "--data.max_train_samples=96", "--data.max_val_samples=32",
                              "--train.global_batch_size=32", "--train.micro_batch_size=16", "--train.epochs=1",
                              "--mix.cutmix_alpha=1.0", "--mix.prob=1.0", "--eval.precise_bn_images=32",
                              "--log.report_to=[]"])
    assert cfg.ema.enabled  # the smoke recipe's
    metrics = quality.run_tinydist(cfg, seed=0, detail=1)
    assert calls["train_step"] == 3  # 96 images / 32 per step, one epoch
    assert calls["apply_mix"] == 3 * 2  # every micro-batch: 2 per step
    assert calls["recompute_bn_statistics"] == 2  # the weights, then their average
    assert {"val/top1", "val_ema/top1"} <= set(metrics), metrics
    assert quality.top1_key(cfg) == "val/top1" and quality.top1_key(
        config.load_config(["--ema.enabled=true", "--export.weights=ema"])) == "val_ema/top1"


@pytest.mark.slow
def test_bench_quality_end_to_end(tmp_path, capsys):
    from tinydist.bench.quality import main

    code = main(["--seeds", "0", "--epochs", "3", f"--data.cache_dir={tmp_path}/cache", "--data.max_val_samples=150"])
    assert code == 0
    out = capsys.readouterr().out
    rows = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(tinydist|torchvision)\s+([\d.]+)\s+[\d.]+$", out, re.M)}
    assert set(rows) == {"tinydist", "torchvision"}, out
    assert all(acc > 50 for acc in rows.values()), out  # 10 digits: chance is 10%
    assert re.search(r"^verdict: tinydist - torchvision = [+-]\d+\.\d+ points", out, re.M), out
    assert re.search(r"^  tinydist seed 0: top-1 [\d.]+ \(\d+ s, raw [\d.]+, ema [\d.]+\)$", out, re.M), out


@pytest.mark.slow
def test_bench_quality_quick_runs_the_main_recipe_features(tmp_path, capsys):
    """`python -m tinydist.bench quality --quick`, with the main recipe's mix, EMA and PreciseBN switched on."""
    from tinydist.bench import suite

    code = suite.main(["quality", "--quick", f"--data.cache_dir={tmp_path}/cache", "--mix.cutmix_alpha=1.0",
                       "--mix.prob=0.5", "--eval.precise_bn_images=256", "--export.weights=ema"])
    assert code == 0
    out = capsys.readouterr().out
    assert "quick sizes" in out.splitlines()[0], out
    assert ("tinydist: the recipe as configured (train_step, validate): mix cutmix 1 / mixup 0, prob 0.5; EMA decay "
            "0.9998; PreciseBN 256 images;") in out, out
    assert re.search(r"^  tinydist seed 0: top-1 [\d.]+ \(\d+ s, raw [\d.]+, ema [\d.]+\)$", out, re.M), out
    assert re.search(r"^verdict: tinydist - torchvision = [+-]\d+\.\d+ points", out, re.M), out

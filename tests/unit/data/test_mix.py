"""tinydist.data.mix: batched CutMix / MixUp with per-micro-batch randomness and soft targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tinydist.config import MixConfig, load_config
from tinydist.data.augment import batch_generator
from tinydist.data.mix import INACTIVE, MixParams, apply_mix, draw_mix, mix_enabled, soft_cross_entropy
from tinydist.data.prefetch import Prefetcher
from tinydist.data.sampler import GlobalSampler

C = 10
BOTH = MixConfig(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.8, switch_prob=0.5)
CUTMIX = MixConfig(cutmix_alpha=1.0)
MIXUP = MixConfig(mixup_alpha=0.8)


def batch(n: int = 8, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, C, (n,), generator=g)


def draws_for(cfg: MixConfig, seeds: range, size: int = 16) -> list[MixParams]:
    return [draw_mix(cfg, 8, size, size, torch.Generator().manual_seed(s)) for s in seeds]


def test_mix_enabled_and_off_draws_nothing() -> None:
    assert not mix_enabled(MixConfig())
    assert not mix_enabled(MixConfig(mixup_alpha=0.8, prob=0.0))
    assert mix_enabled(MIXUP) and mix_enabled(CUTMIX) and mix_enabled(BOTH)
    g = torch.Generator().manual_seed(3)
    before = g.get_state()
    assert draw_mix(MixConfig(), 8, 16, 16, g) == MixParams(1.0, None, False)
    assert torch.equal(g.get_state(), before)


def test_same_seed_same_params_and_batches() -> None:
    x, y = batch()
    for index in range(20):
        a = draw_mix(BOTH, 8, 16, 16, batch_generator(7, 2, index))
        b = draw_mix(BOTH, 8, 16, 16, batch_generator(7, 2, index))
        assert a == b
        (xa, ta), (xb, tb) = apply_mix(x, y, a, C, 0.1), apply_mix(x, y, b, C, 0.1)
        assert torch.equal(xa, xb) and torch.equal(ta, tb)
    assert len({draw_mix(BOTH, 8, 16, 16, batch_generator(7, 2, i)) for i in range(20)}) > 1


@pytest.mark.parametrize("cfg,expected", [
    (BOTH, {(False, False), (True, False), (True, True)}),  # unmixed, MixUp, CutMix
    (CUTMIX, {(True, True)}),
    (MIXUP, {(True, False)}),
], ids=["both", "cutmix", "mixup"])
def test_generator_advances_by_one_draw_whatever_the_outcome(cfg: MixConfig, expected: set) -> None:
    outcomes = set()
    for seed in range(60):
        g = torch.Generator().manual_seed(seed)
        params = draw_mix(cfg, 8, 16, 16, g)
        outcomes.add((params.active, params.box is not None))
        replay = torch.Generator().manual_seed(seed)
        torch.randint(2 ** 63 - 1, (1,), generator=replay)
        assert torch.equal(g.get_state(), replay.get_state())
    assert outcomes == expected  # the check means something only if the outcomes did differ


def test_following_draws_do_not_depend_on_the_mix_config() -> None:
    for seed in range(10):
        after = []
        for cfg in (BOTH, CUTMIX, MIXUP, MixConfig(mixup_alpha=0.1, prob=0.3)):
            g = torch.Generator().manual_seed(seed)
            draw_mix(cfg, 8, 16, 16, g)
            after.append(torch.rand(4, generator=g))
        assert all(torch.equal(a, after[0]) for a in after)


def test_draws_follow_the_config() -> None:
    both = draws_for(BOTH, range(400))
    active = [p for p in both if p.active]
    assert 0.7 < len(active) / len(both) < 0.9  # prob 0.8
    assert 0.4 < sum(p.box is not None for p in active) / len(active) < 0.6  # switch_prob 0.5
    assert all(p.box is None and 0.0 <= p.lam <= 1.0 for p in draws_for(MIXUP, range(50)))
    assert all(p.active and p.box is not None for p in draws_for(CUTMIX, range(50)))
    assert all(p.box is not None for p in draws_for(MixConfig(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=1.0),
                                                    range(50)))
    assert not any(p.active for p in draws_for(MixConfig(cutmix_alpha=1.0, prob=1e-9), range(50)))


def test_cutmix_pastes_exactly_the_box_from_the_flipped_batch() -> None:
    x, y = batch(size=20)
    seen_clipped = False
    for params in draws_for(CUTMIX, range(40), size=20):
        top, left, bottom, right = params.box
        assert 0 <= top <= bottom <= 20 and 0 <= left <= right <= 20
        assert params.lam == pytest.approx(1 - (bottom - top) * (right - left) / 400, abs=1e-12)
        mixed, targets = apply_mix(x, y, params, C, 0.0)
        inside = torch.zeros(20, 20, dtype=torch.bool)
        inside[top:bottom, left:right] = True
        assert torch.equal(mixed[:, :, inside], x.flip(0)[:, :, inside])
        assert torch.equal(mixed[:, :, ~inside], x[:, :, ~inside])
        expected = params.lam * F.one_hot(y, C).float() + (1 - params.lam) * F.one_hot(y.flip(0), C).float()
        torch.testing.assert_close(targets, expected)
        seen_clipped |= min(top, left) == 0 or max(bottom, right) == 20
    assert seen_clipped  # lam corrected for clipped boxes was exercised


def test_mixup_blends_with_the_flipped_batch() -> None:
    x, y = batch()
    for params in draws_for(MIXUP, range(10)):
        mixed, targets = apply_mix(x, y, params, C, 0.1)
        torch.testing.assert_close(mixed, params.lam * x + (1 - params.lam) * x.flip(0))
        smooth = F.one_hot(y, C).float() * 0.9 + 0.01
        torch.testing.assert_close(targets, params.lam * smooth + (1 - params.lam) * smooth.flip(0))


def test_inactive_leaves_images_and_gives_smoothed_targets() -> None:
    x, y = batch()
    mixed, targets = apply_mix(x, y, MixParams(1.0, None, False), C, 0.1)
    assert torch.equal(mixed, x)
    torch.testing.assert_close(targets, F.one_hot(y, C).float() * 0.9 + 0.01)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_targets_are_distributions_and_inputs_untouched(smoothing: float) -> None:
    x, y = batch()
    x0 = x.clone()
    for params in draws_for(BOTH, range(20)):
        _, targets = apply_mix(x, y, params, C, smoothing)
        assert targets.dtype == torch.float32 and targets.shape == (8, C)
        torch.testing.assert_close(targets.sum(1), torch.ones(8))
        assert bool((targets >= 0).all())
    assert torch.equal(x, x0)


def test_channels_last_is_kept() -> None:
    x, y = batch()
    x = x.contiguous(memory_format=torch.channels_last)
    for params in (draws_for(CUTMIX, range(1))[0], draws_for(MIXUP, range(1))[0]):
        mixed, _ = apply_mix(x, y, params, C, 0.1)
        assert mixed.is_contiguous(memory_format=torch.channels_last)
        ref, _ = apply_mix(x.contiguous(), y, params, C, 0.1)
        torch.testing.assert_close(mixed, ref)


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_soft_cross_entropy_equals_label_smoothed_cross_entropy(smoothing: float) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, C, generator=g) * 3
    y = torch.randint(0, C, (16,), generator=g)
    _, targets = apply_mix(torch.zeros(16, 3, 4, 4), y, MixParams(1.0, None, False), C, smoothing)
    torch.testing.assert_close(soft_cross_entropy(logits, targets),
                               F.cross_entropy(logits, y, label_smoothing=smoothing))
    # Half-precision logits are scored in float32.
    torch.testing.assert_close(soft_cross_entropy(logits.bfloat16(), targets),
                               F.cross_entropy(logits.bfloat16().float(), y, label_smoothing=smoothing))


def test_a_micro_batch_mixes_the_same_whatever_else_is_mixed() -> None:
    """World-size independence: a rank mixing only micro-batch A gets what a rank holding A and B
    gets for A, because A's params come from A's own (seed, epoch, index) generator."""
    (xa, ya), (xb, yb) = batch(seed=1), batch(seed=2)
    for epoch in range(4):
        alone = apply_mix(xa, ya, draw_mix(BOTH, 8, 16, 16, batch_generator(5, epoch, 0)), C, 0.1)
        # Another process: one tensor holding both micro-batches, B drawn first, each mixed by its slice.
        both_x, both_y = torch.cat([xa, xb]), torch.cat([ya, yb])
        pb = draw_mix(BOTH, 8, 16, 16, batch_generator(5, epoch, 1))
        pa = draw_mix(BOTH, 8, 16, 16, batch_generator(5, epoch, 0))
        mixed_b = apply_mix(both_x[8:], both_y[8:], pb, C, 0.1)
        mixed_a = apply_mix(both_x[:8], both_y[:8], pa, C, 0.1)
        assert torch.equal(alone[0], mixed_a[0]) and torch.equal(alone[1], mixed_a[1])
        assert not torch.equal(mixed_b[0], alone[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_without_host_sync() -> None:
    x, y = batch()
    for params in draws_for(BOTH, range(10)):
        cpu = apply_mix(x, y, params, C, 0.1)
        xg, yg = x.cuda(), y.cuda()
        torch.cuda.set_sync_debug_mode("error")  # mixing must never make the host wait for the GPU
        try:
            gpu = apply_mix(xg, yg, params, C, 0.1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert gpu[0].device.type == "cuda" and gpu[1].device.type == "cuda"
        torch.testing.assert_close(gpu[0].cpu(), cpu[0])
        torch.testing.assert_close(gpu[1].cpu(), cpu[1])


class Pixels:
    """What the prefetcher reads of a decoded cache: gather(rows) and labels."""

    def __init__(self, n: int = 32, side: int = 8) -> None:
        self.pixels = np.random.default_rng(0).integers(0, 256, (n, side, side, 3), dtype=np.uint8)
        self.labels = np.arange(n, dtype=np.int64) % C

    def __len__(self) -> int:
        return len(self.labels)

    def gather(self, rows: np.ndarray) -> np.ndarray:
        return self.pixels[rows]


@pytest.mark.parametrize("mixing", [[], ["--mix.cutmix_alpha=1.0"]], ids=["mix off", "cutmix"])
def test_the_loop_s_prefetcher_draws_a_mix_only_when_the_config_turns_one_on(mixing: list[str]) -> None:
    cfg = load_config(["--train.global_batch_size=8", "--train.micro_batch_size=4", "--train.seed=3",
                       "--data.crop_scale=[0.5,1.0]", "--data.hflip=false", *mixing])
    data, cpu = Pixels(), torch.device("cpu")
    sampler = GlobalSampler.from_config(cfg, len(data))
    from_config = Prefetcher.from_config(cfg, data, sampler, 0, 2, cpu)
    explicit = Prefetcher(data, sampler, 0, 2, cpu, 3, [0.5, 1.0], False, cfg.mix if mixing else None)
    configured, direct = ([prefetcher.next() for _ in range(4)] for prefetcher in (from_config, explicit))
    for a, b in zip(configured, direct):
        assert (a.step, a.index) == (b.step, b.index) and torch.equal(a.images, b.images)
        assert torch.equal(a.theta, b.theta) and a.mix.active == b.mix.active and a.mix.lam == b.mix.lam
    assert all(item.mix.active == bool(mixing) for item in configured)
    assert mixing or all(item.mix is INACTIVE for item in configured)  # off: nothing drawn for it

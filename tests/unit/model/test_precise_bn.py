"""tinydist.model.precise_bn: BN statistics recomputed over fixed images, the same on any number of ranks."""

from __future__ import annotations

import numpy as np
import torch

from tinydist.config import ModelConfig, load_config
from tinydist.data.augment import eval_transform
from tinydist.model.build import build_model
from tinydist.model.precise_bn import PreciseBN, precise_bn_indices, recompute_bn_statistics


class Images:
    """The two things precise_bn reads of a decoded cache: gather(rows) and labels."""

    def __init__(self, n: int = 96, side: int = 16, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.pixels = rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)
        self.pixels[: n // 2] //= 3  # two populations: batch statistics differ from batch to batch
        self.labels = rng.integers(0, 10, n)

    def __len__(self) -> int:
        return len(self.pixels)

    def gather(self, rows: np.ndarray) -> np.ndarray:
        return self.pixels[rows]


def model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(stem="imagenet", channels_last=False), 10)


def test_the_image_choice_is_fixed_by_the_seed_and_cut_into_whole_batches() -> None:
    a, b = precise_bn_indices(1000, 600, seed=3), precise_bn_indices(1000, 600, seed=3)
    assert [len(x) for x in a] == [256, 256] and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert len(set(np.concatenate(a).tolist())) == 512
    assert not np.array_equal(np.concatenate(a), np.concatenate(precise_bn_indices(1000, 600, seed=4)))
    assert [len(x) for x in precise_bn_indices(50, 4096, seed=0)] == [50]  # fewer images than asked: all of them


def test_statistics_are_the_average_of_the_batch_statistics() -> None:
    data, net = Images(), model()
    net.bn1.running_mean.fill_(123.0)  # lagging statistics, as at a high learning rate
    tracked = net.bn1.num_batches_tracked.clone()
    batches = recompute_bn_statistics(net, data, 64, seed=0, device=torch.device("cpu"), channels_last=False)
    assert batches == 1
    rows = precise_bn_indices(len(data), 64, 0)[0]
    x = net.conv1(eval_transform(torch.from_numpy(data.gather(rows)), channels_last=False))
    torch.testing.assert_close(net.bn1.running_mean, x.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(net.bn1.running_var, x.var((0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-5)
    assert torch.equal(net.bn1.num_batches_tracked, tracked)
    assert net.training  # build_model's mode, restored
    net.eval()
    recompute_bn_statistics(net, data, 64, seed=0, device=torch.device("cpu"), channels_last=False)
    assert not net.training


def test_two_ranks_give_the_one_rank_statistics() -> None:
    """Rank r takes batches r, r+2, ...; the sums are all-reduced: simulated here by handing rank 0
    the sum of what rank 1 reduced."""
    data = Images(n=96)
    one = model()
    recompute_bn_statistics(one, data, 96, seed=0, device=torch.device("cpu"), channels_last=False)
    # 96 images in batches of 96: one batch; make it several by asking precise_bn for a smaller BATCH.
    import tinydist.model.precise_bn as precise_bn

    original = precise_bn.BATCH
    precise_bn.BATCH = 16
    try:
        reference = model()
        recompute_bn_statistics(reference, data, 96, seed=0, device=torch.device("cpu"), channels_last=False)
        captured: list[torch.Tensor] = []
        rank1 = model()
        recompute_bn_statistics(rank1, data, 96, seed=0, device=torch.device("cpu"), world_size=2, rank=1,
                                reduce=lambda t: captured.append(t.clone()) or t, channels_last=False)
        rank0 = model()
        recompute_bn_statistics(rank0, data, 96, seed=0, device=torch.device("cpu"), world_size=2, rank=0,
                                reduce=lambda t: t + captured[0], channels_last=False)
    finally:
        precise_bn.BATCH = original
    for name, value in reference.state_dict().items():
        if name.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(rank0.state_dict()[name], value, rtol=1e-6, atol=1e-7)
    # and the 6-batch average is not the 1-batch one: the batching is part of the definition
    assert not torch.allclose(reference.bn1.running_var, one.bn1.running_var)


def test_from_config_is_the_run_s_precise_bn_and_off_at_zero_images() -> None:
    cfg = load_config(["--eval.precise_bn_images=64", "--train.seed=5", "--model.channels_last=false"])
    assert PreciseBN.from_config(cfg) == PreciseBN(images=64, seed=5, channels_last=False)
    data, configured, direct = Images(), model(), model()
    assert PreciseBN.from_config(cfg).recompute(configured, data, torch.device("cpu")) == 1
    recompute_bn_statistics(direct, data, 64, seed=5, device=torch.device("cpu"), channels_last=False)
    assert all(torch.equal(a, b) for a, b in zip(configured.buffers(), direct.buffers()))
    untouched, before = model(), model()
    assert PreciseBN(images=0, seed=5).recompute(untouched, data, torch.device("cpu")) == 0
    assert all(torch.equal(a, b) for a, b in zip(untouched.buffers(), before.buffers()))

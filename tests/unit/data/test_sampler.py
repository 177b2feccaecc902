"""tinydist.data.sampler: exactly-once epochs, O(1) seek, world-size independence, (seed, epoch) permutations."""

from __future__ import annotations

import numpy as np
import pytest

from tinydist.config import ConfigError, load_config
from tinydist.data.sampler import GlobalSampler, eval_shard


def step_by_global_index(num_samples, global_batch, micro_batch, world_size, step, seed=0):
    """{global micro index: (epoch, rows)} of one optimizer step, gathered from every rank."""
    out = {}
    for rank in range(world_size):
        sampler = GlobalSampler(num_samples, global_batch, micro_batch, world_size, rank, seed)
        for accumulation_step, mb in enumerate(sampler.rank_micro_batches(step)):
            # micro-batch m of the step goes to rank m % world at accumulation step m // world
            m = mb.index - step * (global_batch // micro_batch)
            assert (m % world_size, m // world_size) == (rank, accumulation_step)
            assert mb.index not in out
            assert len(mb.indices) == micro_batch
            out[mb.index] = (mb.epoch, mb.indices.tolist())
    return out


@pytest.mark.parametrize("num_samples", [64, 50, 7])  # a multiple of the global batch, not one, smaller than one
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_every_epoch_is_seen_exactly_once(num_samples, world_size):
    global_batch, micro_batch = 16, 2
    epochs = 3
    steps = -(-epochs * num_samples // global_batch) + 1  # enough steps to cover the epochs
    stream = {}
    for step in range(steps):
        stream.update(step_by_global_index(num_samples, global_batch, micro_batch, world_size, step, seed=5))
    # the micro-batches of all steps and ranks tile the stream: indices 0..K-1, no gap, no repeat
    assert sorted(stream) == list(range(steps * global_batch // micro_batch))
    rows = np.concatenate([np.array(stream[i][1]) for i in sorted(stream)])
    reference = GlobalSampler(num_samples, global_batch, micro_batch, seed=5)
    for epoch in range(epochs):
        window = rows[epoch * num_samples:(epoch + 1) * num_samples]
        assert sorted(window.tolist()) == list(range(num_samples))  # each image exactly once
        assert np.array_equal(window, reference.permutation(epoch))
    for i, (epoch, _) in stream.items():  # a micro-batch's epoch is that of its first image
        assert epoch == i * micro_batch // num_samples
    if num_samples % global_batch:  # epochs share a step rather than end on a short batch
        assert {e for e, _ in stream.values()} >= {0, 1, 2}


def test_an_epoch_boundary_inside_a_micro_batch():
    sampler = GlobalSampler(num_samples=10, global_batch=8, micro_batch=4, seed=1)
    mb = sampler.micro_batch_at(2)  # stream positions 8..11: two rows of epoch 0, two of epoch 1
    assert mb.epoch == 0
    assert mb.indices.tolist() == sampler.permutation(0)[8:].tolist() + sampler.permutation(1)[:2].tolist()


class RecordingSampler(GlobalSampler):
    """Records which epochs' permutations are drawn."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.drawn: list[int] = []

    def permutation(self, epoch):
        self.drawn.append(epoch)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)


@pytest.mark.parametrize("world_size, rank", [(1, 0), (2, 1), (4, 2)])
def test_seek_is_direct_and_equals_iterating_from_step_zero(world_size, rank):
    n, global_batch, micro_batch = 45, 12, 3
    walker = GlobalSampler(n, global_batch, micro_batch, world_size, rank, seed=9)
    walked = {step: [(mb.index, mb.epoch, mb.indices.tolist()) for mb in walker.rank_micro_batches(step)]
              for step in range(40)}  # ~10 epochs, stepped through in order
    for step in (0, 1, 3, 4, 17, 39):
        fresh = GlobalSampler(n, global_batch, micro_batch, world_size, rank, seed=9)
        direct = [(mb.index, mb.epoch, mb.indices.tolist()) for mb in fresh.rank_micro_batches(step)]
        assert direct == walked[step]
    # O(1): seeking far ahead draws only the permutation(s) of the epoch(s) it lands in
    far = RecordingSampler(n, global_batch, micro_batch, world_size, rank, seed=9)
    step = 10**9
    batches = list(far.rank_micro_batches(step))
    first, last = step * global_batch // n, ((step + 1) * global_batch - 1) // n
    assert set(far.drawn) <= {first, last} and first in far.drawn
    assert all(len(mb.indices) == micro_batch and 0 <= mb.indices.min() and mb.indices.max() < n for mb in batches)


@pytest.mark.parametrize("num_samples", [96, 100])
def test_a_step_is_the_same_global_micro_batches_on_1_2_and_4_ranks(num_samples):
    global_batch, micro_batch = 32, 4
    for step in (0, 2, 3, 7, 1000):
        one, two, four = (step_by_global_index(num_samples, global_batch, micro_batch, w, step, seed=3) for w in (1, 2, 4))
        assert one == two == four
        assert len(one) == global_batch // micro_batch
    # and a step is not the previous one again
    assert step_by_global_index(num_samples, global_batch, micro_batch, 2, 0) != \
        step_by_global_index(num_samples, global_batch, micro_batch, 2, 1)


def test_permutation_depends_on_seed_and_epoch_only():
    a = GlobalSampler(200, 32, 8, world_size=1, rank=0, seed=11)
    b = GlobalSampler(200, 64, 16, world_size=4, rank=3, seed=11)
    for epoch in (0, 1, 5):
        assert np.array_equal(a.permutation(epoch), b.permutation(epoch))
        assert sorted(a.permutation(epoch).tolist()) == list(range(200))
    assert not np.array_equal(a.permutation(0), a.permutation(1))
    assert not np.array_equal(a.permutation(0), GlobalSampler(200, 32, 8, seed=12).permutation(0))
    assert not np.array_equal(a.permutation(0), np.arange(200))
    # a pure function: the same on a fresh object, asked in another order
    c = GlobalSampler(200, 32, 8, seed=11)
    assert np.array_equal(c.permutation(5), a.permutation(5)) and np.array_equal(c.permutation(0), a.permutation(0))


def test_epoch_at_and_steps_per_epoch():
    sampler = GlobalSampler(1000, 64, 16)
    assert sampler.steps_per_epoch == pytest.approx(1000 / 64)
    assert sampler.epoch_at(0) == 0 and sampler.epoch_at(125) == pytest.approx(8.0)


def test_empty_training_split_is_an_error():
    with pytest.raises(ConfigError):
        GlobalSampler(0, 8, 8)


@pytest.mark.parametrize("num_samples, batch_size, world_size", [(10, 3, 1), (10, 3, 4), (3, 2, 4), (1000, 256, 8)])
def test_eval_shards_cover_every_row_once(num_samples, batch_size, world_size):
    rows = []
    for rank in range(world_size):
        for batch in eval_shard(num_samples, batch_size, world_size, rank):
            assert 0 < len(batch) <= batch_size
            rows += batch.tolist()
    assert rows == list(range(num_samples))


def test_from_config_is_the_run_s_sampler():
    cfg = load_config(["--train.global_batch_size=16", "--train.micro_batch_size=4", "--train.seed=7"])
    configured, direct = GlobalSampler.from_config(cfg, 100, world_size=2, rank=1), GlobalSampler(100, 16, 4, 2, 1, 7)
    assert (configured.global_batch, configured.micro_batch, configured.seed, configured.accumulation) == (16, 4, 7, 2)
    assert all(np.array_equal(a.indices, b.indices)
               for a, b in zip(configured.rank_micro_batches(9), direct.rank_micro_batches(9)))

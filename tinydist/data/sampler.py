"""Which images each process trains on at each optimizer step (docs/design.md, principles 1 and 2).

The training data is one endless stream: epoch e contributes a permutation drawn from (seed, e),
and epochs follow each other. Optimizer step s consumes stream positions
[s * global_batch, (s + 1) * global_batch), cut into global micro-batches of `micro_batch`.
Global micro-batch m of a step goes to rank m % world at accumulation step m // world.

So the position in training is one integer, seeking is O(1), every image of an epoch is seen
exactly once, and a step is the same set of micro-batches whatever the world size. An epoch whose
size is not a multiple of the global batch shares its last step with the start of the next one,
rather than ending on a short batch whose size would depend on nothing but the remainder.
"""

from __future__ import annotations

import functools
from typing import Iterator, NamedTuple

import numpy as np

from tinydist.config import Config, ConfigError, accumulation_steps


class MicroBatch(NamedTuple):
    index: int  # global micro-batch index: step * micro_batches_per_step + m
    epoch: int  # epoch of its first image
    indices: np.ndarray  # dataset rows


class GlobalSampler:
    def __init__(self, num_samples: int, global_batch: int, micro_batch: int, world_size: int = 1,
                 rank: int = 0, seed: int = 0):
        if num_samples <= 0:
            raise ConfigError("the training split is empty")
        self.num_samples, self.global_batch, self.micro_batch = num_samples, global_batch, micro_batch
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.accumulation = accumulation_steps(global_batch, micro_batch, world_size)
        self.micro_batches_per_step = global_batch // micro_batch

    @classmethod
    def from_config(cls, cfg: Config, num_samples: int, world_size: int = 1, rank: int = 0) -> GlobalSampler:
        """The run's: `train.global_batch_size` images per step, in micro-batches of `train.micro_batch_size`,
        in the order drawn from `train.seed`."""
        return cls(num_samples, cfg.train.global_batch_size, cfg.train.micro_batch_size, world_size, rank,
                   cfg.train.seed)

    @property
    def steps_per_epoch(self) -> float:
        return self.num_samples / self.global_batch

    @functools.lru_cache(maxsize=4)
    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def epoch_at(self, step: int) -> float:
        """Epochs completed after `step` optimizer steps (fractional)."""
        return step * self.global_batch / self.num_samples

    def stream(self, start: int, length: int) -> np.ndarray:
        """Dataset rows at stream positions [start, start + length)."""
        parts = []
        while length > 0:
            epoch, offset = divmod(start, self.num_samples)
            take = min(length, self.num_samples - offset)
            parts.append(self.permutation(epoch)[offset:offset + take])
            start, length = start + take, length - take
        return np.concatenate(parts)

    def micro_batch_at(self, index: int) -> MicroBatch:
        start = index * self.micro_batch
        return MicroBatch(index, start // self.num_samples, self.stream(start, self.micro_batch))

    def rank_micro_batches(self, step: int) -> Iterator[MicroBatch]:
        """This rank's micro-batches of optimizer step `step`, in accumulation order."""
        first = step * self.micro_batches_per_step
        for a in range(self.accumulation):
            yield self.micro_batch_at(first + a * self.world_size + self.rank)


def eval_shard(num_samples: int, batch_size: int, world_size: int, rank: int) -> Iterator[np.ndarray]:
    """Contiguous validation batches of this rank: every row exactly once across ranks, no padding."""
    lo = num_samples * rank // world_size
    hi = num_samples * (rank + 1) // world_size
    for start in range(lo, hi, batch_size):
        yield np.arange(start, min(start + batch_size, hi))

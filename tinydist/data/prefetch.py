"""Input that is ready before the loop asks for it: on a GPU the next micro-batches are gathered from
the decoded cache, their crop (and CutMix / MixUp) parameters drawn, and everything copied to the
device (pinned, non-blocking, on a side CUDA stream) by a thread, while the current micro-batch
computes. On the CPU the same steps run in line (a thread there competes with the compute for the
same cores).

What the loop then does per micro-batch on the device is the crop + flip + normalise (augment.py),
the mix (mix.py) and the model. The thread only reads: the cache, the sampler (pure functions of the
step), and the seeded generator (a pure function of seed, epoch and micro-batch index), so the data
a step sees is the same with or without it, on any device and after any resume.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterator, NamedTuple, Optional, Sequence

import torch

from tinydist.config import Config, MixConfig
from tinydist.data.augment import batch_generator, crop_flip_params
from tinydist.data.mix import INACTIVE, MixParams, draw_mix, mix_enabled
from tinydist.data.sampler import GlobalSampler


class Ready(NamedTuple):
    step: int  # the optimizer step this micro-batch belongs to
    index: int  # its global micro-batch index (see sampler.py)
    images: torch.Tensor  # (B, S, S, 3) uint8 on the device
    labels: torch.Tensor  # (B,) int64 on the device
    theta: torch.Tensor  # (B, 2, 3) crop + flip parameters on the device
    ready: Optional[Any]  # CUDA event after which the copies are done; None on the CPU
    mix: MixParams = INACTIVE  # CutMix/MixUp drawn for it (mix.py), from the same generator, after the crops


class Prefetcher:
    """Iterate the micro-batches of this rank for steps [start, stop), `depth` micro-batches ahead."""

    def __init__(self, data: Any, sampler: GlobalSampler, start: int, stop: int, device: torch.device, seed: int,
                 crop_scale: Sequence[float], hflip: bool, mix: Optional[MixConfig] = None, depth: int = 2) -> None:
        self.data, self.sampler, self.device, self.mix = data, sampler, device, mix
        self.seed, self.scale, self.hflip = seed, (crop_scale[0], crop_scale[1]), hflip
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # On a GPU the host is idle while the device computes: preparing ahead is free. On the CPU the
        # thread would take cores (and the GIL) from the compute itself: measured slower, so there the
        # same work is done in line, when the loop asks.
        self._inline = self._stream is None
        self._pending = self._items(start, stop) if self._inline else None
        self._thread = None
        if not self._inline:
            self._thread = threading.Thread(target=self._produce, args=(start, stop), name="tinydist-prefetch",
                                            daemon=True)
            self._thread.start()

    @classmethod
    def from_config(cls, cfg: Config, data: Any, sampler: GlobalSampler, start: int, stop: int,
                    device: torch.device) -> Prefetcher:
        """The training loop's: crops and flips as `data` says, drawn from `train.seed`, and CutMix /
        MixUp only when `mix` turns one on (off, nothing is drawn for it)."""
        return cls(data, sampler, start, stop, device, cfg.train.seed, cfg.data.crop_scale, cfg.data.hflip,
                   cfg.mix if mix_enabled(cfg.mix) else None)

    def _load(self, step: int, micro: Any) -> Ready:
        pixels, labels = self.data.gather(micro.indices), self.data.labels[micro.indices]
        n, height, width, _ = pixels.shape
        generator = batch_generator(self.seed, micro.epoch, micro.index)
        theta = crop_flip_params(n, height, width, generator, self.scale, hflip=self.hflip)
        mix = draw_mix(self.mix, n, height, width, generator) if self.mix is not None else INACTIVE
        host = (torch.from_numpy(pixels), torch.from_numpy(labels), theta)
        if self._stream is None:
            return Ready(step, micro.index, *host, None, mix)
        with torch.cuda.stream(self._stream):
            images, targets, thetas = (t.pin_memory().to(self.device, non_blocking=True) for t in host)
            event = torch.cuda.Event()
            event.record(self._stream)
        return Ready(step, micro.index, images, targets, thetas, event, mix)

    def _items(self, start: int, stop: int) -> Iterator[Ready]:
        for step in range(start, stop):
            for micro in self.sampler.rank_micro_batches(step):
                yield self._load(step, micro)

    def _produce(self, start: int, stop: int) -> None:
        try:
            for item in self._items(start, stop):
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the loop, which raises it where it waits
            self._queue.put(e)

    def next(self) -> Ready:
        """The next micro-batch, in order; on a GPU the current stream waits for its copies, not the host."""
        if self._pending is not None:
            return next(self._pending)
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        if item.ready is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(item.ready)
            for tensor in (item.images, item.labels, item.theta):  # used on this stream: keep their memory
                tensor.record_stream(stream)
        return item

    def close(self) -> None:
        self._stop.set()
        if self._thread is None:
            return
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=10)

    def __iter__(self) -> Iterator[Ready]:
        while True:
            yield self.next()

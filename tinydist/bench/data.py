"""`bench data`: the input pipeline. The decoded uint8 cache + batched augmentation on the device vs the
seed report's per-image pipeline (PIL decode and torchvision transforms in DataLoader workers)."""

from __future__ import annotations

import io
import os
import statistics
import time
from typing import Sequence

import datasets
import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from tinydist import config as config_lib
from tinydist.bench.common import interleaved, quiet, sync, timed, verdict
from tinydist.data.augment import IMAGENET_MEAN, IMAGENET_STD, to_device, train_transform
from tinydist.data.cache import load_split


class JpegDataset(torch.utils.data.Dataset):
    """The seed report's pipeline: decode and augment one JPEG at a time in DataLoader workers."""

    def __init__(self, images: Sequence[bytes], labels: Sequence[int]):
        self.images, self.labels = images, labels
        self.transform = T.Compose([T.RandomResizedCrop(64), T.RandomHorizontalFlip(), T.ToTensor(),
                                    T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(io.BytesIO(self.images[i])) as im:
            return self.transform(im.convert("RGB")), self.labels[i]


def make_jpeg_source(folder: str, n: int) -> tuple[list[bytes], list[int]]:
    """n 64x64 JPEGs in the hub's layout (data/{train,valid}-00000-of-00001.parquet). Upsampled noise is
    smooth like photos, so sizes and decode cost are realistic; 1 in 50 is grayscale, like ~2% of Tiny ImageNet."""
    rng, out = np.random.default_rng(0), {}
    classes = datasets.ClassLabel(names=[f"n{c:08d}" for c in range(200)])
    features = datasets.Features({"image": datasets.Image(), "label": classes})
    os.makedirs(os.path.join(folder, "data"))
    for split, count in (("train", n), ("valid", 64)):
        images = []
        for i in range(count):
            im = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).resize((64, 64), Image.BICUBIC)
            buf = io.BytesIO()
            (im.convert("L") if i % 50 == 0 else im).save(buf, "JPEG", quality=90)
            images.append(buf.getvalue())
        labels = rng.integers(0, 200, count).tolist()
        datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in images], "label": labels},
                                   features=features).to_parquet(f"{folder}/data/{split}-00000-of-00001.parquet")
        out[split] = (images, labels)
    return out["train"]


def bench_data(tmp: str, quick: bool, device: torch.device) -> None:
    """Decoded uint8 cache + batched augmentation on the device vs the seed's per-image PIL DataLoader."""
    n, batch, batches, repeats = (512, 256, 2, 1) if quick else (2000, 256, 16, 5)
    workers, folder = os.cpu_count() or 1, os.path.join(tmp, "jpeg-source")
    with quiet():
        images, labels = make_jpeg_source(folder, n)
        t0 = time.perf_counter()  # decode once: the design's one-off cost, not part of the per-batch figure
        cache = load_split(config_lib.DataConfig(source=folder, cache_dir=f"{tmp}/cache"), "train", log=print)
        build_s = time.perf_counter() - t0
    rng, index = np.random.default_rng(0), iter(range(10**9))

    def ours() -> None:
        for _ in range(batches):
            rows = rng.integers(0, len(cache), batch)
            x, y = to_device(cache.gather(rows), cache.labels[rows], device)
            x = train_transform(x, 0, 0, next(index))  # fresh crops per batch, as in the loop
        sync(device)

    dataset = JpegDataset(images, labels)
    # A fixed-length sampler and persistent workers: a timed pass is `batches` steady-state batches,
    # not a worker start-up (which a real epoch of 100k images amortises).
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=True,
        sampler=torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=batch * batches))

    def seed_pipeline() -> None:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        sync(device)

    ours(), seed_pipeline()  # warm-up: allocator, page cache, worker start-up
    t_ours, t_seed = interleaved([lambda: timed(ours), lambda: timed(seed_pipeline)], repeats)
    repeats = len(t_ours)
    del loader  # stops the persistent workers
    ours_ips, seed_ips = (batch * batches / statistics.median(t) for t in (t_ours, t_seed))
    ratio = verdict(quick, "ratio", f"{ours_ips / seed_ips:.1f}x", ">= 5")
    print(f"data: tinydist {ours_ips:.0f} img/s vs per-image PIL pipeline {seed_ips:.0f} img/s "
          f"{ratio} [batch {batch}, {n} 64x64 JPEGs, {device.type}; ours: uint8 cache "
          f"gather + to_device + train_transform, {torch.get_num_threads()} torch threads, one-off cache build "
          f"({build_s:.1f} s) excluded by design; baseline: DataLoader, {workers} workers; median of {repeats}]")

"""The runs `bench gpu` times: its sizes, the synthetic source, tinydist's real loop (`python -m tinydist.train`
in a subprocess, so every step is train_step), the bare PyTorch loop it is compared with, and the input
pipeline alone."""

from __future__ import annotations

import io
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from tinydist import config as config_lib
from tinydist.bench.common import MAIN_RECIPE, free_device_memory, subprocess_env, sync
from tinydist.data.augment import IMAGENET_MEAN, IMAGENET_STD, augment, batch_generator, crop_flip_params
from tinydist.data.prefetch import Prefetcher
from tinydist.data.sampler import GlobalSampler
from tinydist.model.build import build_model


# ---- sizes -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    image_size: int
    num_classes: int
    global_batch: int
    micro_batch: int
    train_images: int  # > max_steps x global batch: no epoch ends (eval + save) inside the measured steps
    val_images: int
    unique_images: int  # distinct JPEGs, repeated to train_images rows (content does not change the speed)
    max_steps: int  # of each real run
    log_every: int  # metrics window, in steps
    warmup_windows: int  # windows dropped: compile, cuDNN set-up, allocator growth
    bare_warmup_steps: int
    bare_steps: int  # per timed block of the bare loop
    bare_blocks: int
    pipeline_steps: int  # per timed block of the input pipeline
    pipeline_blocks: int
    checkpoint_repeats: int
    run_timeout_s: float  # each real-loop subprocess

    @property
    def accumulation(self) -> int:
        return self.global_batch // self.micro_batch


def gpu_sizes(quick: bool, device: torch.device) -> Sizes:
    """The main recipe's shapes. Micro batch 512 needs ~15 GB with bf16; below 40 GB, 256 x 2."""
    total = torch.cuda.get_device_properties(device).total_memory
    micro = 512 if total >= 40 * 2**30 else 256
    if quick:
        return Sizes(64, 200, 512, micro, train_images=16 * 512, val_images=512, unique_images=1024, max_steps=12,
                     log_every=3, warmup_windows=2, bare_warmup_steps=3, bare_steps=5, bare_blocks=2,
                     pipeline_steps=4, pipeline_blocks=2, checkpoint_repeats=1, run_timeout_s=420)
    return Sizes(64, 200, 512, micro, train_images=88 * 512, val_images=512, unique_images=2048, max_steps=80,
                 log_every=10, warmup_windows=2, bare_warmup_steps=5, bare_steps=10, bare_blocks=3,
                 pipeline_steps=10, pipeline_blocks=3, checkpoint_repeats=3, run_timeout_s=420)


def smoke_sizes() -> Sizes:
    """Tiny shapes for a forced run on the CPU (`_force_device`): checks the code runs, nothing more."""
    return Sizes(16, 200, 16, 8, train_images=12 * 16, val_images=32, unique_images=64, max_steps=6, log_every=2,
                 warmup_windows=1, bare_warmup_steps=2, bare_steps=2, bare_blocks=2, pipeline_steps=2,
                 pipeline_blocks=2, checkpoint_repeats=1, run_timeout_s=900)


# ---- the synthetic dataset -----------------------------------------------------------------------------------


def make_source(folder: str, sizes: Sizes) -> None:
    """A `save_to_disk` DatasetDict (train, valid) of 64x64 JPEGs in `num_classes` classes, random labels.
    Upsampled noise is smooth like photos; a few distinct images are repeated: the loop never looks."""
    import datasets
    from PIL import Image

    rng, side = np.random.default_rng(0), sizes.image_size
    unique = []
    for _ in range(sizes.unique_images):
        small = rng.integers(0, 256, (max(side // 4, 1), max(side // 4, 1), 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize((side, side), Image.BICUBIC).save(buf, "JPEG", quality=90)
        unique.append(buf.getvalue())
    classes = datasets.ClassLabel(names=[f"n{c:08d}" for c in range(sizes.num_classes)])
    features = datasets.Features({"image": datasets.Image(), "label": classes})
    splits = {}
    for split, n in (("train", sizes.train_images), ("valid", sizes.val_images)):
        picks = rng.integers(0, len(unique), n)
        splits[split] = datasets.Dataset.from_dict(
            {"image": [{"bytes": unique[i], "path": None} for i in picks],
             "label": rng.integers(0, sizes.num_classes, n).tolist()}, features=features)
    datasets.DatasetDict(splits).save_to_disk(folder)


def loop_args(source: str, cache_dir: str, sizes: Sizes) -> list[str]:
    """The main recipe, on the synthetic source, with no checkpoint, eval or tracker inside the measured steps."""
    return ["--config", MAIN_RECIPE, f"--data.source={source}", f"--data.cache_dir={cache_dir}",
            f"--data.image_size={sizes.image_size}", "--model.stem=cifar", "--model.channels_last=true",
            f"--train.global_batch_size={sizes.global_batch}", f"--train.micro_batch_size={sizes.micro_batch}",
            f"--train.eval_batch_size={min(sizes.val_images, 512)}", "--checkpoint.every_steps=0",
            "--log.report_to=[]", f"--log.every_steps={sizes.log_every}",
            "--preemption.notice='off'"]  # quoted: a bare `off` is YAML for False


# ---- tinydist's real loop: `python -m tinydist.train` in a subprocess -------------------------------------------


@dataclass
class RealRun:
    images_per_s: float  # median of the windows after warm-up
    windows: list[float]
    first_window_s: float  # compile (if any) and start-up of the loop
    wall_s: float  # the whole process: start-up, data open, steps, final eval, save and export
    banner: str  # "tinydist: 1 process(es), device cuda, precision bf16"
    rebuilt_cache: bool  # the process decoded the images again (its timing windows are unaffected)


def run_real_loop(tmp: str, args: Sequence[str], sizes: Sizes, compiled: bool, device: torch.device,
                  precision: str) -> RealRun:
    out = os.path.join(tmp, f"loop-{'compiled' if compiled else 'eager'}")
    cmd = [sys.executable, "-m", "tinydist.train", *args, f"--model.compile={str(compiled).lower()}",
           f"--train.max_steps={sizes.max_steps}", f"--train.output_dir={out}", "--checkpoint.resume=never"]
    env = subprocess_env(ACCELERATE_MIXED_PRECISION=precision, TQDM_DISABLE="1")
    log_path = f"{out}.log"
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=sizes.run_timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the process we started and its children
            proc.wait()
            code = None
    wall = time.perf_counter() - t0
    with open(log_path, errors="replace") as f:
        output = f.read()
    if code != 0:
        why = f"ran past {sizes.run_timeout_s:g} s" if code is None else f"exited {code}"
        raise RuntimeError(f"`{' '.join(cmd)}` {why}; its output ends:\n{output[-4000:]}")
    banner = next((line.strip() for line in output.splitlines() if line.startswith("tinydist: ")), "")
    want = f"device {device.type}, precision {precision}"
    if want not in banner:
        raise RuntimeError(f"the real loop did not run with {want}: its banner says {banner!r}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    windows = [r["train/images_per_s"] for r in records if "train/images_per_s" in r]
    measured = windows[sizes.warmup_windows:]
    if not measured:
        raise RuntimeError(f"the real loop logged {len(windows)} windows; expected more than {sizes.warmup_windows}")
    first_window_s = sizes.log_every * sizes.global_batch / windows[0]
    rebuilt = any(line.startswith("decoding ") for line in output.splitlines())
    return RealRun(statistics.median(measured), measured, first_window_s, wall, banner, rebuilt)


# ---- the bare loop, in this process -------------------------------------------------------------------------


@dataclass
class BareRun:
    images_per_s: float
    first_step_s: float  # compile (if any)
    peak_gib: float  # peak device memory (CUDA only)


def run_bare_loop(sizes: Sizes, compiled: bool, device: torch.device, precision: str) -> BareRun:
    """uint8 batches resident on the device -> float, normalised, channels_last -> model (compiled or not) under
    autocast -> cross-entropy (label smoothing 0.1, in float32) -> backward -> SGD nesterov step. No augmentation,
    no sampler, no logging: the least a loop can do with the same model, batch and precision."""
    torch.manual_seed(0)
    model = build_model(config_lib.ModelConfig(stem="cifar"), sizes.num_classes)
    model = model.to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    forward = torch.compile(model) if compiled else model
    generator = torch.Generator().manual_seed(0)
    side, micro, accumulation = sizes.image_size, sizes.micro_batch, sizes.accumulation
    pool = max(2, accumulation)  # a few distinct batches, cycled
    images = [torch.randint(0, 256, (micro, side, side, 3), dtype=torch.uint8, generator=generator).to(device)
              for _ in range(pool)]
    labels = [torch.randint(0, sizes.num_classes, (micro,), generator=generator).to(device) for _ in range(pool)]
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
    autocast_dtype = torch.bfloat16 if precision == "bf16" else None
    counter = iter(range(10**9))

    def step() -> None:
        for _ in range(accumulation):
            i = next(counter) % pool
            x = ((images[i].permute(0, 3, 1, 2).float() - mean) / std).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = forward(x)
            loss = F.cross_entropy(logits.float(), labels[i], label_smoothing=0.1)
            (loss / accumulation if accumulation > 1 else loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    step()
    sync(device)
    first_step_s = time.perf_counter() - t0
    for _ in range(sizes.bare_warmup_steps - 1):
        step()
    sync(device)
    blocks = []
    for _ in range(sizes.bare_blocks):
        t0 = time.perf_counter()
        for _ in range(sizes.bare_steps):
            step()
        sync(device)
        blocks.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    del forward, model, optimizer, images, labels
    if compiled:
        from torch import _dynamo

        _dynamo.reset()
    free_device_memory(device)
    return BareRun(sizes.bare_steps * sizes.global_batch / statistics.median(blocks), first_step_s, peak)


# ---- the input pipeline alone -------------------------------------------------------------------------------


@dataclass
class PipelineRun:
    images_per_s: float  # the loop's input path alone: Prefetcher (thread: gather, crops, pinned copy) + augment
    host_images_per_s: float  # gather + crop parameters + pin on one thread: what the prefetch thread does


def run_pipeline(cache: Any, sizes: Sizes, device: torch.device, seed: int, crop_scale: Sequence[float],
                 hflip: bool) -> PipelineRun:
    """What train.py does per micro-batch before the model, with no model behind it: `Prefetcher.next()`
    (gathered from the cache, crops drawn and copied to the device by its thread) and `augment` on the
    device, synchronised at the end of each block."""
    sampler = GlobalSampler(len(cache), sizes.global_batch, sizes.micro_batch, 1, 0, seed)
    warmup, blocks = 2, sizes.pipeline_blocks
    total_steps = warmup + blocks * sizes.pipeline_steps
    prefetch = Prefetcher(cache, sampler, 0, total_steps, device, seed, crop_scale, hflip)
    try:
        def consume(steps: int) -> float:
            t0 = time.perf_counter()
            for _ in range(steps * sampler.accumulation):
                micro = prefetch.next()
                augment(micro.images, micro.theta, True)
            sync(device)
            return time.perf_counter() - t0

        consume(warmup)  # pinned host blocks, kernels, page cache
        full = [consume(sizes.pipeline_steps) for _ in range(blocks)]
    finally:
        prefetch.close()

    positions = iter(range(total_steps, 10**9))

    def host_block() -> float:
        t0 = time.perf_counter()
        for _ in range(sizes.pipeline_steps):
            for micro in sampler.rank_micro_batches(next(positions)):
                pixels = torch.from_numpy(cache.gather(micro.indices))
                n, height, width, _ = pixels.shape
                crop_flip_params(n, height, width, batch_generator(seed, micro.epoch, micro.index),
                                 (crop_scale[0], crop_scale[1]), hflip=hflip)
                if device.type == "cuda":
                    pixels.pin_memory()
        return time.perf_counter() - t0

    host_block()
    host = [host_block() for _ in range(blocks)]
    per_block = sizes.pipeline_steps * sizes.global_batch
    return PipelineRun(per_block / statistics.median(full), per_block / statistics.median(host))

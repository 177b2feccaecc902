"""GPU figures: tinydist's real loop on the main recipe's shapes, each against a baseline timed on the same GPU.

    python -m tinydist.bench.gpu [--quick]          # or, once registered: python -m tinydist.bench gpu

Without a CUDA device it prints one line and returns. On a GPU it measures, on the main recipe's
shapes (64 px, 200 classes, cifar stem, channels_last, bf16 autocast, global batch 512):

- `gpu loop (eager)`, `gpu loop (compiled)`: images/s of `python -m tinydist.train` itself (from the
  `train/images_per_s` windows of its metrics.jsonl, warm-up windows dropped) on a synthetic
  save_to_disk dataset, vs a bare PyTorch loop (uint8 resident on the GPU -> normalise -> model ->
  cross-entropy -> backward -> SGD step) with the same model, batch and compile setting;
- `gpu input`: the loop's input path alone (Prefetcher: cache gather, crops, pinned copy; then augment
  on the device) vs the images/s the GPU trains at;
- `gpu epoch`: seconds per Tiny-ImageNet-sized epoch (100k images) at those rates;
- `gpu checkpoint`: what one `Checkpointer.save` adds to the loop's wall time (steps with a save minus
  the same steps without; the copies go to pinned host buffers on a side stream) vs `torch.save` of the
  same model + SGD momentum, and how long save() itself holds the host.

Lines are printed (and flushed) as soon as each is known, so a run cut short keeps what it measured.
A part that fails prints one `failed` line and the others still run; the call then raises.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

# No network: set before `datasets` and `huggingface_hub` read them on import; subprocesses inherit them.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import numpy as np
import torch
import torch.nn.functional as F

from tinydist import config as config_lib
from tinydist.config import DEFAULT_MAX_SHARD_SIZE
from tinydist.data.augment import IMAGENET_MEAN, IMAGENET_STD, augment, batch_generator, crop_flip_params
from tinydist.ckpt.checkpointer import Checkpointer
from tinydist.data.cache import load_split
from tinydist.data.hostmem import keep_freed_memory
from tinydist.model.build import build_model
from tinydist.model.optim import build_optimizer
from tinydist.data.sampler import GlobalSampler

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
RECIPE = os.path.join(PACKAGE_ROOT, "configs", "tiny_imagenet_resnet18.yaml")
SKIP_LINE = "gpu: skipped: no CUDA device (torch.cuda.is_available() is False)"
EPOCH_IMAGES = 100_000  # Tiny ImageNet's training split
MODES = ("eager", "compiled")
LOOP_GOAL = 0.9


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


# ---- small helpers (kept here, not imported from bench.py, which imports this module) -----------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":  # CUDA work is asynchronous: stop the clock only once it is done
        torch.cuda.synchronize(device)


def say(line: str) -> None:
    print(line, flush=True)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Swallow prints and progress bars; show their end only if something fails."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            yield
    except Exception:
        sys.stderr.write(out.getvalue()[-5000:])
        raise


def free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def create_momentum(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    # A step on zero gradients: momentum buffers as a saved state holds, weights and BN stats untouched.
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


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
    return ["--config", RECIPE, f"--data.source={source}", f"--data.cache_dir={cache_dir}",
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
    env = {**os.environ, "ACCELERATE_MIXED_PRECISION": precision, "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))}
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
    from tinydist.data.prefetch import Prefetcher

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


# ---- checkpoint stall ------------------------------------------------------------------------------------------


def bench_checkpoint_stall(tmp: str, sizes: Sizes, device: torch.device, where: str, repeats: int) -> None:
    """What one save adds to the loop's wall time on the device (training steps of the real shapes with one
    save minus the same steps without, its writes and fsync included, `snapshot_barrier()` before every
    optimizer step as train.py does), vs torch.save of the same state; and how long save() itself holds
    the host (on a GPU it only queues copies into pinned host buffers on a side stream)."""
    torch.manual_seed(0)
    model = build_model(config_lib.ModelConfig(stem="cifar"), sizes.num_classes)
    model = model.to(device, memory_format=torch.channels_last).train()
    optimizer = build_optimizer(config_lib.OptimConfig(name="sgd", momentum=0.9), model)
    create_momentum(model, optimizer)
    buffers = [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    nbytes = sum(t.numel() * t.element_size() for t in [*model.state_dict().values(), *buffers])
    checkpointer = Checkpointer(os.path.join(tmp, "gpu-checkpoints"), keep_last=2, max_shard_size=DEFAULT_MAX_SHARD_SIZE,
                                log=lambda _: None)
    path, names = os.path.join(tmp, "gpu-baseline.pt"), iter(range(1, 10**6))
    side = sizes.image_size
    images = torch.randn(sizes.micro_batch, 3, side, side, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, sizes.num_classes, (sizes.micro_batch,), device=device)
    returns: list[float] = []

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(images)
        F.cross_entropy(logits.float(), labels).backward()
        checkpointer.snapshot_barrier()  # as the loop does before every optimizer step
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def timed_step() -> float:
        t0 = time.perf_counter()
        step()
        sync(device)
        return time.perf_counter() - t0

    def save() -> None:
        t0 = time.perf_counter()
        checkpointer.save(next(names), model, optimizer, {"bench": True}, blocking=False)
        returns.append(time.perf_counter() - t0)

    def full_write() -> float:
        sync(device)
        t0 = time.perf_counter()
        save()
        checkpointer.wait()  # committed: every file and the marker written and fsynced
        return time.perf_counter() - t0

    def torch_save() -> float:
        sync(device)
        t0 = time.perf_counter()
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
        elapsed = time.perf_counter() - t0
        os.remove(path)
        return elapsed

    for _ in range(3):  # warm-up: kernels, allocator, lazy imports, page cache, pinned host buffers
        timed_step()
    torch_save(), full_write()
    one_step = statistics.median(timed_step() for _ in range(3))
    write_s = full_write()
    steps = max(3, math.ceil(1.5 * write_s / one_step))  # the save's background work fits inside
    returns.clear()

    def loop(with_save: bool) -> float:
        sync(device)
        t0 = time.perf_counter()
        if with_save:
            save()
        for _ in range(steps):
            step()
        checkpointer.wait()  # committed (fsynced) before the clock stops: nothing left unpaid
        sync(device)
        return time.perf_counter() - t0

    with_save, without, saved = [], [], []
    for r in range(repeats):  # alternating order: drift hits all alike
        order = [lambda: with_save.append(loop(True)), lambda: without.append(loop(False)),
                 lambda: saved.append(torch_save())]
        for fn in (order if r % 2 == 0 else order[::-1]):
            fn()
    host_buffers = list(getattr(checkpointer, "_host_buffers", {}).values())
    pinned = bool(host_buffers) and all(b.is_pinned() for b in host_buffers)
    extra = statistics.median(w - o for w, o in zip(with_save, without))
    base = statistics.median(saved)
    checkpointer.close()
    del model, optimizer, checkpointer, host_buffers, buffers, images, labels
    free_device_memory(device)
    say(f"gpu checkpoint: extra loop time per save {extra:.4f} s vs torch.save {base:.3f} s -> ratio "
        f"{100 * extra / base:.1f}% (goal <= 10%) [{where}; {steps} training steps of micro {sizes.micro_batch} at "
        f"{side}px, bf16 autocast ({one_step * 1000:.0f} ms each) with one save minus the same steps without, the "
        f"save's writes and fsync included; save() itself returns in {statistics.median(returns) * 1000:.1f} ms "
        f"(host buffers pinned: {pinned}); a whole save until committed {write_s:.3f} s; resnet18 cifar stem, "
        f"{sizes.num_classes} classes, model + SGD momentum = {nbytes / 1e6:.1f} MB on {device.type}, channels_last; "
        f"median of {len(saved)}]")


# ---- the figure ------------------------------------------------------------------------------------------------


def bench_gpu(tmp: str, quick: bool, device: torch.device, _force_device: Optional[torch.device] = None,
              _modes: Sequence[str] = MODES) -> None:
    """All GPU figures; see the module docstring. `_force_device` (tests of this code only) runs the same code
    on another device with tiny sizes; `_modes` picks eager and/or compiled."""
    if _force_device is None and not torch.cuda.is_available():
        say(SKIP_LINE)
        return
    if _force_device is not None:
        device, sizes = _force_device, smoke_sizes()
        where = f"forced smoke run on {device.type}, tiny sizes: not a GPU figure"
    else:
        device = device if device.type == "cuda" else torch.device("cuda")
        sizes = gpu_sizes(quick, device)
        where = f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    precision = "bf16"
    shape = (f"{sizes.image_size}px, {sizes.num_classes} classes, cifar stem, channels_last, {precision} autocast, "
             f"global batch {sizes.global_batch} = micro {sizes.micro_batch} x accumulation {sizes.accumulation} x 1 "
             "process")
    failures: list[str] = []

    def part(name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - one failed figure must not cost the others (device time is scarce)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            say(f"gpu {name}: failed: {type(e).__name__}: {first} [{where}]")
            traceback.print_exc(file=sys.stderr)
            sys.stderr.flush()
            failures.append(name)

    # 1. Data: the synthetic source and its decode cache, built now, outside every timing.
    source, cache_dir = os.path.join(tmp, "gpu-source"), os.path.join(tmp, "gpu-cache")
    args = loop_args(source, cache_dir, sizes)
    state: dict[str, Any] = {}

    def build_data() -> None:
        t0 = time.perf_counter()
        with quiet():  # progress bars of `datasets`
            make_source(source, sizes)
            cfg = config_lib.load_config(args)
            state["cache"] = load_split(cfg.data, cfg.data.train_split, cfg.data.max_train_samples, log=print)
            load_split(cfg.data, cfg.data.val_split, cfg.data.max_val_samples, log=print)
        state["cfg"], state["build_s"] = cfg, time.perf_counter() - t0
        steps_per_epoch = len(state["cache"]) / sizes.global_batch
        if sizes.max_steps >= math.floor(steps_per_epoch):
            raise RuntimeError(f"{sizes.max_steps} steps would reach an epoch end ({steps_per_epoch:.1f} steps)")

    # 2. Checkpoint stall: independent of the data, quick; first, so that it survives a later timeout.
    part("checkpoint", lambda: bench_checkpoint_stall(tmp, sizes, device, where, sizes.checkpoint_repeats))
    part("data", build_data)
    if "cache" not in state:
        raise RuntimeError("bench gpu: the synthetic dataset could not be built (see above)")

    def pipeline() -> None:
        cfg = state["cfg"]
        state["pipeline"] = run_pipeline(state["cache"], sizes, device, cfg.train.seed, cfg.data.crop_scale,
                                         cfg.data.hflip)
        free_device_memory(device)

    part("input (measure)", pipeline)

    # 3. The loops, eager first: its line comes before the slow compiles.
    real: dict[str, RealRun] = {}
    bare: dict[str, BareRun] = {}

    def loops(mode: str) -> None:
        compiled = mode == "compiled"
        free_device_memory(device)
        real[mode] = ours = run_real_loop(tmp, args, sizes, compiled, device, precision)
        bare[mode] = base = run_bare_loop(sizes, compiled, device, precision)
        ratio = ours.images_per_s / base.images_per_s
        windows = ", ".join(f"{w:.0f}" for w in ours.windows)
        say(f"gpu loop ({mode}): tinydist {ours.images_per_s:.0f} img/s vs bare PyTorch loop {base.images_per_s:.0f} "
            f"img/s -> ratio {ratio:.3f} (goal >= {LOOP_GOAL}) [{where}; {shape}; "
            f"compile {'on' if compiled else 'off'}; tinydist: python -m tinydist.train on {len(state['cache'])} "
            f"synthetic images, median of "
            f"{len(ours.windows)} metrics windows of {sizes.log_every} steps after {sizes.warmup_windows} warm-up "
            f"windows ({windows}), first window {ours.first_window_s:.1f} s, process {ours.wall_s:.0f} s in all"
            f"{' (it rebuilt the decode cache)' if ours.rebuilt_cache else ''}; "
            f"bare: uint8 resident on the device -> normalise -> model -> CE -> backward -> SGD nesterov, no "
            f"augmentation, median of {sizes.bare_blocks} x {sizes.bare_steps} steps, first step "
            f"{base.first_step_s:.1f} s, peak memory {base.peak_gib:.1f} GiB]")

    for mode in _modes:
        part(f"loop ({mode})", lambda mode=mode: loops(mode))

    # 4. What the loop figures say about the input pipeline and an epoch.
    def input_line() -> None:
        if "pipeline" not in state or not real:
            raise RuntimeError("needs the input measurement and at least one real-loop figure (see above)")
        p = state["pipeline"]
        mode = max(real, key=lambda m: real[m].images_per_s)  # the fastest consumer is the hardest to feed
        consumed = real[mode].images_per_s
        say(f"gpu input: pipeline {p.images_per_s:.0f} img/s vs GPU consumption {consumed:.0f} img/s -> ratio "
            f"{p.images_per_s / consumed:.1f}x (goal >= 1) [{where}; pipeline = train.py's input path with no model: "
            f"Prefetcher (thread: uint8 cache gather, crop parameters, pinned non-blocking copy on a side stream) + "
            f"augment on the device, synchronised, median of {sizes.pipeline_blocks} x {sizes.pipeline_steps} steps of "
            f"{sizes.global_batch}; the prefetch thread's host work alone (gather + crops + pin) "
            f"{p.host_images_per_s:.0f} img/s; consumption = "
            f"tinydist loop ({mode}); one-off cache build {state['build_s']:.0f} s excluded by design]")

    def epoch_line() -> None:
        if not real:
            raise RuntimeError("needs at least one real-loop figure (see above)")
        mode = "compiled" if "compiled" in real else next(iter(real))
        ours = EPOCH_IMAGES / real[mode].images_per_s
        rest = "; ".join(f"{m}: tinydist {EPOCH_IMAGES / real[m].images_per_s:.1f} s"
                         + (f" vs bare {EPOCH_IMAGES / bare[m].images_per_s:.1f} s" if m in bare else "")
                         for m in real)
        base = f" vs bare {mode} loop {EPOCH_IMAGES / bare[mode].images_per_s:.1f} s" if mode in bare else ""
        ratio = f" -> ratio {bare[mode].images_per_s / real[mode].images_per_s:.3f}" if mode in bare else ""
        say(f"gpu epoch: tinydist ({mode}) {ours:.1f} s per Tiny-ImageNet epoch ({EPOCH_IMAGES} images){base}{ratio} "
            f"(goal <= {1 / LOOP_GOAL:.2f}) [{where}; {rest}; 100 epochs (the recipe) = {100 * ours / 3600:.2f} h "
            "of steps, evals and saves excluded]")

    part("input", input_line)
    part("epoch", epoch_line)
    if failures:
        raise RuntimeError(f"bench gpu: {len(failures)} part(s) failed: {', '.join(failures)} (see the lines above)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    from tinydist.runtime import cli

    return cli.run(lambda: _main(argv))


def _main(argv: Optional[Sequence[str]]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tinydist.bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few steps: checks the figures run")
    parser.add_argument("--force-cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--modes", default=",".join(MODES), help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    keep_freed_memory()  # as train() and bench.py do: host-side page faults are not what is measured
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    say(f"bench: machine {platform.node()}, {os.cpu_count()} CPUs ({platform.machine()}), torch {torch.__version__}, "
        f"device {device.type}{gpu}, python {platform.python_version()}, {'quick' if opts.quick else 'default'} sizes")
    with tempfile.TemporaryDirectory(prefix="tinydist-bench-gpu-", ignore_cleanup_errors=True) as tmp:
        os.environ["HF_DATASETS_CACHE"] = os.path.join(tmp, "hf-datasets")  # before `datasets` is imported
        bench_gpu(tmp, opts.quick, device, torch.device("cpu") if opts.force_cpu_smoke else None,
                  tuple(m for m in opts.modes.split(",") if m))
    return 0


"""Each figure of tinydist as a ratio against a baseline timed in the same run on the same machine.

    python -m tinydist.bench {data,step,checkpoint,resume,gpu,all} [--quick]
    python -m tinydist.bench quality [--seeds 0 1] [--epochs 3] [config overrides]   (bench_quality.py)

Absolute timings say little across machines; a ratio against a baseline timed in the same run,
interleaved with ours, does. No timing is asserted: each line prints its goal for a human, exit 0.
`--quick` shrinks every size: it checks that the figures run (CI), not what they say.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence
from unittest import mock

# No network: set before `datasets` and `huggingface_hub` read them on import; subprocesses inherit them.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from tinydist import config as config_lib
from tinydist.data.augment import IMAGENET_MEAN, IMAGENET_STD, to_device, train_transform
from tinydist.bench.gpu import bench_gpu
from tinydist.ckpt.checkpointer import Checkpointer
from tinydist.data.hostmem import keep_freed_memory
from tinydist.data.cache import load_split
from tinydist.model.build import build_model
from tinydist.model.optim import build_optimizer
from tinydist.data.sampler import GlobalSampler
from tinydist.train import train

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
SMOKE_RECIPE = os.path.join(PACKAGE_ROOT, "configs", "smoke.yaml")


def sync(device: torch.device) -> None:
    if device.type == "cuda":  # CUDA work is asynchronous: stop the clock only once it is done
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def verdict(quick: bool, name: str, value: str, goal: str) -> str:
    """A figure line's `-> ratio 4.8x (goal >= 5)` part; at --quick sizes the ratio means nothing, so it
    is not printed as if it did."""
    if quick:
        return f"-> {name} not shown (quick sizes: ratios mean nothing)"
    return f"-> {name} {value} (goal {goal})"


def interleaved(fns: Sequence[Callable[[], Any]], repeats: int, budget_s: float = 120.0) -> list[list[Any]]:
    """Each fn's results over up to `repeats` rounds, run in turn and in alternating order, so drift in
    the machine's load, and whatever one run leaves behind for the next, hit every fn alike. Rounds that
    would end past `budget_s` are skipped: a loaded machine gets fewer repeats, not an endless wait."""
    results: list[list[Any]] = [[] for _ in fns]
    t0 = time.perf_counter()
    for r in range(repeats):
        if r and (time.perf_counter() - t0) * (r + 1) / r > budget_s:
            break
        for i in (range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))):
            results[i].append(fns[i]())
    return results


@contextlib.contextmanager
def quiet() -> Iterator[io.StringIO]:
    """Swallow prints and progress bars; show them only if something fails."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            yield out
    except Exception:
        sys.stderr.write(out.getvalue()[-5000:])
        raise


def digits_args(tmp: str, image_size: int, micro: int, global_batch: int) -> list[str]:
    """The smoke recipe (imagenet stem, offline digits) at the given sizes, every file under tmp."""
    recipe = ["--config", SMOKE_RECIPE] if os.path.isfile(SMOKE_RECIPE) else []
    return recipe + ["--data.source=digits", f"--data.cache_dir={tmp}/cache", f"--data.image_size={image_size}",
                     "--data.max_val_samples=64", "--model.stem=imagenet", f"--train.micro_batch_size={micro}",
                     f"--train.global_batch_size={global_batch}", "--checkpoint.every_steps=0", "--log.report_to=[]"]


def create_momentum(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    # A step on zero gradients: momentum buffers as a saved state holds, weights and BN stats untouched.
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


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


def bench_step(tmp: str, quick: bool, device: torch.device) -> None:
    """tinydist's real loop vs a bare PyTorch loop: same model, micro batch, accumulation and device."""
    args = digits_args(tmp, 32, 32, 64) + ["--checkpoint.resume=never"]
    cfg = config_lib.load_config(args)
    with quiet():  # build the decoded caches now, outside every timing
        data = load_split(cfg.data, cfg.data.train_split, cfg.data.max_train_samples, log=print)
        load_split(cfg.data, cfg.data.val_split, cfg.data.max_val_samples, log=print)
    # Both runs stop before the first epoch end: it would add an eval and a save to the longer run only.
    before_epoch_end = math.ceil(len(data) / cfg.train.global_batch_size) - 1
    short, long, pairs = (1, min(3, before_epoch_end), 1) if quick else (3, before_epoch_end, 5)
    steps, runs = long - short, iter(range(10**6))

    def run_train(max_steps: int) -> None:
        out_dir = f"{tmp}/step-run-{next(runs)}"  # resume=never refuses a folder holding checkpoints
        run_cfg = config_lib.load_config(args + [f"--train.max_steps={max_steps}", f"--train.output_dir={out_dir}"])
        with quiet():
            code = train(run_cfg)
        if code != 0:
            raise RuntimeError(f"train() with max_steps={max_steps} returned exit code {code}")
        shutil.rmtree(out_dir)

    torch.manual_seed(0)
    memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    model = build_model(cfg.model, len(data.classes)).to(device, memory_format=memory_format).train()
    optimizer = build_optimizer(cfg.optim, model)
    micro, side = cfg.train.micro_batch_size, cfg.data.image_size
    accumulation = cfg.train.global_batch_size // micro
    # Fixed, normalised, on the device, in the loop's memory format: nothing but the step itself.
    inputs = [torch.randn(micro, 3, side, side, device=device).contiguous(memory_format=memory_format)
              for _ in range(accumulation)]
    targets = torch.randint(0, len(data.classes), (accumulation, micro), device=device)

    def bare(k: int) -> None:
        for _ in range(k):
            for x, y in zip(inputs, targets):
                loss = F.cross_entropy(model(x), y, label_smoothing=cfg.optim.label_smoothing) / accumulation
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync(device)

    run_train(short)  # warm-up: the first Accelerator, lazy imports, allocator
    bare(3)
    fns = [lambda: timed(lambda: run_train(long)), lambda: timed(lambda: run_train(short)),
           lambda: timed(lambda: bare(steps))]
    results = interleaved(fns, pairs)
    (t_long, t_short, t_bare), pairs = map(statistics.median, results), len(results[0])
    ours, base = (t_long - t_short) / steps, t_bare / steps
    overhead = verdict(quick, "overhead", f"{100 * (ours / base - 1):+.1f}%", "<= 3%")
    print(f"step: tinydist loop {ours:.4f} s/step vs bare PyTorch loop {base:.4f} s/step "
          f"{overhead} [micro {micro} x accumulation {accumulation}, {side}px, "
          f"{cfg.model.stem} stem, {device.type}; ours = (T(train {long} steps) - T(train {short} steps)) / {steps}, "
          f"median of {pairs} each]")


def bench_checkpoint(tmp: str, quick: bool, device: torch.device) -> None:
    """What one save adds to the training loop's wall time (steps with a save minus the same steps
    without, the save's background work included), vs torch.save of the same state."""
    torch.manual_seed(0)
    model = build_model(config_lib.ModelConfig(stem="cifar"), 200).to(device)
    optimizer = build_optimizer(config_lib.OptimConfig(name="sgd", momentum=0.9), model)
    create_momentum(model, optimizer)
    buffers = [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    nbytes = sum(t.numel() * t.element_size() for t in [*model.state_dict().values(), *buffers])
    checkpointer = Checkpointer(f"{tmp}/checkpoints", keep_last=2, max_shard_size="10MB", log=lambda _: None)
    path, names, repeats = f"{tmp}/baseline.pt", iter(range(1, 10**6)), 1 if quick else 5
    # A core for the saver, as on a GPU host (where the GPU computes and the cores are free): with every
    # core computing, any background work on a CPU-only box is work the loop does not do.
    compute_threads = max(1, (os.cpu_count() or 1) - 1) if device.type == "cpu" else torch.get_num_threads()
    side, batch = (16, 8) if quick else (32, 32)
    images = torch.randn(batch, 3, side, side, device=device)
    labels = torch.randint(0, 200, (batch,), device=device)

    def step() -> None:
        F.cross_entropy(model(images), labels).backward()
        checkpointer.snapshot_barrier()  # as the loop does before every optimizer step
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def torch_save() -> float:
        t0 = time.perf_counter()
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
        elapsed = time.perf_counter() - t0
        os.remove(path)
        return elapsed

    def full_write() -> float:
        t0 = time.perf_counter()
        checkpointer.save(next(names), model, optimizer, {"bench": True}, blocking=False)
        checkpointer.wait()
        return time.perf_counter() - t0

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(compute_threads)
    try:
        step(), torch_save(), full_write()  # warm-up: lazy imports, allocator, page cache, host buffers
        one_step = statistics.median(timed(step) for _ in range(3))
        steps = max(3, math.ceil(1.5 * full_write() / one_step))  # the save's background work fits inside

        def loop(save: bool) -> float:
            t0 = time.perf_counter()
            if save:
                checkpointer.save(next(names), model, optimizer, {"bench": True}, blocking=False)
            for _ in range(steps):
                step()
            checkpointer.wait()  # committed (fsynced) before the clock stops: nothing left unpaid
            sync(device)
            return time.perf_counter() - t0

        with_save, without, saved = interleaved([lambda: loop(True), lambda: loop(False), torch_save], repeats)
    finally:
        torch.set_num_threads(previous_threads)
    extra = statistics.median(w - o for w, o in zip(with_save, without))
    base = statistics.median(saved)
    ratio = verdict(quick, "ratio", f"{100 * extra / base:.1f}%", "<= 10%")
    print(f"checkpoint: extra loop time per save {extra:.3f} s vs torch.save {base:.3f} s "
          f"{ratio} [{steps} training steps ({one_step:.3f} s each, {compute_threads} "
          f"compute thread(s)) with one save minus the same steps without, the save's writes and fsync included; "
          f"resnet18 cifar stem, 200 classes, model + SGD momentum = {nbytes / 1e6:.1f} MB on {device.type}; "
          f"median of {len(saved)}]")


def bench_resume(tmp: str, quick: bool, device: torch.device) -> None:
    """Process start to first step (spawn to exit of a 1-step run), resuming at 99% of an epoch vs at its start."""
    args = digits_args(tmp, 16, 8, 8) + ["--checkpoint.resume=auto"]
    cfg = config_lib.load_config(args)
    with quiet():  # both caches now, so no timed run builds them
        data = load_split(cfg.data, cfg.data.train_split, cfg.data.max_train_samples, log=print)
        load_split(cfg.data, cfg.data.val_split, cfg.data.max_val_samples, log=print)
    sampler = GlobalSampler(len(data), cfg.train.global_batch_size, cfg.train.micro_batch_size, 1, 0, cfg.train.seed)
    per_epoch = sampler.steps_per_epoch
    # Step s+1 of either run must not end an epoch (true with >= 100 steps per epoch), or that run alone
    # would pay an extra eval + save.
    assert per_epoch >= 100, f"digits at global batch {cfg.train.global_batch_size}: {per_epoch:.1f} steps per epoch"
    start, late = math.ceil(per_epoch), math.floor((2 + 0.99) * per_epoch)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, len(data.classes))
    optimizer = build_optimizer(cfg.optim, model)
    create_momentum(model, optimizer)
    for step in (start, late):
        # The meta train.py's save() writes (the learning rate is a function of the step: nothing to save).
        meta = {"epoch": sampler.epoch_at(step), "samples": step * cfg.train.global_batch_size,
                "global_batch_size": cfg.train.global_batch_size, "device": "cpu",
                "config": config_lib.to_dict(cfg), "wandb_run_id": None}
        Checkpointer(f"{tmp}/resume-source-{step}", keep_last=2, max_shard_size=cfg.checkpoint.max_shard_size,
                     log=lambda _: None).save(step, model, optimizer, meta, blocking=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))}
    runs = iter(range(10**6))

    def launch(step: int) -> float:
        run_dir = f"{tmp}/resume-run-{next(runs)}"
        shutil.copytree(f"{tmp}/resume-source-{step}", f"{run_dir}/checkpoints")  # holds only that checkpoint
        cmd = [sys.executable, "-m", "tinydist.train", *args, f"--checkpoint.dir={run_dir}/checkpoints",
               f"--train.max_steps={step + 1}", f"--train.output_dir={run_dir}"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
        elapsed, output = time.perf_counter() - t0, proc.stdout + proc.stderr
        if proc.returncode != 0 or "resumed from" not in output or f"at step {step} " not in output:
            raise RuntimeError(f"resume bench: `{' '.join(cmd)}` exited {proc.returncode} without resuming from step "
                               f"{step}; its output ends:\n{output[-3000:]}")
        shutil.rmtree(run_dir)
        return elapsed

    repeats = 1 if quick else 5
    if not quick:
        launch(start)  # warm-up: the first interpreter start reads every import from disk
    results = interleaved([lambda: launch(start), lambda: launch(late)], repeats)
    (t_start, t_late), repeats = map(statistics.median, results), len(results[0])
    ratio = verdict(quick, "ratio", f"{t_late / t_start:.3f}", "<= 1.1")
    print(f"resume: spawn to exit at 99% of an epoch (step {late}, epoch {sampler.epoch_at(late):.3f}) {t_late:.2f} s "
          f"vs at an epoch start (step {start}, epoch {sampler.epoch_at(start):.3f}) {t_start:.2f} s "
          f"{ratio} [python -m tinydist.train: start-up, resume, 1 step, eval of "
          f"{cfg.data.max_val_samples} images, save, export; {per_epoch:.1f} steps per epoch; median of {repeats}]")


FIGURES: dict[str, Callable[[str, bool, torch.device], None]] = {
    "data": bench_data, "step": bench_step, "checkpoint": bench_checkpoint, "resume": bench_resume,
    "gpu": bench_gpu}


def main(argv: Optional[Sequence[str]] = None) -> int:
    from tinydist.runtime import cli

    return cli.run(lambda: _main(list(sys.argv[1:] if argv is None else argv)))


def _main(argv: list[str]) -> int:
    if argv[:1] == ["quality"]:  # accuracy, not speed: its own flags and config overrides
        from tinydist.bench.quality import quality

        return quality(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m tinydist.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("figures", nargs="+", choices=[*FIGURES, "all"], help="which figures to measure")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the figures run (CI smoke test)")
    opts = parser.parse_args(argv)
    names = list(FIGURES) if "all" in opts.figures else list(dict.fromkeys(opts.figures))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(os.cpu_count() or 1)  # ours and every baseline get every core
    # As train() does; before any worker forks, so the baselines' DataLoader workers inherit it too.
    tuned = keep_freed_memory()
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"bench: machine {platform.node()}, {os.cpu_count()} CPUs ({platform.machine()}), torch {torch.__version__}, "
          f"device {device.type}{gpu}, python {platform.python_version()}, {'quick' if opts.quick else 'default'} "
          f"sizes, glibc keeps freed memory: {tuned}", flush=True)
    with tempfile.TemporaryDirectory(prefix="tinydist-bench-", ignore_cleanup_errors=True) as tmp:
        # `datasets`' own cache in tmp too: the variable reaches the subprocesses, the attribute this
        # process (whose `datasets` read the variable on import).
        hf_cache = os.path.join(tmp, "hf-datasets")
        with mock.patch.dict(os.environ, {"HF_DATASETS_CACHE": hf_cache}), \
                mock.patch.object(datasets.config, "HF_DATASETS_CACHE", Path(hf_cache)):
            for name in names:
                FIGURES[name](tmp, opts.quick, device)
                sys.stdout.flush()  # each line as soon as it is known, even through a pipe
    return 0


"""`bench gpu`: tinydist's real loop on the main recipe's shapes, each figure against a baseline timed on the same GPU.

    python -m tinydist.bench gpu [--quick]          # or python -m tinydist.bench.gpu [--quick]

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
  same model + SGD momentum, and how long save() itself holds the host (bench/checkpoint.py).

The runs themselves are in bench/gpu_runs.py. Lines are printed (and flushed) as soon as each is known,
so a run cut short keeps what it measured. A part that fails prints one `failed` line and the others
still run; the call then raises.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Optional, Sequence

import torch

from tinydist import config as config_lib
from tinydist.bench.checkpoint import bench_checkpoint_stall
from tinydist.bench.common import free_device_memory, quiet, say
from tinydist.bench.gpu_runs import (BareRun, RealRun, gpu_sizes, loop_args, make_source, run_bare_loop,
                                     run_pipeline, run_real_loop, smoke_sizes)
from tinydist.data.cache import load_train_val
from tinydist.data.hostmem import keep_freed_memory

SKIP_LINE = "gpu: skipped: no CUDA device (torch.cuda.is_available() is False)"
EPOCH_IMAGES = 100_000  # Tiny ImageNet's training split
MODES = ("eager", "compiled")
LOOP_GOAL = 0.9


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
            # The caches train opens (the training split at data.train_detail): the H200 run of 2026-12-04 built
            # the training split at detail 1 here, and the first real loop built it again.
            state["cache"], _ = load_train_val(cfg.data, log=print)
        state["cfg"], state["build_s"] = cfg, time.perf_counter() - t0
        steps_per_epoch = len(state["cache"]) / sizes.global_batch
        if sizes.max_steps >= math.floor(steps_per_epoch):
            raise RuntimeError(f"{sizes.max_steps} steps would reach an epoch end ({steps_per_epoch:.1f} steps)")

    # 2. Checkpoint stall: independent of the data, quick; first, so that it survives a later timeout.
    part("checkpoint", lambda: bench_checkpoint_stall(tmp, device, sizes.micro_batch, sizes.image_size,
                                                      sizes.num_classes, sizes.checkpoint_repeats, where))
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
    keep_freed_memory()  # as train() and the other figures do: host-side page faults are not what is measured
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    say(f"bench: machine {platform.node()}, {os.cpu_count()} CPUs ({platform.machine()}), torch {torch.__version__}, "
        f"device {device.type}{gpu}, python {platform.python_version()}, {'quick' if opts.quick else 'default'} sizes")
    with tempfile.TemporaryDirectory(prefix="tinydist-bench-gpu-", ignore_cleanup_errors=True) as tmp:
        os.environ["HF_DATASETS_CACHE"] = os.path.join(tmp, "hf-datasets")  # before `datasets` is imported
        bench_gpu(tmp, opts.quick, device, torch.device("cpu") if opts.force_cpu_smoke else None,
                  tuple(m for m in opts.modes.split(",") if m))
    return 0


if __name__ == "__main__":
    sys.exit(main())

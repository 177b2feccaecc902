"""Does tinydist win on data it never saw? `train()` end to end, the recipe as configured, against a plain
per-image torchvision/DataLoader loop: same data, model, optimizer, schedule, epochs, micro-batches and seeds.

    python -m tinydist.bench quality [--quick] [--seeds 0 1 2] [--epochs 3] [--no-floor | --interleaved-only]
                                     [--variants tinydist torchvision] [--config FILE] [--k=V ...]
    python -m tinydist.bench quality --make-photos DIR [--proxy photos10|photos-all] [--photos-from FOLDER]
    python -m tinydist.bench quality --data.source=DIR --data.crop_scale=[0.08,1.0] --data.hflip=true

Default: configs/smoke.yaml (offline digits, 32 px), 3 epochs, seeds 0 1 2. `--quick`: one seed, one
epoch on a subset; checks that it runs, not what it says. The verdict, one line:
`quality: tinydist X ± s vs plain loop Y ± s -> +D points; wall ratio R` (top-1 in percent, mean ±
sample s.d. over the seeds; R = tinydist's wall time over the plain loop's, every run of each summed).

tinydist's side is `train()` itself (train.py), in this process, in a temporary output folder: its
validations, checkpoints and export included, as `python -m tinydist.train` runs them. So everything
the config turns on is measured, in accuracy and in time: the BN rule, CutMix/MixUp (`mix.*`), the EMA
(`ema.*`), PreciseBN (`eval.precise_bn_images`), flip TTA, the validation and save cadence. Its top-1 is
that of the weights the export would hold (`export.weights`: raw, or the EMA; the flip-TTA top-1 when
`eval.flip_tta`); raw and EMA are printed per run, with the run's time per phase (loop/timing.py).
Just before and just after each of tinydist's runs, a bare loop over the same number of steps on pre-made
tensors (bench/floor.py) gives the wall-time floor (the machine's speed drifts: two samples per run); the
`floor:` line sets tinydist's end-to-end time against their mean, phase by phase; the `floor, drift
cancelled:` line then times `train_step` against the bare step in alternating 2-step chunks in one process
and multiplies that by the runs' own wall time over their steps (`--interleaved-only`: that line alone, in
half the time). The decode caches are
opened (the first time on a machine: built) before anything is timed, and that time is reported apart.
Variants: `tinydist` is the config's `data.train_detail` (default 2: the train cache at up to 2x
data.image_size, each crop resampled once, antialiased, to data.image_size); `tinydist-legacy` is
data.train_detail=1 (the cache at data.image_size + bilinear grid_sample), the pipeline before the fix.

The baseline stays bare, as a plain loop is: it decodes the source's own images per item with PIL:
RandomResizedCrop(size, scale=crop_scale, antialias=True), RandomHorizontalFlip (if data.hflip),
ToTensor, Normalize; eval Resize(size) + CenterCrop(size) (bench/plain_loop.py); batches = the same GlobalSampler
micro-batches, BN statistics updated by every forward, plain cross-entropy on hard labels (no label
smoothing: a hand-written loop's `nn.CrossEntropyLoss()`), no mixing, no EMA, no PreciseBN, torchvision's
initialisation (residual BN scales at 1; tinydist's `model.zero_init_residual` starts them at 0 from
150 steps).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from tinydist import config as config_lib
from tinydist.bench.common import SMOKE_RECIPE, machine_threads
from tinydist.data.hostmem import keep_freed_memory
from tinydist.data.mix import mix_enabled
import tinydist.train as train_module
from tinydist.bench.floor import bare_floor_seconds, drift_free_line, floor_line, interleaved_step_ratios
from tinydist.bench.plain_loop import baseline_setup, run_torchvision
from tinydist.bench.proxies import PROXIES, make_photo_source
from tinydist.model.build import BNStatistics

VARIANTS = ("tinydist", "tinydist-legacy", "torchvision")
# --quick: before the user's own overrides, which win.
QUICK_OVERRIDES = ["--data.max_train_samples=512", "--data.max_val_samples=128"]


class EveryMicroBatch(BNStatistics):
    """--bn-every: BN statistics counted from every micro-batch, as the baseline's plain loop counts them."""

    def keep(self) -> None:
        pass

    def restore(self) -> None:
        pass


def top1_key(cfg: config_lib.Config) -> str:
    """The metric of the weights the export holds: the EMA's when `export.weights` is ema; its flip-TTA
    top-1 when `eval.flip_tta` (what a user of the model would get scoring as validation does)."""
    return ("val_ema/top1" if cfg.export.weights == "ema" else "val/top1") + ("_flip" if cfg.eval.flip_tta else "")


def run_tinydist(cfg: config_lib.Config, seed: int, detail: int, log: Callable[[str], None] = lambda _: None,
                 bn_every: bool = False) -> dict[str, float]:
    """`train()` itself, end to end, in this process, seed `seed`, train cache at `detail`, in a
    temporary output folder (checkpoints and the export included): the metrics of its last validation
    (val/*, and val_ema/* when scored) and where its wall time went (time/*_s, loop/timing.py)."""
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed),
                              data=dataclasses.replace(cfg.data, train_detail=detail))
    out = tempfile.mkdtemp(prefix="tinydist-quality-")
    try:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, output_dir=out),
                                  checkpoint=dataclasses.replace(cfg.checkpoint, dir=None, resume="never",
                                                                 local_dir=None),
                                  preemption=dataclasses.replace(cfg.preemption, notice="off"))
        with _every_micro_batch(bn_every), contextlib.redirect_stdout(_Lines(log)):
            code = train_module.train(cfg)
        if code != 0:
            raise RuntimeError(f"tinydist's run (seed {seed}) ended with exit code {code}")
        return _last_records(os.path.join(out, "metrics.jsonl"))
    finally:
        shutil.rmtree(out, ignore_errors=True)


class _Lines(io.TextIOBase):
    """stdout of a run, line by line, to `log` (stderr in the command: the table stays on stdout)."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                self.log(line)
        return len(text)


def _last_records(path: str) -> dict[str, float]:
    """The last validation's metrics and the time/* figures from a run's metrics.jsonl."""
    out: dict[str, float] = {}
    with open(path) as f:
        for record in map(json.loads, filter(str.strip, f)):
            if any(k.startswith(("val/", "val_ema/")) for k in record):
                out = {k: v for k, v in out.items() if k.startswith("time/")}
            out.update({k: v for k, v in record.items() if k.startswith(("val/", "val_ema/", "time/"))})
    return out


@contextlib.contextmanager
def _every_micro_batch(on: bool) -> Iterator[None]:
    """--bn-every: train()'s runs count BN statistics from every micro-batch (a diagnostic)."""
    original = train_module.build_run
    if on:
        def build(*args: Any, **kwargs: Any) -> Any:
            run = original(*args, **kwargs)
            run.bn_statistics = EveryMicroBatch(run.bare_model)
            return run
        train_module.build_run = build
    try:
        yield
    finally:
        train_module.build_run = original


def mean_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    return float(np.mean(values)), (statistics.stdev(values) if len(values) > 1 else 0.0)


def verdict_line(ours: Sequence[float], plain: Sequence[float], ours_wall: Sequence[float],
                 plain_wall: Sequence[float]) -> str:
    """`quality: tinydist X ± s vs plain loop Y ± s -> +D points; wall ratio R`: top-1 in percent, mean
    ± spread over seeds, D the difference of the means, R tinydist's total wall time over the plain loop's."""
    (x, sx), (y, sy) = mean_spread([100 * a for a in ours]), mean_spread([100 * a for a in plain])
    return (f"quality: tinydist {x:.2f} ± {sx:.2f} vs plain loop {y:.2f} ± {sy:.2f} -> {x - y:+.2f} points; "
            f"wall ratio {sum(ours_wall) / sum(plain_wall):.2f}")


def table(results: dict[str, list[float]], seeds: Sequence[int],
          walls: Optional[dict[str, list[float]]] = None) -> list[str]:
    """Rows `name  top-1 per seed  mean ± spread`, in percent; paired gaps per variant; the verdict line
    (tinydist vs torchvision) when both ran and `walls` (seconds per run) are given."""
    width = max(len(n) for n in results)
    lines = [f"{'pipeline':<{width}}  " + "  ".join(f"seed {s:<3}" for s in seeds) + "  mean ± spread"]
    for name, accs in results.items():
        mean, spread = mean_spread([100 * a for a in accs])
        lines.append(f"{name:<{width}}  " + "  ".join(f"{100 * a:8.2f}" for a in accs) + f"  {mean:.2f} ± {spread:.2f}")
    base = results.get("torchvision")
    for name, accs in results.items():
        if base is None or name == "torchvision":
            continue
        gaps = [100 * (a - b) for a, b in zip(accs, base)]
        gap, spread = mean_spread(gaps)
        per_seed = ", ".join(f"{g:+.2f}" for g in gaps)
        if len(gaps) < 2:  # no spread to judge a gap by: say so rather than call it a lead
            lines.append(f"paired: {name} - torchvision = {gap:+.2f} points top-1 over 1 seed: no verdict "
                         "(run --seeds 0 1 2 for one)")
            continue
        noise = 2 * spread / math.sqrt(len(gaps))
        word = ("costs no accuracy measurable here" if abs(gap) <= noise or abs(gap) < 0.25 else
                "trails" if gap < 0 else "leads")
        lines.append(f"paired: {name} - torchvision = {gap:+.2f} points mean top-1 over {len(gaps)} seed(s) "
                     f"(per-seed gaps {per_seed}; 2 s.e. {noise:.2f}): {name} {word}")
    if base is not None and "tinydist" in results and walls:
        lines.append(verdict_line(results["tinydist"], base, walls["tinydist"], walls["torchvision"]))
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    from tinydist.runtime import cli

    return cli.run(lambda: quality(argv))


def recipe_line(cfg: config_lib.Config) -> str:
    """What tinydist's side trains beyond the baseline's plain loop, as the config turns it on."""
    mix = (f"cutmix {cfg.mix.cutmix_alpha:g} / mixup {cfg.mix.mixup_alpha:g}, prob {cfg.mix.prob:g}"
           if mix_enabled(cfg.mix) else "off")
    ema = ((f"decay {cfg.ema.decay:g}" if cfg.ema.decay is not None else f"half-life {cfg.ema.half_life:g} of the run")
           if cfg.ema.enabled else "off")
    precise = f"{cfg.eval.precise_bn_images} images" if cfg.eval.precise_bn_images else "off"
    identity = cfg.model.zero_init_residual
    identity_text = f"from {config_lib.ZERO_INIT_FROM_STEPS} steps" if identity is None else str(identity)
    return (f"tinydist: train() as configured (train_step, validate, saves, export): mix {mix}; EMA {ema}; "
            f"PreciseBN {precise}; eval.weights {cfg.eval.weights}; flip TTA {cfg.eval.flip_tta}; "
            f"label smoothing {cfg.optim.label_smoothing:g}; zero-init residual {identity_text}; "
            f"top-1 of export.weights={cfg.export.weights} "
            f"({top1_key(cfg)}); torchvision: plain loop, none of these")


def quality(argv: Optional[Sequence[str]]) -> int:
    """The command (`python -m tinydist.bench quality ...`); raises what went wrong, for cli.run."""
    parser = argparse.ArgumentParser(prog="python -m tinydist.bench quality", description=__doc__.split("\n\n")[0],
                                     epilog="Any other argument is a config override, as for training "
                                            "(default recipe: configs/smoke.yaml).")
    parser.add_argument("--quick", action="store_true",
                        help="one seed, one epoch, a subset of the data: checks that it runs (CI)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default 0 1 2 (--quick: 0)")
    parser.add_argument("--no-floor", dest="floor", action="store_false",
                        help="skip the bare loop on pre-made tensors (the wall-time floor) after each seed")
    parser.add_argument("--interleaved-only", action="store_true",
                        help="the floor from interleaved chunks only (`floor, drift cancelled:`): no bare loops "
                             "around each run, which double the bench's time and cannot judge 8%% where the "
                             "machine's speed drifts")
    parser.add_argument("--epochs", type=float, default=None, help="train.epochs for every run (default 3; --quick: 1)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["tinydist", "torchvision"])
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the baseline (default 0)")
    parser.add_argument("--bn-every", action="store_true",
                        help="diagnostic: tinydist's runs update BN statistics on every micro-batch, as the baseline")
    parser.add_argument("--make-photos", metavar="DIR", help="write the offline photo source to DIR and exit")
    parser.add_argument("--photos-from", metavar="FOLDER", help="extra photographs for --make-photos")
    parser.add_argument("--proxy", choices=PROXIES, default="photos-all",
                        help="which shipped photographs --make-photos cuts (bench/proxies.py; default photos-all)")
    parser.add_argument("--photo-counts", nargs=2, type=int, default=[3000, 1500], metavar=("TRAIN", "VAL"),
                        help="patches per split for --make-photos (default 3000 1500)")
    opts, overrides = parser.parse_known_args(argv)
    if opts.make_photos:
        print(make_photo_source(opts.make_photos, opts.photos_from, *opts.photo_counts, proxy=opts.proxy))
        return 0
    seeds = opts.seeds or ([0] if opts.quick else [0, 1, 2])
    epochs = opts.epochs if opts.epochs is not None else (1.0 if opts.quick else 3.0)
    recipe = [] if any(a == "--config" or a.startswith("--config=") for a in overrides) else ["--config", SMOKE_RECIPE]
    quick = QUICK_OVERRIDES if opts.quick else []
    cfg = config_lib.load_config(recipe + quick + [f"--train.epochs={epochs}", "--log.report_to=[]"] + overrides,
                                 prog="python -m tinydist.bench quality")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(machine_threads())
    # train() tunes the allocator for the whole process on its first call: tuned here, before anything is
    # timed, the floor and the plain loop run under it too (seed 0's first floor measured 71 s without it,
    # 53-67 s after a train()). Before any DataLoader worker forks, so they inherit it as well.
    keep_freed_memory()
    print(f"quality: {cfg.data.source} at {cfg.data.image_size}px, {cfg.model.stem} stem, {cfg.train.epochs:g} epochs, "
          f"global batch {cfg.train.global_batch_size} (micro {cfg.train.micro_batch_size}), crop_scale "
          f"{list(cfg.data.crop_scale)}, hflip {cfg.data.hflip}, seeds {seeds}, {device.type}"
          f"{', quick sizes' if opts.quick else ''}", flush=True)
    print(recipe_line(cfg), flush=True)
    results: dict[str, list[float]] = {v: [] for v in opts.variants}
    walls: dict[str, list[float]] = {v: [] for v in opts.variants}
    times: list[dict[str, float]] = []
    floors: list[tuple[float, float]] = []
    floors_steps = 0  # the bare loops' length: the runs' steps
    cache_s = prepare_caches(cfg, opts.variants)
    print(f"decode cache: {cache_s:.1f} s before the timed runs (once per data set and machine: "
          "tinydist's runs read it)", flush=True)
    # Untimed: a process's first steps pay for its kernels' first use (oneDNN primitives, the allocator's
    # pools), ~1 s here, which would otherwise land on whichever side runs first (tinydist, seed 0).
    bare_floor_seconds(cfg, 3, 10, device)
    around = opts.floor and not opts.interleaved_only and "tinydist" in opts.variants  # bare loops around each run
    for seed in seeds:
        floor = _FloorRunner(cfg, seed, device) if around else None
        before = floor() if floor else 0.0
        for variant in opts.variants:
            t0 = time.perf_counter()
            detail = ""
            if variant == "torchvision":
                acc = run_torchvision(cfg, seed, device, opts.workers)
            else:
                metrics = run_tinydist(cfg, seed, cfg.data.train_detail if variant == "tinydist" else 1,
                                       lambda m: print(m, file=sys.stderr), opts.bn_every)
                acc = metrics[top1_key(cfg)]
                detail = "".join(f", {name} {100 * metrics[key]:.2f}" for name, key in
                                 (("raw", "val/top1"), ("ema", "val_ema/top1")) if key in metrics)
                if variant == "tinydist":
                    times.append(metrics)
                    detail += "; " + ", ".join(f"{k[5:-2]} {v:.1f} s" for k, v in metrics.items()
                                               if k.startswith("time/") and k not in ("time/wall_s", "time/save_drag_s"))
                    if metrics.get("time/save_drag_s", 0.0) >= 0.05:
                        detail += f", {metrics['time/save_drag_s']:.1f} s of them slowed by background saves"
            results[variant].append(acc)
            walls[variant].append(time.perf_counter() - t0)
            print(f"  {variant} seed {seed}: top-1 {100 * acc:.2f} ({walls[variant][-1]:.0f} s{detail})", flush=True)
            if floor and variant == "tinydist":
                # The same bare steps just before and just after tinydist's run: the machine's speed drifts
                # (on a shared 2-core VM by ~25% within minutes), so one sample per side cannot judge 8%.
                floors.append((before, floor()))
                floors_steps = floor.steps
                print(f"  floor seed {seed}: {floor.steps} bare steps {floors[-1][0]:.1f} s before, "
                      f"{floors[-1][1]:.1f} s after", flush=True)
    print("\n".join(table(results, seeds, walls)))
    if floors:
        print(floor_line(times, floors, floors_steps, cache_s))
    if opts.floor and times:
        seed_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seeds[0]))
        chunking = {"chunks": 2, "chunk_steps": 2} if opts.quick else {}
        with contextlib.redirect_stdout(_Lines(lambda m: print(m, file=sys.stderr))):
            step_ratios = interleaved_step_ratios(seed_cfg, device, **chunking)
        print(drift_free_line(times, step_ratios) if step_ratios else
              "floor, drift cancelled: not measured (the run's steps are too few to interleave in chunks)")
    return 0


def prepare_caches(cfg: config_lib.Config, variants: Sequence[str]) -> float:
    """Seconds to open (or, the first time on this machine, build) the decode caches the tinydist variants
    read, before anything is timed: reported apart, as the one-off cost it is, not inside seed 0's run."""
    from tinydist.data.cache import load_train_val

    started = time.perf_counter()
    for variant in variants:
        if variant != "torchvision":
            detail = cfg.data.train_detail if variant == "tinydist" else 1
            load_train_val(dataclasses.replace(cfg.data, train_detail=detail), log=lambda _: None)
    return time.perf_counter() - started


class _FloorRunner:
    """The bare loop (bench/floor.py) over the steps of seed `seed`'s run: `runner()` -> seconds."""

    def __init__(self, cfg: config_lib.Config, seed: int, device: torch.device) -> None:
        train_rows, self.num_classes = _train_shape(cfg)
        _, total, self.warmup = baseline_setup(cfg, train_rows, seed)
        self.total, self.steps = total, min(total, cfg.train.max_steps or total)
        self.cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed))
        self.device = device

    def __call__(self) -> float:
        return bare_floor_seconds(self.cfg, self.steps, self.num_classes, self.device, self.total, self.warmup)


def _train_shape(cfg: config_lib.Config) -> tuple[int, int]:
    """(train rows, classes) of the run's data, from the decode cache its run reads (prepare_caches')."""
    from tinydist.data.cache import load_split

    data = load_split(cfg.data, cfg.data.train_split, cfg.data.max_train_samples, log=lambda _: None,
                      detail=cfg.data.train_detail)
    return len(data), len(data.classes)

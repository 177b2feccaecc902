"""The decode-once cache: every image of a split decoded once, to RGB uint8, into Arrow files that
training reads memory-mapped; `load_split`, `load_train_val` (the caches a run reads) and
`python -m tinydist.data`.

A source (sources.py) is decoded to RGB uint8 at `data.image_size` (or up to twice that, never above
the source's own size, with `load_split(..., detail=2)`: crops are then resized once, on the device,
antialiased), by a parallel `Dataset.map` into Arrow files under `data.cache_dir`, named by a
fingerprint of (source data, split, size, subset) so that any change rebuilds. Every open checks
the files against what their build recorded and rebuilds a damaged cache (cache_files.py). Training
reads those files memory-mapped through a zero-copy uint8 view: the formatted `ds[indices]` path
returns int64 copies at ~10k images/s, the view ~900k/s.

Labels are always the index of the class name (WordNet id) in sorted order, whatever the source.
An image that cannot be decoded fails the cache build with its index and source: skipping it would
silently shrink the dataset and shift what "epoch" means between machines. 16-bit images keep their
top 8 bits (Pillow's own conversion would clip them white). What decodes but looks unintended (images
under SMALL_SIDE px, classes with no image in a whole split) is one warning line per build.

    python -m tinydist.data --config configs/smoke.yaml [--data.source=PATH] [--json]
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import sys
from typing import Any, Callable, ContextManager, Optional, Sequence

import numpy as np

from tinydist.config import DataConfig
from tinydist.data import cache_files
from tinydist.data.cache_files import CacheMismatch
from tinydist.data.sources import DataError, Source, open_source
from tinydist.runtime import cli
from tinydist.runtime.quote import first_line


# Bump when the decoded layout or content changes, so old caches are rebuilt. 2: 16-bit images scaled
# to 8 bits (format 1 clipped them to white), and each row's shorter source side recorded (`shorter_side`).
CACHE_FORMAT = 2
# An image whose shorter side is below this is reported once per build: at this size it is an icon, a
# placeholder or a failed download, not a photo, and upscaling it to data.image_size only hides that.
SMALL_SIDE = 8


class ImageCache:
    """Decoded images of one split, memory-mapped: `gather(indices)` -> (B, side, side, 3) uint8.
    `image_size` is the size the model sees (data.image_size); `side` the size stored, larger when the
    split was loaded with `detail` > 1 (crops are then resized to `image_size` on the device, once)."""

    def __init__(self, folder: str, meta: dict[str, Any], tables: Optional[list[Any]] = None):
        self.folder, self.meta = folder, meta
        self.classes: list[str] = meta["classes"]
        self.side: int = meta["image_size"]  # what is stored (cache_files checks the rows against it)
        self.image_size: int = meta.get("output_size", self.side)
        if tables is None:
            tables = [_open_table(os.path.join(folder, f)) for f in meta["files"]]
        side = self.side
        # One zero-copy view per Arrow chunk: no copy of the data, no int64 detour.
        self._chunks = [chunk.flatten().to_numpy(zero_copy_only=True).reshape(-1, side, side, 3)
                        for t in tables for chunk in t.column("pixels").chunks]
        self._starts = np.cumsum([0] + [len(c) for c in self._chunks])
        self.labels = np.concatenate([t.column("label").to_numpy() for t in tables]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def gather(self, indices: np.ndarray) -> np.ndarray:
        if len(self._chunks) == 1:
            return np.take(self._chunks[0], indices, axis=0)
        out = np.empty((len(indices), self.side, self.side, 3), np.uint8)
        chunk_of = np.searchsorted(self._starts, indices, side="right") - 1
        for c in np.unique(chunk_of):
            mask = chunk_of == c
            out[mask] = self._chunks[c][indices[mask] - self._starts[c]]
        return out


def cache_fingerprint(src: Source, image_size: int, max_samples: Optional[int], detail: int = 1) -> str:
    key = [CACHE_FORMAT, src.dataset._fingerprint, src.split, image_size, max_samples, src.classes]
    key = json.dumps(key + [detail] if detail != 1 else key)  # detail 1: the same caches as before it existed
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def load_split(cfg: DataConfig, split: str, max_samples: Optional[int] = None,
               main_process_first: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
               log: Callable[[str], None] = print, local_main: Optional[bool] = None, detail: int = 1) -> ImageCache:
    """Open, decode once and map. The local main process verifies the cache (cache_files.py) and builds
    or rebuilds it while the others wait in `main_process_first`; they then verify it and read.

    `detail` > 1 (for the training split: 2) keeps up to `detail` x data.image_size pixels per side, never
    more than the source's own (the median shorter side of a sample of its images): a random crop
    is then resampled once from those pixels to data.image_size, with antialiasing (augment.py), as
    torchvision's RandomResizedCrop does from the original, instead of upscaling a crop of an image
    that was already shrunk to data.image_size. Where the source is no larger than data.image_size
    (Tiny ImageNet at 64) nothing changes: same side, same cache, same augmentation.

    `local_main` says whether this process is the one that may (re)build; by default it is asked of
    the owner of `main_process_first` (Accelerate's `local_main_process_first`), else True."""
    src = open_source(cfg.source, split)
    tag = f"{cfg.image_size}px" + (f"-x{detail}" if detail != 1 else "")
    folder = os.path.join(os.path.expanduser(cfg.cache_dir),
                          f"{_slug(cfg.source)}-{src.split}-{tag}-{cache_fingerprint(src, cfg.image_size, max_samples, detail)}")
    if local_main is None:
        local_main = bool(getattr(getattr(main_process_first, "__self__", None), "is_local_main_process", True))
    with main_process_first():
        if local_main:
            return _open_or_build(src, cfg, folder, max_samples, log, detail)
    # Only the local main process may remove or rebuild: ranks that each rebuilt what they found
    # damaged would delete the files their neighbours are reading.
    try:
        return _open_verified(folder)
    except CacheMismatch as e:
        raise DataError(f"decode cache {folder} is damaged ({e}) although the local main process had just verified "
                        "it; is data.cache_dir shared with a job that rewrites it?") from None


def load_train_val(cfg: DataConfig, main_process_first: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
                   log: Callable[[str], None] = print,
                   local_main: Optional[bool] = None) -> tuple[ImageCache, ImageCache]:
    """(train, validation) caches, opened or built as training reads them: the one place that says
    which split, subset and detail each uses, so `python -m tinydist.data` prepares exactly the
    caches `train` will open rather than ones it never reads. Arguments as `load_split`'s."""
    train = load_split(cfg, cfg.train_split, cfg.max_train_samples, main_process_first, log=log,
                       local_main=local_main, detail=cfg.train_detail)
    val = load_split(cfg, cfg.val_split, cfg.max_val_samples, main_process_first, log=log, local_main=local_main)
    return train, val


def _open_or_build(src: Source, cfg: DataConfig, folder: str, max_samples: Optional[int],
                   log: Callable[[str], None], detail: int = 1) -> ImageCache:
    if os.path.lexists(folder):
        try:
            return _open_verified(folder)
        except CacheMismatch as e:
            log(f"decode cache {folder} is damaged ({e}); rebuilding it")
            cache_files.discard(folder)
    # (detail passed only when used: tests spy on the five-argument call)
    _build_cache(src, cfg, folder, max_samples, log, **({"detail": detail} if detail != 1 else {}))
    try:
        return _open_verified(folder)
    except CacheMismatch as e:  # once: a cache that is damaged as soon as it is written will be again
        raise DataError(f"decode cache {folder} is damaged right after it was built ({e}); "
                        "check the disk or filesystem of data.cache_dir") from None


def _open_verified(folder: str) -> ImageCache:
    meta, tables = cache_files.check(folder, CACHE_FORMAT, _open_table)
    try:
        return ImageCache(folder, meta, tables)
    except ValueError as e:  # pyarrow's ArrowInvalid: e.g. nulls among the pixels, no zero-copy view
        raise CacheMismatch(f"pixels cannot be mapped: {first_line(e)}") from None


def _open_table(path: str) -> Any:
    import datasets

    return datasets.Dataset.from_file(path).data.table  # memory-mapped


def _slug(source: str) -> str:
    return re.sub(r"[^\w.-]+", "_", source.strip("/~.")).strip("_")[-40:] or "source"


def _subset(n: int, max_samples: Optional[int]) -> Optional[np.ndarray]:
    """A fixed random subset: the first k rows of a split sorted by class would hold a single class."""
    if max_samples is None or max_samples >= n:
        return None
    return np.sort(np.random.default_rng(0).permutation(n)[:max_samples])


def source_side(ds: Any, sample: int = 64) -> int:
    """The median shorter side of up to `sample` images spread over `ds` (headers only: no decode)."""
    from PIL import Image

    rows = np.unique(np.linspace(0, len(ds) - 1, min(sample, len(ds))).round().astype(int))
    sides = []
    for image in ds.select(rows)["image"]:
        try:
            with Image.open(io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]) as im:
                sides.append(min(im.size))
        except (OSError, ValueError):  # the build names the bad image; here it only does not count
            continue
    return int(np.median(sides)) if sides else 0


def _build_cache(src: Source, cfg: DataConfig, folder: str, max_samples: Optional[int],
                 log: Callable[[str], None], detail: int = 1) -> None:
    import datasets

    ds = src.dataset
    subset = _subset(len(ds), max_samples)
    if subset is not None:
        ds = ds.select(subset)
    # Labels are re-indexed by sorted class name so every source agrees on what label i means.
    remap = np.argsort(np.argsort(src.classes)).astype(np.int64)
    classes = sorted(src.classes)
    side = cfg.image_size
    if detail > 1:
        side = max(side, min(detail * cfg.image_size, source_side(ds)))
    features = datasets.Features({"pixels": datasets.List(datasets.Value("uint8"), length=side * side * 3),
                                  "label": datasets.Value("int64"), "gray": datasets.Value("bool"),
                                  "shorter_side": datasets.Value("int32")})
    num_proc = cfg.num_proc or min(os.cpu_count() or 1, 16)
    num_proc = max(1, min(num_proc, len(ds) // 1000 or 1))  # process start-up dominates small splits
    cache_files.remove_stale_temps(folder, log)
    # The folder appears complete or not at all: a process killed mid-build leaves only this temp
    # folder, which the next build sweeps. One with our own name is stale too: containers restart
    # with the same pids, and this process builds one folder at a time.
    tmp = cache_files.temp_folder(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    log(f"decoding {len(ds)} images of {src.name} [{src.split}] to {side}x{side} uint8 in {folder} ({num_proc} processes)")
    with cache_files.forks_detached():  # pool workers and the map's Manager: see cache_files.py
        decoded = ds.map(_decode_batch, batched=True, batch_size=256, with_indices=True, num_proc=num_proc,
                         remove_columns=ds.column_names, features=features,
                         fn_kwargs={"side": side, "remap": remap, "origin": f"{src.name} [{src.split}]",
                                    "builder": os.getpid(), "rows": subset},
                         cache_file_name=os.path.join(tmp, "decoded.arrow"), load_from_cache_file=False,
                         desc=f"decode {src.split}")
    files = sorted(os.path.basename(f["filename"]) for f in decoded.cache_files)
    del decoded
    # What cache.json records is read back from the files, as an open will read them.
    tables = {name: _open_table(os.path.join(tmp, name)) for name in files}
    small, empty = _report_suspicious(src, ds, subset, tables, classes, side, log)
    meta = {"format": CACHE_FORMAT, "source": src.name, "kind": src.kind, "split": src.split,
            "rows": sum(t.num_rows for t in tables.values()), "image_size": side, "output_size": cfg.image_size,
            "classes": classes,
            "grayscale": int(sum(np.sum(t.column("gray")) for t in tables.values())), "files": files,
            "max_samples": max_samples, "small_images": small, "empty_classes": empty,
            "arrow": {name: cache_files.file_record(os.path.join(tmp, name), t) for name, t in tables.items()}}
    del tables
    with open(os.path.join(tmp, "cache.json"), "w") as f:
        json.dump(meta, f, indent=1)
    try:
        os.rename(tmp, folder)
    except OSError:  # another node sharing this filesystem finished first; its copy is as good
        shutil.rmtree(tmp, ignore_errors=True)


def _report_suspicious(src: Source, ds: Any, subset: Optional[np.ndarray], tables: dict[str, Any],
                       classes: list[str], side: int, log: Callable[[str], None]) -> tuple[int, list[str]]:
    """Say once per build, in one warning line each, what decodes but is unlikely to be meant: images
    with a shorter side below SMALL_SIDE, and (in a whole split) classes without a single image.
    Returns (small images, empty classes) for cache.json."""
    rows = list(tables.values())  # in cache order: row i is row i of `ds`
    sides = np.concatenate([t.column("shorter_side").to_numpy() for t in rows])
    small = np.flatnonzero(sides < SMALL_SIDE)
    where = f"{src.name} [{src.split}]"
    if len(small):
        first = int(small[0])
        image = ds[first]["image"]
        log(f"warning: {len(small)} of {len(sides)} images of {where} have a side under {SMALL_SIDE} px, e.g. "
            f"image #{_source_row(first, subset)} ({image.get('path') or 'embedded bytes'}, shorter side "
            f"{sides[first]} px); they are upscaled to {side}x{side} like the rest: check the source")
    empty: list[str] = []
    if subset is None:  # a random subset may miss a class by chance: only a whole split says something
        labels = np.concatenate([t.column("label").to_numpy() for t in rows])
        empty = [c for c, n in zip(classes, np.bincount(labels, minlength=len(classes))) if n == 0]
    if empty:
        # A warning, not an error (unlike an empty class folder of tiny-imagenet-200): a source's
        # ClassLabel names are its author's declaration, and synthetic sources (the benches' random
        # labels) legitimately leave some empty. The model still gets an output for each.
        log(f"warning: {len(empty)} of {len(classes)} classes have no images in {where}, e.g. `{empty[0]}`; "
            "nothing teaches (train) or tests (valid) them")
    return int(len(small)), empty


def _source_row(index: int, rows: Optional[np.ndarray]) -> int:
    """Row `index` of a (possibly subsetted) split, as a row number of the source split: what the user can find."""
    return int(rows[index]) if rows is not None else int(index)


def _decode_batch(batch: dict[str, list], indices: list[int], side: int, remap: np.ndarray,
                  origin: str, builder: int, rows: Optional[np.ndarray] = None) -> dict[str, Any]:
    from PIL import Image, UnidentifiedImageError

    cache_files.detach_worker(builder)
    pixels = np.empty((len(indices), side * side * 3), np.uint8)
    gray, sides = [], []
    for row, (image, index) in enumerate(zip(batch["image"], indices)):
        try:
            with Image.open(io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]) as im:
                gray.append(im.mode in ("L", "LA", "1", "F") or im.mode.startswith("I"))
                sides.append(min(im.size))
                rgb = to_rgb8(im)
                if rgb.size != (side, side):
                    rgb = rgb.resize((side, side), Image.BICUBIC)
                pixels[row] = np.asarray(rgb, np.uint8).reshape(-1)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            where = image.get("path") or "embedded bytes"
            raise DataError(f"{origin}: image #{_source_row(index, rows)} ({where}) cannot be decoded: "
                            f"{first_line(e)}; fix or remove it from the source") from None
    labels = remap[np.asarray(batch["label"], np.int64)]
    return {"pixels": pixels, "label": labels, "gray": gray, "shorter_side": sides}


def to_rgb8(im: Any) -> Any:
    """`im` (a PIL image) as 8-bit RGB. Pillow's convert("RGB") clips integer modes at 255, which
    turns a 16-bit image (a 16-bit PNG opens as I;16, or I in older Pillow; a TIFF as I;16 or I;16B)
    99% white: its top 8 bits are kept instead, as Pillow itself does for 16-bit RGB PNGs."""
    from PIL import Image

    if not im.mode.startswith("I"):
        return im.convert("RGB")
    values = np.asarray(im).astype(np.int64)  # native or big-endian uint16, or int32 for mode I
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    if low < 0 or high > 0xFFFF:
        # 32-bit or signed data has no agreed scale to 8 bits: any guess (per-image stretching) would
        # change what the class looks like from one image to the next.
        raise ValueError(f"{im.mode} pixels span {low}..{high}, beyond 16 bits; expected 8- or 16-bit images")
    return Image.fromarray((values >> 8).astype(np.uint8), "L").convert("RGB")


# ---------------------------------------------------------------------------------------------
# `python -m tinydist.data`


def describe(cfg: DataConfig) -> dict[str, Any]:
    """What a source holds: kind, splits and rows, classes, grayscale and small-image counts, and the
    caches `train` reads (built here if missing, by the very call `train` makes)."""
    info: dict[str, Any] = {"source": cfg.source}
    for cache in load_train_val(cfg, log=lambda msg: print(msg, file=sys.stderr)):
        meta = cache.meta
        info.setdefault("kind", meta["kind"])
        info.setdefault("classes", cache.classes)
        info.setdefault("grayscale", {})[meta["split"]] = meta["grayscale"]
        info.setdefault("small_images", {})[meta["split"]] = meta["small_images"]
        info.setdefault("cache", {})[meta["split"]] = cache.folder
    info["splits"] = open_source(cfg.source, cfg.train_split).splits
    info["num_classes"] = len(info["classes"])
    return info


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli.run(lambda: _main(sys.argv[1:] if argv is None else argv))


def _main(argv: Sequence[str]) -> int:
    from tinydist.config import HELP_FLAGS, HelpRequested, help_text, load_config

    if any(arg in HELP_FLAGS for arg in argv):  # before load_config, which would raise the train's help
        raise HelpRequested(help_text(
            "python -m tinydist.data", usage="python -m tinydist.data --config FILE [--section.key=VALUE ...] [--json]",
            about="Describe the data a config trains on: source kind, splits and rows, classes, grayscale and "
                  "small-image counts, and the decode caches training reads (built on first use); --json: one "
                  "JSON object. Only the [data] keys matter here."))
    as_json = "--json" in argv
    info = describe(load_config([a for a in argv if a != "--json"], prog="python -m tinydist.data").data)
    if as_json:
        print(json.dumps(info))
        return 0
    print(f"source:   {info['source']} ({info['kind']})")
    print("splits:   " + ", ".join(f"{k} ({v} rows)" for k, v in info["splits"].items()))
    names = info["classes"]
    print(f"classes:  {len(names)}: {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}")
    print("grayscale: " + ", ".join(f"{k} {v}" for k, v in info["grayscale"].items()))
    print(f"small (< {SMALL_SIDE} px): " + ", ".join(f"{k} {v}" for k, v in info["small_images"].items()))
    for split, folder in info["cache"].items():
        print(f"cache:    {split}: {folder}")
    return 0

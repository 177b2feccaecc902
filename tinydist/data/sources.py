"""Sources: what `data.source` may name, opened as one `datasets.Dataset` per split with an undecoded
`image` column and a `label` column, and the class names its labels index.

A source is a Hugging Face hub id (owner/name), a folder of the hub's parquet layout, a
`save_to_disk` folder, the original `tiny-imagenet-200` layout unpacked, or `digits` (scikit-learn's,
offline). What is not a folder must be a hub id: a path that merely looks like one fails here at once,
naming the folder that does not exist, rather than after the hub's retries. The hub not reached
(offline, DNS, timeouts, 429 and 5xx) is a TransientError (69); the hub answering no (no such dataset, gated,
no data files) and a source whose content is wrong are a DataError (2).

A tiny-imagenet-200 class folder with no training image is a DataError too: wnids.txt makes it a
class, so an empty folder is a copy cut short. A source's labels are its own; the decode cache
(cache.py) re-indexes them by sorted class name.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from tinydist.config import ConfigError
from tinydist.runtime.quote import first_line
from tinydist.runtime.exitcodes import TransientError

SPLIT_ALIASES = (("valid", "validation", "val"), ("train",), ("test",))
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class DataError(ConfigError):
    """A data source problem the user can fix; one line naming what was found and what was expected."""


@dataclass
class Source:
    """One split of a source, before decoding."""

    kind: str  # hub | parquet folder | save_to_disk folder | tiny-imagenet-200 folder | digits
    name: str  # what the user wrote in data.source
    split: str  # the split's name in the source (after aliasing)
    dataset: Any  # datasets.Dataset with columns `image` (undecoded) and `label`
    classes: list[str]  # class names; label i of the *source* is classes[i]
    splits: dict[str, int]  # every split of the source and its rows


def open_source(source: str, split: str) -> Source:
    """Open `split` of `source`; see `DataConfig.source` for what a source may be."""
    kind, splits = _open_all(source)
    name = _resolve_split(source, split, list(splits))
    ds = splits[name]
    image_col = next((c for c, f in ds.features.items() if type(f).__name__ == "Image"), None)
    label_col = next((c for c in ("label", "labels") if c in ds.column_names), None)
    if image_col is None or label_col is None:
        raise DataError(f"data.source `{source}` split `{name}` has columns {ds.column_names}; "
                        "expected an image column (datasets Image feature) and a `label` column")
    import datasets

    ds = ds.select_columns([image_col, label_col])
    ds = ds.rename_columns({image_col: "image", label_col: "label"})
    ds = ds.cast_column("image", datasets.Image(decode=False))
    label_feature = ds.features["label"]
    classes = list(getattr(label_feature, "names", None) or [])
    if not classes:  # plain integer labels: name them by their value
        classes = [str(i) for i in range(int(max(ds["label"])) + 1)]
    return Source(kind, source, name, ds, classes, {k: len(v) for k, v in splits.items()})


def _open_all(source: str) -> tuple[str, dict[str, Any]]:
    if source == "digits":
        return "digits", digits_dataset()
    path = os.path.expanduser(source)
    if not os.path.isdir(path):
        _check_hub_id(source, path)  # what is not a folder must be a hub id; a missing path fails here, at once
    import datasets

    if os.path.isdir(path):
        for root in (path, os.path.join(path, "tiny-imagenet-200")):
            if os.path.isfile(os.path.join(root, "wnids.txt")):
                return "tiny-imagenet-200 folder", tiny_imagenet_folder(root)
        if os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(os.path.join(path, "state.json")):
            loaded = datasets.load_from_disk(path)
            if isinstance(loaded, datasets.Dataset):
                return "save_to_disk folder", {"train": loaded}
            return "save_to_disk folder", dict(loaded)
        try:
            # Pass datasets its own resolved file list: given only a README's file patterns, it keys its
            # Arrow cache by those patterns and serves a stale copy of a parquet file rewritten in place.
            files = datasets.load_dataset_builder(path).config.data_files
            return "parquet folder", dict(datasets.load_dataset(path, data_files=files))
        except (ValueError, FileNotFoundError) as e:
            raise DataError(f"data.source `{source}`: no dataset found in this folder ({first_line(e)}); "
                            "expected the hub parquet layout, a save_to_disk folder or tiny-imagenet-200") from None
    # owner/name is also how a relative path looks (data/tiny-imagenet): whatever the hub answers,
    # the same line says that no such folder exists here, so whoever meant a path sees it at once.
    local = f"and no local folder {os.path.abspath(path)} exists"
    hint = ("if you meant a local folder, correct the path; for the hub dataset, download it where the hub is "
            "reachable (datasets' save_to_disk, the parquet files, or tiny-imagenet-200.zip unpacked) and set "
            "data.source to that folder")
    unreachable = _hub_unreachable_now()
    if unreachable:
        raise TransientError(f"cannot reach the Hugging Face hub for `{source}` ({unreachable}), {local}; {hint}, "
                             "or try offline with --config configs/smoke.yaml")
    try:
        return "hub", dict(datasets.load_dataset(source))
    except Exception as e:  # sorted below; what is neither a network nor a data problem (a bug) is re-raised
        # Two different answers, two exit codes: the hub not reached at all (offline, DNS, timeouts,
        # 5xx, HF_HUB_OFFLINE=1 with nothing cached) may work on a relaunch: 69. The hub answering
        # "no" (no such repository, gated, not a dataset, no data files) never will: 2. Offline,
        # a repository that does not exist cannot be told from one that does: that is transient too.
        if _hub_unreachable(e):
            raise TransientError(f"cannot reach the Hugging Face hub for `{source}` ({type(e).__name__}: "
                                 f"{first_line(e)}), {local}; {hint}, or try offline with --config "
                                 "configs/smoke.yaml") from None
        if isinstance(e, (OSError, ValueError, RuntimeError)):
            raise DataError(f"cannot load `{source}` from the Hugging Face hub ({type(e).__name__}: "
                            f"{first_line(e)}), {local}; {hint}") from None
        raise


# Names that downloads unpack to: `something/<one of these>` is a local path, never a hub id.
LOCAL_FOLDER_NAMES = ("tiny-imagenet-200",)


def _check_hub_id(source: str, path: str) -> None:
    """`source` is not a local folder: raise DataError unless it can only mean a hub id (owner/name).
    A path that looks like one (`data/tiny-imagenet-200`) would otherwise cost the hub's retries and
    end in advice to download what the user meant to point at."""
    seps = tuple({"/", os.sep, os.altsep or "/"})
    cwd = os.getcwd()
    where = f" (relative to {cwd})" if not os.path.isabs(path) else (f" ({path})" if path != source else "")
    if os.path.exists(path):
        raise DataError(f"data.source `{source}`{where} is a file, not a folder; expected a dataset folder "
                        "(unpack an archive first), a hub id like zh-plus/tiny-imagenet, or `digits`")
    missing = f"data.source `{source}`: no such folder{where}"
    if not any(sep in source for sep in seps):  # no separator: not a path, and not owner/name either
        raise DataError(f"{missing}; expected a local dataset folder, a hub id (owner/name) like "
                        "zh-plus/tiny-imagenet, or `digits`")
    if source.startswith((".", "~") + seps):  # plainly a path
        # `..` and `./` are resolved by the working directory alone: show where that led
        raise DataError(missing if os.path.isabs(path) else f"{missing}: {os.path.abspath(path)}")
    bare = source.rstrip("".join(seps))
    if bare != source and HUB_ID.match(bare):
        raise DataError(f"{missing}; a trailing `/` makes it a path: for the Hugging Face hub dataset, write `{bare}`")
    if not HUB_ID.match(source):
        raise DataError(f"{missing}; if you meant a Hugging Face hub dataset, `{source}` does not look like one: "
                        "hub ids are owner/name, like zh-plus/tiny-imagenet")
    first, last = source.split("/")  # owner/name, the only shape left
    if os.path.isdir(first):
        raise DataError(f"{missing}, though `{first}` is a folder there; if you meant the Hugging Face hub "
                        f"dataset `{source}`, that local `{first}` folder makes it a path: run from another directory")
    if last in LOCAL_FOLDER_NAMES:
        raise DataError(f"{missing}; if you meant the Hugging Face hub dataset `{source}`, it does not look like one: "
                        f"`{last}` is what tiny-imagenet-200.zip unpacks to (the hub copy is zh-plus/tiny-imagenet)")


# How the HTTP clients under huggingface_hub / datasets / fsspec say "not reached" (connect errors,
# timeouts); which client a version uses varies (httpx, httpx2, requests), and one in use is imported.
_NETWORK_ERRORS = (("httpx", "TransportError"), ("httpx2", "TransportError"), ("requests", "ConnectionError"),
                   ("requests", "Timeout"), ("aiohttp", "ClientConnectionError"))


def _hub_unreachable(error: BaseException) -> bool:
    """Whether `error`, or what it was raised from, says the hub was not reached (as opposed to answering no)."""
    from datasets.exceptions import DataFilesNotFoundError, DatasetNotFoundError

    if isinstance(error, (DatasetNotFoundError, DataFilesNotFoundError)):  # no such repo or revision, gated, no data
        return False
    # datasets re-raises offline mode and connect errors as the builtin ConnectionError
    network: tuple[type, ...] = (ConnectionError, TimeoutError)
    network += tuple(getattr(sys.modules[m], name) for m, name in _NETWORK_ERRORS
                     if m in sys.modules and isinstance(getattr(sys.modules[m], name, None), type))
    seen: list[BaseException] = []
    while error is not None and len(seen) < 16 and all(error is not e for e in seen):
        status = getattr(getattr(error, "response", None), "status_code", None)
        if isinstance(error, network) or status in (429, 500, 502, 503, 504):  # 429/5xx: the hub is down or busy
            return True
        seen.append(error)
        error = error.__cause__ or error.__context__
    return False


def _hub_unreachable_now(timeout_s: float = 3.0) -> str:
    """Why the hub cannot be reached at all (DNS, no route), found in seconds; "" if it may be. Without
    this, an offline start spends ~30 s in huggingface_hub's retries before saying the same. Skipped
    behind a proxy (a direct connection proves nothing there) and in offline mode (datasets decides)."""
    import socket
    import urllib.parse

    if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE") or any(
            os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return ""
    endpoint = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        return f"{type(e).__name__} connecting to {host}:{port}: {e}"
    return ""


def _resolve_split(source: str, split: str, available: Sequence[str]) -> str:
    if split in available:
        return split
    for group in SPLIT_ALIASES:
        if split in group:
            for alias in group:
                if alias in available:
                    return alias
    raise DataError(f"data.source `{source}` has no split `{split}`; it has {', '.join(available)}")


def tiny_imagenet_folder(root: str) -> dict[str, Any]:
    """The original tiny-imagenet-200 layout; HF's `imagefolder` builder mislabels it."""
    import datasets

    with open(os.path.join(root, "wnids.txt")) as f:
        wnids = sorted(line.strip() for line in f if line.strip())  # the file is not sorted
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=wnids)})
    index = {w: i for i, w in enumerate(wnids)}
    splits = {}
    train_files, train_labels = [], []
    for wnid in wnids:
        folder = os.path.join(root, "train", wnid, "images")
        if not os.path.isdir(folder):
            raise DataError(f"tiny-imagenet-200 folder `{root}`: missing {folder}; expected one folder per id in wnids.txt")
        names = sorted(os.listdir(folder))
        if not names:
            # An error, not a warning: wnids.txt makes it a class (the model gets an output for it, its
            # validation images are scored), so an empty folder is a copy or unpack cut short, and a
            # model trained without it would be silently worse on it. No relaunch fixes that.
            raise DataError(f"tiny-imagenet-200 folder `{root}`: class {wnid} has no training images in {folder}; "
                            f"expected its images there (copy them again), or remove {wnid} from wnids.txt")
        train_files += [os.path.join(folder, name) for name in names]
        train_labels += [index[wnid]] * len(names)
    splits["train"] = _files_dataset(root, train_files, train_labels, features)
    annotations = os.path.join(root, "val", "val_annotations.txt")
    if os.path.isfile(annotations):
        files, labels = [], []
        with open(annotations) as f:
            for lineno, line in enumerate(f, 1):
                fields = line.rstrip("\n").split("\t")
                if len(fields) < 2 or fields[1] not in index:
                    raise DataError(f"{annotations}:{lineno}: expected `file<TAB>wnid...` with a wnid from wnids.txt, "
                                    f"got {line.strip()!r}")
                files.append(os.path.join(root, "val", "images", fields[0]))
                labels.append(index[fields[1]])
        splits["valid"] = _files_dataset(root, files, labels, features)
    return splits


def _files_dataset(root: str, files: list[str], labels: list[int], features: Any) -> Any:
    import datasets

    # from_dict fingerprints the paths, not the images: fold in each file's size and mtime, so that
    # images replaced in place give a new cache instead of the stale one.
    stamp = hashlib.sha256()
    for path in files:
        try:
            stat = os.stat(path)
        except OSError as e:
            raise DataError(f"tiny-imagenet-200 folder `{root}`: cannot read {path} ({e.strerror})") from None
        stamp.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    ds = datasets.Dataset.from_dict({"image": files, "label": labels}, features=features)
    return datasets.Dataset(ds.data, info=ds.info, fingerprint=stamp.hexdigest()[:16])


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) with values 0..16, labels) from the file scikit-learn ships, read as its
    `load_digits` reads it, without importing scikit-learn: that import alone is 2 s of every run's
    start on the smoke recipe. Found by its package's location (find_spec runs no package code)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data.source `digits` reads the digits that scikit-learn ships: pip install scikit-learn")
    path = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data", "digits.csv.gz")
    if not os.path.isfile(path):  # a scikit-learn that keeps them elsewhere: let it say where
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.images, digits.target
    data = np.loadtxt(path, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


@functools.lru_cache(maxsize=1)  # asked for once per split: build (and PNG-encode) it once per process
def digits_dataset(val_fraction: float = 1 / 6) -> dict[str, Any]:
    """scikit-learn's 1,797 handwritten digits (shipped inside scikit-learn, so no download) as a
    Tiny-ImageNet-shaped dataset: 64x64 grayscale PNGs, 10 classes, splits `train` and `valid`."""
    import datasets
    from PIL import Image

    values, target = _digits_arrays()
    pixels = (values * (255.0 / 16.0)).round().astype(np.uint8)
    images = [Image.fromarray(p, mode="L").resize((64, 64), Image.BILINEAR) for p in pixels]
    order = np.random.default_rng(0).permutation(len(images))
    n_val = int(len(images) * val_fraction)
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[f"digit_{d}" for d in range(10)])})

    def split(idx: np.ndarray) -> Any:
        idx = np.sort(idx)
        return datasets.Dataset.from_dict(
            {"image": [images[i] for i in idx], "label": target[idx].tolist()}, features=features)

    return {"train": split(order[n_val:]), "valid": split(order[:n_val])}

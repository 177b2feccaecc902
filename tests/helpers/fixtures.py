"""Small, deterministic Tiny-ImageNet-shaped datasets on disk, in every layout tinydist.data reads.

    from helpers.fixtures import build_hub_parquet, build_tiny_imagenet_folder, samples, CLASSES

Every builder writes the same images (64x64 JPEGs, class-dependent content, some grayscale) with
the same labels, so a test can check that all layouts load to the same thing:

- `build_hub_parquet(root)`: the hub copy's layout, README.md dataset card + data/*.parquet;
- `build_hub_parquet(root, readme=False)`: the same without README (split names inferred by datasets);
- `build_tiny_imagenet_folder(root)`: the original tiny-imagenet-200.zip layout, unpacked;
- `build_save_to_disk(root)`: a `DatasetDict.save_to_disk` folder.

`datasets` is imported inside the functions: importing it reads HF_HUB_OFFLINE, which conftest.py
sets only once the session starts, after test modules are collected.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

# Real WordNet ids of Tiny ImageNet, in the (unsorted) order the original wnids.txt lists them.
WNIDS = ["n02124075", "n01443537", "n04067472", "n01629819", "n02808440"]
WORDS = {"n02124075": "Egyptian cat", "n01443537": "goldfish, Carassius auratus",
         "n04067472": "reel", "n01629819": "European fire salamander, Salamandra salamandra",
         "n02808440": "bathtub, bathing tub, bath, tub"}
CLASSES = sorted(WNIDS)  # label i of every source, once loaded, is CLASSES[i]
SPLITS = {"train": 8, "valid": 3}  # images per class
TEST_IMAGES = 4
IMAGE_SIZE = 64
GRAY_EVERY = 4  # image k of a class (train and valid) is grayscale (mode L) when k % GRAY_EVERY == 1


@dataclass(frozen=True)
class Sample:
    name: str  # file name in the tiny-imagenet-200 layout, e.g. n01443537_3.JPEG or val_7.JPEG
    wnid: str
    label: int  # index of wnid in CLASSES
    gray: bool
    jpeg: bytes


def _pixels(class_index: int, split: str, k: int, variant: int) -> np.ndarray:
    """A 64x64x3 image that looks like its class (a colour and a bar) and is unique to (split, k)."""
    rng = np.random.default_rng([class_index, len(split), k, variant])
    palette = np.array([[200, 40, 40], [40, 180, 60], [50, 70, 210], [220, 200, 40], [150, 60, 190],
                        [40, 190, 190], [240, 130, 30], [120, 120, 120]], np.float64)
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3))
    image[:] = palette[class_index % len(palette)] * 0.6
    width = 6 + 4 * class_index  # a vertical bar whose width says the class
    left = int(rng.integers(0, IMAGE_SIZE - width))
    image[:, left:left + width] = 255 - palette[class_index % len(palette)]
    image += rng.normal(0, 18, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def encode_jpeg(pixels: np.ndarray, gray: bool = False, quality: int = 90) -> bytes:
    from PIL import Image

    image = Image.fromarray(pixels, "RGB")
    if gray:
        image = image.convert("L")
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def samples(split: str, variant: int = 0) -> list[Sample]:
    """The images of `split` ("train", "valid" or "test"; test rows have wnid "" and label -1), in a
    class-interleaved order. `variant` != 0 gives different pixels under the same names and labels."""
    if split == "test":
        return [Sample(f"test_{k}.JPEG", "", -1, False, encode_jpeg(_pixels(7, split, k, variant)))
                for k in range(TEST_IMAGES)]
    out = []
    for k in range(SPLITS[split]):
        for wnid in WNIDS:
            label = CLASSES.index(wnid)
            gray = k % GRAY_EVERY == 1
            name = f"{wnid}_{k}.JPEG" if split == "train" else f"val_{len(out)}.JPEG"
            out.append(Sample(name, wnid, label, gray, encode_jpeg(_pixels(label, split, k, variant), gray)))
    return out


def num_grayscale(split: str) -> int:
    return sum(s.gray for s in samples(split))


def _features(class_names: Sequence[str]):
    import datasets

    return datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(class_names))})


def _dataset(split: str, class_names: Sequence[str], variant: int = 0, corrupt: Optional[int] = None):
    """A datasets.Dataset of `split` whose ClassLabel names are `class_names` (labels follow them)."""
    import datasets

    rows = samples(split, variant)
    images = [{"bytes": s.jpeg, "path": None} for s in rows]
    if corrupt is not None:  # a row whose bytes are not an image at all
        images[corrupt] = {"bytes": b"\xff\xd8\xff\xe0 this is not a JPEG" + bytes(64), "path": None}
    labels = [list(class_names).index(s.wnid) for s in rows]
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=_features(class_names))


_README = """---
dataset_info:
  features:
  - name: image
    dtype: image
  - name: label
    dtype:
      class_label:
        names:
{names}
  splits:
{splits}
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: valid
    path: data/valid-*
---

# tiny-imagenet (test fixture)

A few images per class in the layout of the hub's zh-plus/tiny-imagenet.
"""


def build_hub_parquet(root: str, readme: bool = True, variant: int = 0, corrupt: Optional[int] = None) -> str:
    """`root` in the hub layout: README.md (dataset card with configs and ClassLabel names) and
    data/{train,valid}-00000-of-00001.parquet with `image` ({bytes, path}) and `label` columns.
    Without the README, datasets infers split names from file names. `corrupt` = a train row whose
    image bytes are garbage. Returns `root`."""
    os.makedirs(os.path.join(root, "data"), exist_ok=True)
    for split in SPLITS:
        ds = _dataset(split, CLASSES, variant, corrupt if split == "train" else None)
        ds.to_parquet(os.path.join(root, "data", f"{split}-00000-of-00001.parquet"))
    path = os.path.join(root, "README.md")
    if readme:
        names = "\n".join(f"          '{i}': {w}" for i, w in enumerate(CLASSES))
        # num_bytes is nominal: the card must not change when a variant rewrites the parquet files
        splits = "\n".join(f"  - name: {s}\n    num_bytes: {n * len(WNIDS) * 4000}\n    num_examples: {n * len(WNIDS)}"
                           for s, n in SPLITS.items())
        with open(path, "w") as f:
            f.write(_README.format(names=names, splits=splits))
    elif os.path.exists(path):
        os.remove(path)
    return root


def build_tiny_imagenet_folder(root: str, variant: int = 0) -> str:
    """The original tiny-imagenet-200.zip unpacked under `root`; returns `root`/tiny-imagenet-200."""
    base = os.path.join(root, "tiny-imagenet-200")
    os.makedirs(base, exist_ok=True)
    with open(os.path.join(base, "wnids.txt"), "w") as f:
        f.write("".join(f"{w}\n" for w in WNIDS))  # not sorted, like the real file
    with open(os.path.join(base, "words.txt"), "w") as f:
        f.write("".join(f"{w}\t{WORDS[w]}\n" for w in sorted(WORDS, reverse=True)))
    by_class: dict[str, list[Sample]] = {w: [] for w in WNIDS}
    for s in samples("train", variant):
        by_class[s.wnid].append(s)
    for wnid, rows in by_class.items():
        images = os.path.join(base, "train", wnid, "images")
        os.makedirs(images, exist_ok=True)
        for s in rows:
            with open(os.path.join(images, s.name), "wb") as f:
                f.write(s.jpeg)
        with open(os.path.join(base, "train", wnid, f"{wnid}_boxes.txt"), "w") as f:
            f.write("".join(f"{s.name}\t4\t6\t{IMAGE_SIZE - 5}\t{IMAGE_SIZE - 3}\n" for s in rows))
    os.makedirs(os.path.join(base, "val", "images"), exist_ok=True)
    val = samples("valid", variant)
    for s in val:
        with open(os.path.join(base, "val", "images", s.name), "wb") as f:
            f.write(s.jpeg)
    with open(os.path.join(base, "val", "val_annotations.txt"), "w") as f:
        f.write("".join(f"{s.name}\t{s.wnid}\t2\t3\t{IMAGE_SIZE - 2}\t{IMAGE_SIZE - 1}\n" for s in val))
    os.makedirs(os.path.join(base, "test", "images"), exist_ok=True)
    for s in samples("test", variant):
        with open(os.path.join(base, "test", "images", s.name), "wb") as f:
            f.write(s.jpeg)
    return base


def build_save_to_disk(root: str, class_names: Sequence[str] = tuple(CLASSES), variant: int = 0) -> str:
    """A DatasetDict (train, valid) saved with save_to_disk into `root`; labels index `class_names`
    (pass WNIDS for a source whose label order is not sorted). Returns `root`."""
    import datasets

    datasets.DatasetDict({split: _dataset(split, class_names, variant) for split in SPLITS}).save_to_disk(root)
    return root


def encode_png(pixels: np.ndarray) -> bytes:
    """`pixels` as a PNG: uint8 (H, W) or (H, W, 3) as 8-bit, uint16 (H, W) as 16-bit grayscale."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def build_class_folders(root: str, images: dict[str, list[bytes]], suffix: str = ".png") -> str:
    """A tiny-imagenet-200 folder under `root` with a train split only: class `wnid`'s images are
    `images[wnid]` (in order, named {wnid}_{k}{suffix}); an empty list leaves an empty images folder.
    Returns `root`/tiny-imagenet-200."""
    base = os.path.join(root, "tiny-imagenet-200")
    os.makedirs(base, exist_ok=True)
    with open(os.path.join(base, "wnids.txt"), "w") as f:
        f.write("".join(f"{w}\n" for w in images))
    for wnid, encoded in images.items():
        folder = os.path.join(base, "train", wnid, "images")
        os.makedirs(folder, exist_ok=True)
        for k, image in enumerate(encoded):
            with open(os.path.join(folder, f"{wnid}_{k}{suffix}"), "wb") as f:
                f.write(image)
    return base

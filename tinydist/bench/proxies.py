"""Offline proxies of "real images the project never saw", for `bench quality`: square patches of real
photographs, labelled by photograph, cut from images that installed packages ship (no download at
run time). Train patches come from the left 70% of each photo, val patches from the right 30%, so no
val pixel was seen in training; patch sides vary, so the model sees scale changes as in real data.

    python -m tinydist.bench quality --make-photos DIR [--proxy photos10|photos-all] [--photos-from FOLDER]

Proxies:
- `photos10`: 10 classes, the colour photographs: scikit-learn's china and flower, scikit-image's
  astronaut, chelsea, coffee, rocket, motorcycle_left, hubble_deep_field, retina, and matplotlib's
  grace_hopper (10 classes, as the issue's data set).
- `photos-all`: every photograph of at least 2 x the smallest patch side in scikit-learn's and
  scikit-image's data (grey ones as RGB too: camera, moon, coins, page, text, brick, grass, gravel, ...)
  plus matplotlib's grace_hopper: more classes, some of them textures.
`--photos-from FOLDER` adds every image in FOLDER to either.
"""

from __future__ import annotations

import io
import os
from typing import Any, Optional

import numpy as np

from tinydist.config import ConfigError

PHOTOS10 = ("china", "flower", "astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "hubble_deep_field",
            "retina", "grace_hopper")
PROXIES = ("photos10", "photos-all")
# scikit-image's bundled images that are drawings, masks or synthetic, not photographs.
NOT_PHOTOS = ("chessboard_GRAY", "chessboard_RGB", "logo", "phantom", "color", "clock_motion", "microaneurysms",
              "cell", "ihc", "motorcycle_right")


def _folder_images(folder: str, min_side: int) -> dict[str, Any]:
    from PIL import Image

    found = {}
    for name in sorted(os.listdir(folder)):
        try:
            with Image.open(os.path.join(folder, name)) as im:
                if min(im.size) >= min_side:
                    found[os.path.splitext(name)[0]] = im.convert("RGB")
        except OSError:  # not an image: skipped
            continue
    return found


def shipped_photos(proxy: str, min_side: int, photos_from: Optional[str] = None) -> dict[str, Any]:
    """{name: PIL RGB image} of proxy `proxy` (see the module docstring)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    if proxy not in PROXIES:
        raise ConfigError(f"bad value for --proxy: {proxy!r}; expected one of {', '.join(PROXIES)}")
    photos = {name: Image.fromarray(im) for name, im in zip(("china", "flower"), load_sample_images().images)}
    try:
        import skimage.data

        shipped = _folder_images(os.path.dirname(skimage.data.__file__), min_side)
        photos.update({k: v for k, v in shipped.items() if k not in NOT_PHOTOS})
    except ImportError:  # scikit-image is optional: the proxy is then smaller, and says so by its class list
        pass
    try:
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
            photos["grace_hopper"] = Image.open(f).convert("RGB")
    except (ImportError, OSError):  # matplotlib's sample data are optional too
        pass
    if proxy == "photos10":
        photos = {k: v for k, v in photos.items() if k in PHOTOS10}
    if photos_from:
        photos.update(_folder_images(photos_from, min_side))
    return {k: v for k, v in photos.items() if min(v.size) >= min_side}


def make_photo_source(folder: str, photos_from: Optional[str] = None, train: int = 3000, val: int = 1500,
                      sizes: tuple[int, int] = (64, 128), seed: int = 0, proxy: str = "photos-all") -> str:
    """Writes the proxy as a save_to_disk folder (`--data.source=FOLDER`); a one-line description."""
    import datasets

    photos = shipped_photos(proxy, 2 * sizes[0], photos_from)
    rng, names = np.random.default_rng(seed), sorted(photos)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    splits = {}
    for split, count, (lo, hi) in (("train", train, (0.0, 0.7)), ("valid", val, (0.7, 1.0))):
        images, labels = [], []
        for i in range(count):
            label = i % len(names)
            photo = photos[names[label]]
            x0, x1 = int(lo * photo.width), int(hi * photo.width)
            side = int(rng.integers(sizes[0], sizes[1] + 1))
            side = min(side, x1 - x0, photo.height)
            left, top = int(rng.integers(x0, x1 - side + 1)), int(rng.integers(0, photo.height - side + 1))
            buf = io.BytesIO()
            photo.crop((left, top, left + side, top + side)).save(buf, "PNG")
            images.append({"bytes": buf.getvalue(), "path": None})
            labels.append(label)
        splits[split] = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    datasets.DatasetDict(splits).save_to_disk(folder)
    line = f"{folder}: {proxy}, {len(names)} photos ({', '.join(names)}), {train} train / {val} valid patches"
    if not _has_scikit_image():  # the same name, a smaller set: figures made with it are not comparable
        line += "; scikit-image is not installed, so most of the proxy's photos are missing (pip install -e '.[bench]')"
    return line


def _has_scikit_image() -> bool:
    try:
        import skimage.data  # noqa: F401
    except ImportError:
        return False
    return True

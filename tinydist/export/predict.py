"""Top-5 classes of images, from an exported model folder (config.json + safetensors only).

    python -m tinydist.predict --model runs/x/model cat.jpg photos/ [--device cuda] [--json]

The model is built from config.json with plain torchvision, as the folder's README.md shows, and
the images are prepared the same way: shorter side resized to image_size (bicubic, antialiased),
centre crop, then the training normalisation (mean/std from config.json).

Folders are searched recursively, in sorted order, for files with an image extension; one of those
that does not decode is skipped with a warning. A file named on the command line must be an image.
Exit codes as every entry point (runtime/cli.py): 2 for a model folder, image or flag that is missing
or wrong (a damaged or edited export included), 69 for a model on storage that cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Iterator, Optional, Sequence

import torch

from tinydist.runtime.exitcodes import PermanentError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
BATCH = 64


class PredictError(PermanentError):
    """Something the user named is missing or wrong: one line, exit 2."""


def build_model(config: dict[str, Any]) -> torch.nn.Module:
    """torchvision's resnet18 shaped by config.json (the same steps as the model card's code)."""
    import torchvision

    model = torchvision.models.resnet18(num_classes=config["num_classes"])
    if config["stem"] == "cifar":
        model.conv1, model.maxpool = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False), torch.nn.Identity()
    if config["extra_fc"]:
        n = config["extra_fc"]
        model.fc = torch.nn.Sequential(torch.nn.Linear(512, n), torch.nn.ReLU(), torch.nn.Linear(n, config["num_classes"]))
    return model


def load(folder: str, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The exported model, in eval mode on `device`, and its config.json: every shard and config.json
    checked against the size and sha256 its index lists before it is used (writer.load_export)."""
    from tinydist.ckpt.layout import CheckpointError
    from tinydist.export.writer import load_export

    if not os.path.isdir(os.path.expanduser(folder)) and "://" not in folder:
        raise PredictError(f"--model {folder}: no such folder; expected an exported model folder "
                           "({train.output_dir}/model)")
    try:
        state, config = load_export(os.path.expanduser(folder))
    except CheckpointError as e:
        raise PredictError(str(e)) from None
    if config is None:
        raise PredictError(f"--model {folder}: no config.json; expected a model exported by a tinydist with "
                           "config.json (older exports: rebuild with the run's config and tinydist.evaluate)")
    model = build_model(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # shapes or names that do not fit what config.json describes
        raise PredictError(f"--model {folder}: weights do not fit config.json ({str(e).splitlines()[-1].strip()}); "
                           "expected the files of one export") from None
    return model.eval().to(device), config


def preprocess(config: dict[str, Any]) -> Any:
    from torchvision import transforms

    size = config["image_size"]
    return transforms.Compose([
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(size),
        transforms.ToTensor(), transforms.Normalize(config["mean"], config["std"])])


def image_files(paths: Sequence[str]) -> list[tuple[str, bool]]:
    """(file, named explicitly) for every path: files as given, folders recursed in sorted order
    (image extensions only)."""
    found: list[tuple[str, bool]] = []
    for path in paths:
        if os.path.isfile(path):
            found.append((path, True))
        elif os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs.sort()
                found += [(os.path.join(root, f), False) for f in sorted(files)
                          if f.lower().endswith(IMAGE_EXTENSIONS)]
        else:
            raise PredictError(f"{path}: no such file or folder; expected image files or folders of images")
    if not found:
        raise PredictError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {', '.join(paths)}")
    return found


def open_image(path: str) -> Any:
    """The image as RGB; PredictError (one line) if it is not an image PIL can decode."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise PredictError(f"{path}: not an image PIL can read ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                           f"expected one of {', '.join(IMAGE_EXTENSIONS)}") from None


def batches(files: list[tuple[str, bool]], transform: Any,
            warn: Any) -> Iterator[tuple[list[str], torch.Tensor]]:
    names, tensors = [], []
    for path, explicit in files:
        try:
            image = open_image(path)
        except PredictError as e:
            if explicit:
                raise
            warn(f"warning: skipping {e}")
            continue
        names.append(path)
        tensors.append(transform(image))
        if len(names) == BATCH:
            yield names, torch.stack(tensors)
            names, tensors = [], []
    if names:
        yield names, torch.stack(tensors)


def top_k(probs: torch.Tensor, config: dict[str, Any], k: int) -> list[dict[str, Any]]:
    values, indices = probs.topk(min(k, probs.numel()))
    return [{"index": int(i), "id": config["id2label"][str(int(i))],
             "name": config["label_names"].get(str(int(i)), ""), "prob": float(p)}
            for p, i in zip(values.tolist(), indices.tolist())]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PredictError(f"--device {name}: not a device; expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PredictError(f"--device {name}: no CUDA device here; expected --device cpu (or auto)")
    if device.type not in ("cpu", "cuda"):
        raise PredictError(f"--device {name}: unsupported; expected auto, cpu, cuda or cuda:N")
    return device


def predict(folder: str, paths: Sequence[str], device: torch.device, k: int = 5,
            warn: Any = lambda m: print(m, file=sys.stderr)) -> Iterator[dict[str, Any]]:
    """{"image": path, "top": [{"index", "id", "name", "prob"}, ...]} for every image, in order."""
    model, config = load(folder, device)
    files = image_files(paths)
    for path, explicit in files:  # a bad file named outright stops before any output, not halfway
        if explicit:
            open_image(path)
    transform = preprocess(config)
    with torch.inference_mode():
        for names, x in batches(files, transform, warn):
            probs = model(x.to(device)).float().softmax(1).cpu()
            for name, row in zip(names, probs):
                yield {"image": name, "top": top_k(row, config, k)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    from tinydist.runtime import cli

    return cli.run(lambda: _main(argv))


def _main(argv: Optional[Sequence[str]]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tinydist.predict", description="Top-5 classes of images, from an exported model folder.",
        epilog="Folders are searched recursively (sorted) for image files; one that does not decode is skipped "
               "with a warning. A file named outright must be an image.")
    parser.add_argument("--model", required=True, metavar="DIR", help="an exported model folder ({train.output_dir}/model)")
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files and/or folders of images")
    parser.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda or cuda:N")
    parser.add_argument("--top", type=int, default=5, metavar="K", help="classes to show per image (default 5)")
    parser.add_argument("--json", action="store_true", help="one JSON object per image, one per line")
    args = parser.parse_args(argv)
    if args.top < 1:
        raise PredictError(f"--top {args.top}; expected an int >= 1")
    for result in predict(args.model, args.images, pick_device(args.device), args.top):
        if args.json:
            print(json.dumps(result), flush=True)
            continue
        print(result["image"])
        for entry in result["top"]:
            print(f"  {entry['prob']:7.2%}  {entry['id']}" + (f"  {entry['name']}" if entry["name"] not in ("", entry["id"]) else ""))
    return 0


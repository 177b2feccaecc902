"""The trained model as a folder anyone can load without tinydist, and the one verified reader of
tinydist's sharded safetensors layout (exported models and checkpoints alike).

    model.safetensors.index.json + model-0000k-of-0000n.safetensors   Hugging Face sharded layout
    config.json    how to rebuild it: architecture, stem, extra_fc, num_classes, image_size, mean/std,
                   id2label (index -> class id, a WordNet id for Tiny ImageNet), label_names (index ->
                   human-readable name, only for the classes whose name the source gives), provenance
                   (raw/ema weights, last/best, step, metrics) and the run's resolved config
    README.md      model card: recipe, data, metrics, curves, how to load it with torchvision
    curves.png     loss/accuracy curves, when the run has them

Class ids and names are kept apart on purpose: `id2label` values stay machine keys that match the
dataset's labels (and what `datasets`' ClassLabel calls them); names are for people and may be absent.

The index is written last: a reader that finds it finds every file it names (and the card). The run's
export (`export_if_changed`) is idempotent and never leaves a half folder under the name: on a local
disk it is written to `model.partial` and swapped in by renames; on an object store (no rename) the
old index goes first, so a reader finds either no index or a whole export.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
from typing import Any, Optional

import safetensors
import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load as load_safetensors

from tinydist.ckpt.layout import MARKER, STATE, CheckpointError, check_name, load_tensors, read_state, step_folder
from tinydist.config import DEFAULT_MAX_SHARD_SIZE, Config, to_dict
from tinydist.ckpt.storage import Storage
from tinydist.config.units import parse_size

INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
CARD = "README.md"
CURVES = "curves.png"
EXPORT_FORMAT = "tinydist-export/1"
STEMS = {"cifar": "3x3 stride-1 conv1, no max-pool", "imagenet": "torchvision's 7x7 stride-2 conv1 + 3x3 max-pool"}

# The card's loading code, run as is by tests/test_export.py from inside an exported folder.
LOAD_CODE = '''\
import json, torch, torchvision
from safetensors.torch import load_file

config = json.load(open("config.json"))
model = torchvision.models.resnet18(num_classes=config["num_classes"])
if config["stem"] == "cifar":  # 3x3 stride-1 conv1 and no max-pool, for small images
    model.conv1, model.maxpool = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False), torch.nn.Identity()
if config["extra_fc"]:  # Linear(512, n) + ReLU before the classifier
    n = config["extra_fc"]
    model.fc = torch.nn.Sequential(torch.nn.Linear(512, n), torch.nn.ReLU(), torch.nn.Linear(n, config["num_classes"]))
shards = set(json.load(open("model.safetensors.index.json"))["weight_map"].values())
model.load_state_dict({k: v for shard in sorted(shards) for k, v in load_file(shard).items()})
model.eval()
'''

# The card's preprocessing (what `python -m tinydist.predict` does): shorter side to image_size
# (bicubic, antialiased, like the training decode), centre crop, then the training normalisation.
PREDICT_CODE = '''\
from PIL import Image
from torchvision import transforms

size = config["image_size"]
preprocess = transforms.Compose([
    transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(size),
    transforms.ToTensor(), transforms.Normalize(config["mean"], config["std"])])
with torch.no_grad():
    probs = model(preprocess(Image.open("image.jpg").convert("RGB"))[None]).softmax(1)[0]
for p, i in zip(*probs.topk(min(5, len(probs)))):
    print(f"{p:.3f}", config["id2label"][str(int(i))], config["label_names"].get(str(int(i)), ""))
'''


# ---- writing ---------------------------------------------------------------------------------------

def export_model(model: torch.nn.Module, url: str, max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE, *,
                 cfg: Optional[Config] = None, classes: Optional[list[str]] = None,
                 class_names: Optional[dict[str, str]] = None, provenance: Optional[dict[str, Any]] = None,
                 curves_png: Optional[bytes] = None) -> None:
    """Write the model to a local path or URL: shards, then curves.png, config.json and README.md, then
    the index. Each file lands whole (storage.py). Without `cfg` (the old call, `export_model(model, url,
    size)`) only the weights are written. Storage faults raise StorageError (transient): the caller retries.

    classes: the class id of each output, in label order (the data's sorted class names).
    class_names: {class id: human-readable name}, for those that have one (labels.class_names).
    provenance: what these weights are; keys read: weights (raw|ema), selected (last|best), step,
        metrics (at that step), final and best ({"step", "metrics"}; best also "metric"). Defaults:
        weights and selected from cfg.export."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    files: dict[str, bytes] = {}
    if cfg is not None:
        if classes is None:
            raise ValueError("export_model: cfg given without classes; expected the class id of every output")
        _check_outputs(model, classes)
        config = export_config(cfg, classes, class_names, provenance)
        if curves_png:
            files[CURVES] = curves_png
        files[CONFIG] = (json.dumps(config, indent=1) + "\n").encode()
        files[CARD] = model_card(config, has_curves=bool(curves_png)).encode()
    storage = Storage(url)
    with tempfile.TemporaryDirectory() as tmp:
        save_torch_state_dict(state, tmp, max_shard_size=parse_size(max_shard_size), force_contiguous=True)
        storage.makedirs("")
        names = sorted(os.listdir(tmp))
        for name in [n for n in names if n != INDEX]:
            with open(os.path.join(tmp, name), "rb") as f:
                storage.write(name, f.read())
        for name, data in files.items():
            storage.write(name, data)
        with open(os.path.join(tmp, INDEX), "rb") as f:
            storage.write(INDEX, f.read())


def _check_outputs(model: torch.nn.Module, classes: list[str]) -> None:
    # A config.json that names 200 classes for a 10-way classifier would load nowhere: stop here.
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if last and last[-1].out_features != len(classes):
        raise ValueError(f"export_model: the model has {last[-1].out_features} outputs but {len(classes)} "
                         "classes were given; expected one class id per output")


def export_config(cfg: Config, classes: list[str], class_names: Optional[dict[str, str]] = None,
                  provenance: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """config.json's contents; see the module docstring."""
    from tinydist import __version__
    from tinydist.data.augment import IMAGENET_MEAN, IMAGENET_STD

    names = class_names or {}
    given = dict(provenance or {})
    made = {"weights": given.pop("weights", cfg.export.weights), "selected": given.pop("selected", cfg.export.select),
            "step": given.pop("step", None), "metrics": given.pop("metrics", {}), **given}
    config = {
        "format": EXPORT_FORMAT,
        "architecture": "resnet18",
        "stem": cfg.model.stem,
        "extra_fc": cfg.model.extra_fc,
        "num_classes": len(classes),
        "image_size": cfg.data.image_size,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "id2label": {str(i): c for i, c in enumerate(classes)},
        "label2id": {c: i for i, c in enumerate(classes)},
        "label_names": {str(i): names[c] for i, c in enumerate(classes) if names.get(c)},
        "data_source": cfg.data.source,
        "provenance": made,
        "tinydist_version": __version__,
        "train_config": to_dict(cfg),
    }
    # A metric that came out NaN (a diverged validation) is null, not a failed export of good weights.
    made["metrics"] = _finite(made["metrics"])
    for key in ("final", "best"):
        if isinstance(made.get(key), dict) and isinstance(made[key].get("metrics"), dict):
            made[key] = {**made[key], "metrics": _finite(made[key]["metrics"])}
    try:  # fail here, with what is wrong, not halfway through writing the folder
        return json.loads(json.dumps(config, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"export_model: provenance or class names are not JSON ({e}); "
                         "expected numbers, strings, lists and dicts") from None


def _finite(metrics: Any) -> Any:
    if not isinstance(metrics, dict):
        return metrics
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}


def export_if_changed(model: torch.nn.Module, url: str, max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE, *,
                      cfg: Config, classes: list[str], class_names: Optional[dict[str, str]] = None,
                      provenance: Optional[dict[str, Any]] = None, curves_png: Optional[bytes] = None) -> bool:
    """The run's export, idempotent: False (nothing written) when `url` already holds a whole export of
    these exact weights with this config.json; otherwise it is (re)written whole (see the module
    docstring) and True. A missing or partial folder (no index, a shard missing, no config.json) is
    written again; so is one whose provenance or weights differ from what would be exported now."""
    config = export_config(cfg, classes, class_names, provenance)
    if _current(url, model, config):
        return False
    storage = Storage(url)
    if not storage.local:  # no rename on object stores: drop the index first, write, the index last
        storage.remove(INDEX)
        export_model(model, url, max_shard_size, cfg=cfg, classes=classes, class_names=class_names,
                     provenance=provenance, curves_png=curves_png)
        keep = set(json.loads(storage.read(INDEX))["weight_map"].values()) | {INDEX, CONFIG, CARD, CURVES}
        for stale in set(storage.sizes()) - keep:  # shards of an earlier, differently sharded export
            storage.remove(stale, recursive=True)
        return True
    final = storage.path("")
    partial, old = final + ".partial", final + f".old-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)  # what an interrupted export left
    export_model(model, partial, max_shard_size, cfg=cfg, classes=classes, class_names=class_names,
                 provenance=provenance, curves_png=curves_png)
    with storage.faults(f"swapping {partial} in as {storage.show()}"):
        if os.path.exists(final):
            os.rename(final, old)
        os.rename(partial, final)
        shutil.rmtree(old, ignore_errors=True)
    return True


def _current(url: str, model: torch.nn.Module, config: dict[str, Any]) -> bool:
    """Whether `url` holds a whole, readable export with exactly `config` and `model`'s weights."""
    try:
        tensors, found = load_export(url)
    except (CheckpointError, FileNotFoundError):
        return False
    state = model.state_dict()
    return found == config and tensors.keys() == state.keys() and all(
        torch.equal(tensors[k], state[k].detach().cpu()) for k in state)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _metrics_table(provenance: dict[str, Any]) -> list[str]:
    rows = [(f"exported ({provenance.get('weights')} weights, {provenance.get('selected')})",
             provenance.get("step"), provenance.get("metrics") or {})]
    for key in ("final", "best"):
        entry = provenance.get(key)
        if isinstance(entry, dict):
            label = key if key == "final" else f"best by {entry.get('metric', '?')}"
            rows.append((label, entry.get("step"), entry.get("metrics") or {}))
    keys = sorted({k for _, _, m in rows for k in m})
    if not keys:
        return [f"No metrics were recorded with this export (step {provenance.get('step')})."]
    lines = ["| weights | step | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    lines += [f"| {label} | {step} | " + " | ".join(_fmt(m.get(k, "")) for k in keys) + " |"
              for label, step, m in rows]
    return lines


def _recipe(train: dict[str, Any]) -> list[str]:
    """The run's config in a few lines (the full resolved config is config.json's `train_config`)."""
    d, m, o, t = train["data"], train["model"], train["optim"], train["train"]
    lines = [
        f"- model: resnet18, `{m['stem']}` stem ({STEMS.get(m['stem'], '?')}), "
        f"{'extra FC ' + str(m['extra_fc']) if m['extra_fc'] else 'no extra FC'}",
        f"- data: `{d['source']}`, train split `{d['train_split']}`, validation split `{d['val_split']}`, "
        f"{d['image_size']}x{d['image_size']} RGB"
        + (f", {d['max_train_samples']} training images" if d.get("max_train_samples") else ""),
        f"- augmentation: random resized crop (scale {d['crop_scale']})" + (", horizontal flips" if d["hflip"] else ""),
        f"- optimiser: {o['name']}, lr {o['lr']} for a global batch of {t['global_batch_size']}, momentum "
        f"{o['momentum']}" + (" (Nesterov)" if o["nesterov"] else "") + f", weight decay {o['weight_decay']}, "
        f"{o['schedule']} schedule with {o['warmup_epochs']} warmup epochs, label smoothing {o['label_smoothing']}",
        f"- length: {t['epochs']} epochs" + (f", capped at {t['max_steps']} steps" if t.get("max_steps") else "")
        + f", seed {t['seed']}",
    ]
    mix, ema = train.get("mix") or {}, train.get("ema") or {}
    if mix.get("mixup_alpha") or mix.get("cutmix_alpha"):
        lines.append(f"- mixing: MixUp alpha {mix['mixup_alpha']}, CutMix alpha {mix['cutmix_alpha']}, "
                     f"probability {mix['prob']}")
    if ema.get("enabled"):
        lines.append(f"- EMA of the weights: decay {ema['decay']}, warm-up power {ema['warmup_power']}")
    return lines


def model_card(config: dict[str, Any], has_curves: bool = False) -> str:
    """README.md of an exported folder, from its config.json."""
    prov, size = config["provenance"], config["image_size"]
    named = len(config["label_names"])
    out = [
        "---", "library_name: pytorch", "tags:", "- image-classification", "- resnet18", "- tinydist", "---", "",
        f"# resnet18 on {config['data_source']}", "",
        f"A torchvision resnet18 ({config['stem']} stem, {config['num_classes']} classes, {size}x{size} inputs) "
        f"trained from scratch with tinydist {config['tinydist_version']}. These are the "
        f"**{prov.get('weights')}** weights, selected as **{prov.get('selected')}**, at step {prov.get('step')}.", "",
        "## Recipe", "", *_recipe(config["train_config"]), "",
        "## Metrics", "", *_metrics_table(prov), "",
    ]
    if has_curves:
        out += ["## Curves", "", f"![training curves]({CURVES})", ""]
    out += [
        "## Load it with torchvision and safetensors", "",
        "From inside this folder (no tinydist needed):", "", "```python", LOAD_CODE.rstrip("\n"), "```", "",
        f"Inputs: RGB, resized so the shorter side is {size} (bicubic, antialiased) and centre-cropped to "
        f"{size}x{size}, scaled to [0, 1], then normalised with `mean` {config['mean']} and `std` {config['std']}:", "",
        "```python", PREDICT_CODE.rstrip("\n"), "```", "",
        "With tinydist installed: `python -m tinydist.predict --model THIS_FOLDER image.jpg [more images or folders]`.", "",
        "## Labels", "",
        "`config.json` maps each output index to its class id in `id2label` (WordNet ids for Tiny ImageNet; "
        "classes are the sorted ids, as tinydist's data loader numbers them) and to a human-readable name in "
        f"`label_names` ({named} of {config['num_classes']} classes have one here).", "",
        "## Files", "",
        f"`{INDEX}` and its shards (the Hugging Face sharded safetensors layout), `{CONFIG}`, this card"
        + (f", `{CURVES}`" if has_curves else "") + ".",
    ]
    return "\n".join(out) + "\n"


# ---- reading ---------------------------------------------------------------------------------------

def is_checkpoint(url: str) -> bool:
    """Whether `url` is a checkpoint folder (state.json or COMMITTED), as opposed to an exported model."""
    storage = Storage(url)
    return storage.exists(STATE) or storage.exists(MARKER)


def read_checkpoint_weights(url: str, weights: str = "model") -> tuple[dict, dict[str, torch.Tensor]]:
    """(state.json, one verified sharded set: "model" or "ema") of a committed checkpoint folder."""
    parent, _, folder = url.rstrip("/").rpartition("/")
    storage = Storage(parent or ".")
    state = read_state(storage, folder)
    return state, load_tensors(storage, folder, state, weights)


def load_model_weights(url: str, weights: str = "model") -> tuple[dict[str, torch.Tensor], Optional[dict[str, Any]]]:
    """(state dict, the run's config as a dict, or None) of a checkpoint folder or an exported model,
    every byte verified: a checkpoint through ckpt_format (COMMITTED marker, state.json schema, sizes
    and sha256 of every file), an export through `load_export`. The config is what the run was trained
    with (state.json's `config`; an export's config.json `train_config`, or for an export older than
    config.json the run's config.yaml next to it). `weights`: "model", or "ema" for a checkpoint's EMA set."""
    if weights not in ("model", "ema"):
        raise CheckpointError(f"weights {weights!r}; expected 'model' or 'ema'")
    if is_checkpoint(url):
        state, tensors = read_checkpoint_weights(url, weights)
        return tensors, state.get("config")
    if weights != "model":
        raise CheckpointError(f"{url}: an exported model folder holds one set of weights (config.json's "
                              f"provenance says which); weights={weights!r} applies to checkpoint folders only")
    tensors, config = load_export(url)
    if config is not None and isinstance(config.get("train_config"), dict):
        return tensors, config["train_config"]
    return tensors, _run_config_yaml(url)


def _run_config_yaml(url: str) -> Optional[dict[str, Any]]:
    import yaml

    parent = url.rstrip("/").rpartition("/")[0] or "."
    try:
        config = yaml.safe_load(Storage(parent).read("config.yaml"))
    except FileNotFoundError:
        return None
    return config if isinstance(config, dict) else None


def load_export(url: str) -> tuple[dict[str, torch.Tensor], Optional[dict[str, Any]]]:
    """(state dict, config.json or None if the folder predates it) of an exported model folder:
    the index well-formed, every shard it names inside the folder, present and parsed, every tensor it
    names in its shards, config.json (if any) checked by `check_export_config`."""
    storage = Storage(url)
    where = storage.show()
    try:
        index = storage.read(INDEX)
    except FileNotFoundError:
        raise CheckpointError(f"{where}: no {INDEX}; expected an exported model folder (or a checkpoint "
                              "folder step-N with state.json)") from None
    mapping = _weight_map(where, index)
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(mapping.values())):
        try:
            data = storage.read(shard)
        except FileNotFoundError:
            raise CheckpointError(f"{where}: shard {shard} named in {INDEX} is missing; expected every shard "
                                  "the index names") from None
        try:
            tensors.update(load_safetensors(data))
        except safetensors.SafetensorError as e:
            raise CheckpointError(f"{where}: {shard} is not a safetensors file ({e}); expected safetensors bytes") from None
    absent = sorted(k for k in mapping if k not in tensors)
    if absent:
        raise CheckpointError(f"{where}: tensors {absent[:3]} of {INDEX} are not in its shards; "
                              "expected the index to match the shards")
    try:
        config = json.loads(storage.read(CONFIG))
    except FileNotFoundError:
        return tensors, None
    except ValueError as e:
        raise CheckpointError(f"{where}: {CONFIG} is not JSON ({e}); expected a JSON object") from None
    return tensors, check_export_config(where, config)


def _weight_map(where: str, index: bytes) -> dict[str, str]:
    try:
        mapping = json.loads(index)["weight_map"]
    except (ValueError, KeyError, TypeError):
        mapping = None
    if not isinstance(mapping, dict) or not mapping or not all(isinstance(k, str) for k in mapping):
        raise CheckpointError(f"{where}: {INDEX} is malformed; expected the HF layout "
                              "{'metadata': ..., 'weight_map': {tensor: shard file}}")
    for shard in set(mapping.values()):
        check_name(where, shard, INDEX)  # a shard name must stay inside the folder
    return mapping


def check_export_config(where: str, config: Any) -> dict[str, Any]:
    """The config.json fields a reader builds the model from, type- and range-checked."""
    def bad(key: str, expected: str) -> CheckpointError:
        value = config.get(key) if isinstance(config, dict) else config
        return CheckpointError(f"{where}: {CONFIG} `{key}` = {value!r}; expected {expected}")

    if not isinstance(config, dict):
        raise bad("(whole file)", "a JSON object")
    if config.get("architecture") != "resnet18":
        raise bad("architecture", "'resnet18'")
    if config.get("stem") not in STEMS:
        raise bad("stem", " or ".join(map(repr, STEMS)))
    for key, low in (("num_classes", 1), ("image_size", 1), ("extra_fc", 0)):
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise bad(key, f"an int >= {low}")
    for key in ("mean", "std"):
        value = config.get(key)
        if not (isinstance(value, list) and len(value) == 3
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)) \
                or (key == "std" and min(value) <= 0):
            raise bad(key, "3 numbers (RGB)" + (", each > 0" if key == "std" else ""))
    id2label = config.get("id2label")
    if not isinstance(id2label, dict) or sorted(id2label, key=lambda k: (len(k), k)) != \
            [str(i) for i in range(config["num_classes"])] or not all(isinstance(v, str) for v in id2label.values()):
        raise bad("id2label", f"{{'0': class id, ..., '{config['num_classes'] - 1}': class id}}, one per class")
    names = config.setdefault("label_names", {})
    if not isinstance(names, dict) or not all(k in id2label and isinstance(v, str) for k, v in names.items()):
        raise bad("label_names", "{index as in id2label: name}")
    return config


def exported_weights(cfg: Config, checkpointer: Any, model: torch.nn.Module, ema: Optional[Any],
                     step: int, metrics: dict[str, float]) -> tuple[torch.nn.Module, dict[str, Any]]:
    """What `{output_dir}/model` gets (export.select, export.weights) and where it came from, for the
    training loop: `checkpointer` a Checkpointer, `ema` its ModelEma or None. The last
    validation ran at this step, so the weights in hand carry BN statistics for themselves; a best
    checkpoint was saved right after its own validation, so its tensors do too."""
    set_name = "ema" if cfg.export.weights == "ema" else "model"
    module = ema.module if ema is not None and set_name == "ema" else model
    provenance: dict[str, Any] = {"selected": "last", "weights": cfg.export.weights, "step": step,
                                  "metrics": metrics, "final": {"step": step, "metrics": metrics}}
    best = checkpointer.best() if cfg.export.select == "best" else None
    if best is not None and not best.rstrip("/").endswith(step_folder(step)):
        state, tensors = read_checkpoint_weights(best, set_name)
        module = copy.deepcopy(module)
        module.load_state_dict(tensors, strict=True)
        provenance.update(selected="best", step=state["step"], metrics=state.get("metrics") or {})
    if cfg.export.select == "best":  # (the last step itself, when it scored best)
        provenance["selected"] = "best"
        provenance["best"] = {"step": provenance["step"], "metric": cfg.checkpoint.best_metric,
                              "metrics": provenance["metrics"]}
    return module, provenance

"""The trained model as a folder anyone can load without tinydist, and the readers of model weights
(exported folders and checkpoints alike), both through ckpt/layout.py, the one writer and reader of
the sharded layout: an export is verified as it is read, like a checkpoint.

    model.safetensors.index.json + model-0000k-of-0000n.safetensors   Hugging Face sharded layout; the
                   index's metadata.files: size and sha256 of every shard and of config.json
    config.json    how to rebuild it: architecture, stem, extra_fc, num_classes, image_size, mean/std,
                   id2label (index -> class id, a WordNet id for Tiny ImageNet), label_names (index ->
                   human-readable name, only for the classes whose name the source gives), provenance
                   (raw/ema weights, last/best, step, metrics) and the run's resolved config
    README.md      model card (card.py): recipe, data, metrics, curves, how to load it with torchvision
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
from typing import Any, Optional

import torch

from tinydist.ckpt import layout
from tinydist.ckpt.layout import CheckpointError
from tinydist.ckpt.record import MARKER, STATE, read_record, sealed, step_folder
from tinydist.ckpt.storage import Storage
from tinydist.config import DEFAULT_MAX_SHARD_SIZE, Config, to_dict
from tinydist.config.units import parse_size
from tinydist.export.card import CARD, CONFIG, CURVES, INDEX, STEMS, model_card

EXPORT_FORMAT = "tinydist-export/1"


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
    extra: dict[str, bytes] = {}
    if cfg is not None:
        if classes is None:
            raise ValueError("export_model: cfg given without classes; expected the class id of every output")
        _check_outputs(model, classes)
        config = export_config(cfg, classes, class_names, provenance)
        if curves_png:
            extra[CURVES] = curves_png
        extra[CONFIG] = (json.dumps(config, indent=1) + "\n").encode()
        extra[CARD] = model_card(config, has_curves=bool(curves_png)).encode()
    storage = Storage(url)
    storage.makedirs("")
    shards = layout.plan("model", state, parse_size(max_shard_size))
    files = layout.write_shards(shards, state, storage.write)
    for name, data in extra.items():
        storage.write(name, data)
    if CONFIG in extra:  # what a reader builds the model from: checked like the weights
        files[CONFIG] = layout.file_entry([extra[CONFIG]])
    storage.write(INDEX, layout.index_bytes(shards, files))


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
        mapping, _ = layout.parse_index(storage.show(), INDEX, storage.read(INDEX))
        keep = set(mapping.values()) | {INDEX, CONFIG, CARD, CURVES}
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


# ---- reading ---------------------------------------------------------------------------------------

def is_checkpoint(url: str) -> bool:
    """Whether `url` is a checkpoint folder (state.json or COMMITTED), as opposed to an exported model."""
    storage = Storage(url)
    return storage.exists(STATE) or storage.exists(MARKER)


def read_checkpoint_weights(url: str, weights: str = "model") -> tuple[dict, dict[str, torch.Tensor]]:
    """(state.json, one verified sharded set: "model" or "ema") of a committed checkpoint folder."""
    storage, folder = layout.locate(url)
    record = read_record(storage, folder)
    return record, sealed(storage, folder, record).tensors(weights)


def load_model_weights(url: str, weights: str = "model") -> tuple[dict[str, torch.Tensor], Optional[dict[str, Any]]]:
    """(state dict, the run's config as a dict, or None) of a checkpoint folder or an exported model,
    every file verified against its size and sha256 as it is read: a checkpoint's against its
    state.json (sealed by its COMMITTED marker, schema checked), an export's against its index
    (`load_export`). The config is what the run was trained with (state.json's `config`; an export's
    config.json `train_config`, or for an export without config.json the run's config.yaml next to it). `weights`: "model", or "ema" for a checkpoint's EMA set."""
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

    parent, _ = layout.locate(url)
    try:
        config = yaml.safe_load(parent.read("config.yaml"))
    except FileNotFoundError:
        return None
    return config if isinstance(config, dict) else None


def load_export(url: str) -> tuple[dict[str, torch.Tensor], Optional[dict[str, Any]]]:
    """(state dict, config.json or None if the folder has none) of an exported model folder: the index
    well-formed with its file table, every shard it names inside the folder, listed, present at its
    size and sha256, every tensor it names in its shards, config.json (if any) listed and checked the
    same way, then by `check_export_config`."""
    storage = Storage(url)
    where = storage.show()
    try:
        index = storage.read(INDEX)
    except FileNotFoundError:
        raise CheckpointError(f"{where}: no {INDEX}; expected an exported model folder (or a checkpoint "
                              "folder step-N with state.json)") from None
    mapping, metadata = layout.parse_index(where, INDEX, index)
    if not mapping:
        raise CheckpointError(f"{where}: {INDEX} names no tensors; expected the model's weights")
    if "files" not in metadata:
        raise CheckpointError(f"{where}: {INDEX} carries no checksums (metadata.files); expected an export "
                              "written by this tinydist: rerunning the finished run's training command rewrites it")
    folder = layout.Sealed(storage, "", layout.check_file_table(where, metadata["files"], INDEX), INDEX, where)
    tensors = folder.tensors("model", mapping)
    if CONFIG not in folder.files:
        if storage.exists(CONFIG):
            raise CheckpointError(f"{where}: {CONFIG} is not listed in {INDEX}; expected a checksum for it "
                                  "(added or edited by hand?)")
        return tensors, None
    try:
        config = json.loads(folder.read(CONFIG))
    except ValueError as e:
        raise CheckpointError(f"{where}: {CONFIG} is not JSON ({e}); expected a JSON object") from None
    return tensors, check_export_config(where, config)


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

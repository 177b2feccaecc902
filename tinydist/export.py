"""The trained model in the Hugging Face sharded safetensors layout, readable without tinydist:

    import torchvision, safetensors.torch, json
    index = json.load(open("model/model.safetensors.index.json"))
    state = {}
    for shard in set(index["weight_map"].values()):
        state.update(safetensors.torch.load_file(f"model/{shard}"))
    torchvision.models.resnet18(num_classes=200).load_state_dict(state)  # cifar stem: see README
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Optional

import fsspec
import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load as load_safetensors

from tinydist.ckpt_format import CheckpointError
from tinydist.storage import Storage, parse_size


def export_model(model: torch.nn.Module, url: str, max_shard_size: str | int = "10MB") -> None:
    """Write `model.safetensors.index.json` + `model-0000k-of-0000n.safetensors` to a local path or URL.
    Each file lands whole (storage.py); the index last, so a reader never sees it name a missing shard.
    Storage faults raise StorageError (transient): the caller retries."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    storage = Storage(url)
    with tempfile.TemporaryDirectory() as tmp:
        save_torch_state_dict(state, tmp, max_shard_size=parse_size(max_shard_size), force_contiguous=True)
        storage.makedirs("")
        for name in sorted(os.listdir(tmp), key=lambda n: n.endswith(".index.json")):
            with open(os.path.join(tmp, name), "rb") as f:
                storage.write(name, f.read())


def load_model_weights(url: str) -> tuple[dict[str, torch.Tensor], Optional[dict[str, Any]]]:
    """Weights of an exported model folder or a checkpoint folder, and the run's config if known
    (a checkpoint's state.json, or the config.yaml next to an exported model)."""
    import yaml

    fs, path = fsspec.core.url_to_fs(url)
    index_path = f"{path}/model.safetensors.index.json"
    if not fs.exists(index_path):
        raise CheckpointError(f"{url}: no model.safetensors.index.json; expected an exported model folder "
                              "or a checkpoint folder (step-N)")
    config = None
    if fs.exists(f"{path}/state.json"):
        config = json.loads(fs.cat_file(f"{path}/state.json")).get("config")
    elif fs.exists(f"{fs._parent(path)}/config.yaml"):
        config = yaml.safe_load(fs.cat_file(f"{fs._parent(path)}/config.yaml"))
    weight_map = json.loads(fs.cat_file(index_path)).get("weight_map", {})
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise CheckpointError(f"{url}: index names shard {shard!r} outside the folder; refusing to read it")
        state.update(load_safetensors(fs.cat_file(f"{path}/{shard}")))
    return state, config

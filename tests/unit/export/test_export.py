"""The exported model folder (weights, config.json, model card, checksums in the index) and the readers of
model weights (tinydist.export.writer.load_model_weights / load_export), which verify exports like
checkpoints through tinydist.ckpt.layout. In-process and fast: no training."""

from __future__ import annotations

import ast
import contextlib
import copy
import hashlib
import inspect
import io
import json
import os
import re
from pathlib import Path

import pytest
import torch

from helpers.fixtures import CLASSES, WORDS, build_tiny_imagenet_folder

from tinydist.export import writer as export
from tinydist.ckpt.layout import CheckpointError
from tinydist.config import Config, DataConfig, load_config
from tinydist.export.writer import export_model, load_export, load_model_weights
from tinydist.export.labels import class_names
from tinydist.model.build import build_model

PNG = b"\x89PNG\r\n\x1a\n" + bytes(32)  # only copied, never decoded
PROVENANCE = {"weights": "ema", "selected": "best", "step": 40, "metrics": {"val/top1": 0.625, "val/loss": 1.25},
              "final": {"step": 50, "metrics": {"val/top1": 0.5, "val/loss": 1.5}},
              "best": {"step": 40, "metric": "val/top1", "metrics": {"val/top1": 0.625, "val/loss": 1.25}}}


def tiny_config(source: str = "digits", stem: str = "cifar", extra_fc: int = 0) -> Config:
    return load_config([f"--data.source={source}", "--data.image_size=16", f"--model.stem={stem}",
                        f"--model.extra_fc={extra_fc}"])


def trained_looking(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random BN statistics too, so a loader that dropped buffers would give other logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)
    return model.eval()


def export_tiny(folder: Path, cfg: Config, classes: list[str] = CLASSES, **kwargs) -> torch.nn.Module:
    model = trained_looking(build_model(cfg.model, len(classes)))
    export_model(model, str(folder), cfg=cfg, classes=classes, max_shard_size="20MB", **kwargs)
    return model


def code_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, flags=re.S)


def imported_modules(code: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            found.add(node.module or "")
    return found


@pytest.mark.parametrize("stem,extra_fc", [("cifar", 0), ("imagenet", 32)])
def test_card_code_loads_the_model_without_tinydist(tmp_path, monkeypatch, stem, extra_fc):
    cfg = tiny_config(stem=stem, extra_fc=extra_fc)
    folder = tmp_path / "model"
    model = export_tiny(folder, cfg)
    shards = [p for p in os.listdir(folder) if p.endswith(".safetensors")]
    assert len(shards) > 1, "the test should cover a sharded export"
    load_code = code_blocks((folder / "README.md").read_text())[0]
    assert imported_modules(load_code) <= {"json", "torch", "torchvision", "safetensors.torch"}
    monkeypatch.chdir(folder)
    scope: dict = {}
    exec(compile(load_code, "README.md", "exec"), scope)  # the card's own instructions, as written
    plain = scope["model"]
    assert type(plain).__module__.startswith("torchvision")
    ours, theirs = model.state_dict(), plain.state_dict()
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))


def test_card_preprocessing_matches_predict(tmp_path, monkeypatch):
    """The card's second block (preprocess + top-5) prints what `tinydist.predict` says."""
    from PIL import Image

    from tinydist.export import predict

    cfg = tiny_config(source=build_tiny_imagenet_folder(str(tmp_path / "data")))
    folder = tmp_path / "model"
    export_tiny(folder, cfg, class_names=class_names(cfg.data, CLASSES))
    Image.new("RGB", (40, 24), (200, 30, 90)).save(folder / "image.jpg")
    load_code, predict_code = code_blocks((folder / "README.md").read_text())[:2]
    monkeypatch.chdir(folder)
    scope: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(load_code + predict_code, "README.md", "exec"), scope)
    card_ids = [line.split()[1] for line in out.getvalue().splitlines()]
    [result] = predict.predict(str(folder), [str(folder / "image.jpg")], torch.device("cpu"))
    assert card_ids == [entry["id"] for entry in result["top"]]
    assert len(card_ids) == 5


def test_config_json_and_card(tmp_path):
    source = build_tiny_imagenet_folder(str(tmp_path / "data"))
    cfg = tiny_config(source=source)
    folder = tmp_path / "model"
    export_tiny(folder, cfg, class_names=class_names(cfg.data, CLASSES), provenance=PROVENANCE, curves_png=PNG)
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "resnet18" and config["stem"] == "cifar" and config["extra_fc"] == 0
    assert config["num_classes"] == 5 and config["image_size"] == 16
    assert config["mean"] == [0.485, 0.456, 0.406] and config["std"] == [0.229, 0.224, 0.225]
    assert config["id2label"] == {str(i): w for i, w in enumerate(CLASSES)}
    assert config["label_names"] == {str(i): WORDS[w] for i, w in enumerate(CLASSES)}
    assert config["label_names"][str(CLASSES.index("n01443537"))] == "goldfish, Carassius auratus"
    assert config["provenance"] == PROVENANCE
    assert config["data_source"] == source and config["train_config"]["data"]["source"] == source
    assert (folder / "curves.png").read_bytes() == PNG
    card = (folder / "README.md").read_text()
    assert "![training curves](curves.png)" in card and source in card
    assert "| exported (ema weights, best) | 40 | 1.2500 | 0.6250 |" in card
    assert "| final | 50 | 1.5000 | 0.5000 |" in card and "| best by val/top1 | 40 |" in card
    assert "`cifar` stem (3x3 stride-1 conv1, no max-pool)" in card
    # The verified reader gives back the same config and the run's config for tinydist.loop.evaluate.
    _, read = load_export(str(folder))
    assert read == config
    assert load_model_weights(str(folder))[1] == config["train_config"]


def test_index_is_written_last(tmp_path, monkeypatch):
    written = []
    real_write = export.Storage.write
    monkeypatch.setattr(export.Storage, "write", lambda self, name, data: (written.append(name), real_write(self, name, data)))
    export_tiny(tmp_path / "model", tiny_config(), curves_png=PNG)
    assert written[-1] == "model.safetensors.index.json"
    assert {"config.json", "README.md", "curves.png"} <= set(written[:-1])


def test_defaults_and_no_names(tmp_path):
    """No provenance: cfg.export says which weights; wnids without words.txt get no names."""
    cfg = tiny_config(source="zh-plus/tiny-imagenet")  # a hub id: nothing is looked up
    assert class_names(cfg.data, CLASSES) == {}
    export_tiny(tmp_path / "model", cfg)
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["label_names"] == {}
    assert config["provenance"] == {"weights": "raw", "selected": "last", "step": None, "metrics": {}}
    assert "No metrics were recorded" in (tmp_path / "model" / "README.md").read_text()


def test_class_names_sources(tmp_path):
    base = build_tiny_imagenet_folder(str(tmp_path / "data"))
    for source in (base, str(tmp_path / "data")):  # the folder, or the one it was unpacked in
        assert class_names(DataConfig(source=source), CLASSES) == WORDS
    digits = [f"digit_{d}" for d in range(10)]
    assert class_names(tiny_config().data, digits) == {d: d for d in digits}
    os.remove(os.path.join(base, "words.txt"))
    assert class_names(DataConfig(source=base), CLASSES) == {}


def test_export_refuses_wrong_class_count(tmp_path):
    cfg = tiny_config()
    with pytest.raises(ValueError, match="10 outputs but 5 classes"):
        export_model(build_model(cfg.model, 10), str(tmp_path / "m"), cfg=cfg, classes=CLASSES)


def test_old_positional_call_still_writes_the_weights(tmp_path):
    """train.py's call until it passes cfg: export_model(model, url, max_shard_size)."""
    cfg = tiny_config()
    model = trained_looking(build_model(cfg.model, 5))
    (tmp_path / "config.yaml").write_text("model:\n  stem: cifar\n")
    export_model(model, str(tmp_path / "model"), "20MB")
    assert not (tmp_path / "model" / "config.json").exists()
    state, run_config = load_model_weights(str(tmp_path / "model"))
    assert run_config == {"model": {"stem": "cifar"}}  # the run's config.yaml, as before
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


# ---- the verified reader refuses what it must --------------------------------------------------------

def test_reader_refuses_index_naming_a_file_outside_the_folder(tmp_path):
    folder = tmp_path / "model"
    export_tiny(folder, tiny_config())
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "../x.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"names file '\.\./x\.safetensors'"):
        load_model_weights(str(folder))


def test_reader_refuses_missing_shard_and_missing_tensor(tmp_path):
    folder = tmp_path / "model"
    export_tiny(folder, tiny_config())
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["fc.extra"] = index["weight_map"]["fc.bias"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"tensors \['fc.extra'\]"):
        load_model_weights(str(folder))
    os.remove(folder / sorted(set(index["weight_map"].values()))[0])
    with pytest.raises(CheckpointError, match="is missing"):
        load_model_weights(str(folder))


def reseal_export(folder: Path) -> None:
    """Fix up the checksums in an edited export's index, as a careful someone would: what fails
    afterwards fails because of the edit itself."""
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for name in index["metadata"]["files"]:
        data = (folder / name).read_bytes()
        index["metadata"]["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    index_path.write_text(json.dumps(index))


def test_reader_refuses_a_bad_config_json(tmp_path):
    folder = tmp_path / "model"
    export_tiny(folder, tiny_config())
    config = json.loads((folder / "config.json").read_text())
    config["stem"] = "resnet"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="mismatch on file config.json"):  # edited: its checksum says so
        load_export(str(folder))
    reseal_export(folder)
    with pytest.raises(CheckpointError, match="config.json `stem` = 'resnet'; expected 'cifar' or 'imagenet'"):
        load_export(str(folder))
    with pytest.raises(CheckpointError, match="applies to checkpoint folders only"):
        load_model_weights(str(folder), weights="ema")


def test_index_carries_the_checksums_of_every_file_a_reader_uses(tmp_path):
    folder = tmp_path / "model"
    export_tiny(folder, tiny_config(), curves_png=PNG)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert set(index["metadata"]["files"]) == shards | {"config.json"}  # the card and curves are for people
    for name, entry in index["metadata"]["files"].items():
        data = (folder / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}, name
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in load_export(str(folder))[0].values())


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in a tensor: same size, still parses as safetensors
    path.write_bytes(bytes(data))


def test_reader_verifies_exports_like_checkpoints(tmp_path, capsys):
    from tinydist.export import predict
    from tinydist.loop import evaluate

    folder = tmp_path / "model"
    export_tiny(folder, tiny_config())
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    _flip_last_byte(shard)
    with pytest.raises(CheckpointError, match=f"checksum mismatch on file {shard.name}"):
        load_model_weights(str(folder))
    for main in (predict.main, evaluate.main):  # both entry points: exit 2, one line naming the file
        args = ["--model", str(folder), str(tmp_path)] if main is predict.main else ["--checkpoint", str(folder)]
        assert main(args) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and f"checksum mismatch on file {shard.name}" in err, err
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"size mismatch on file {shard.name}"):
        load_export(str(folder))


def test_reader_refuses_unlisted_files_and_exports_without_checksums(tmp_path):
    cfg = tiny_config()
    folder = tmp_path / "model"
    model = export_tiny(folder, cfg)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["metadata"]["files"]["config.json"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="config.json is not listed in model.safetensors.index.json"):
        load_export(str(folder))
    del index["metadata"]["files"]  # what an export written before the checksums looks like
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="carries no checksums.*rewrites it"):
        load_export(str(folder))
    # ... and the run's export step (a rerun of the finished run) writes it again, checksums and all.
    assert export.export_if_changed(model, str(folder), "20MB", cfg=cfg, classes=CLASSES)
    assert not export.export_if_changed(model, str(folder), "20MB", cfg=cfg, classes=CLASSES)
    state, _ = load_export(str(folder))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def _checkpoint(tmp_path: Path, ema: bool = False) -> tuple[Path, torch.nn.Module, torch.nn.Module]:
    from tinydist.ckpt.checkpointer import Checkpointer

    cfg = tiny_config()
    model = trained_looking(build_model(cfg.model, 5))
    average = trained_looking(copy.deepcopy(model), seed=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ck = Checkpointer(str(tmp_path / "checkpoints"), keep_last=1, max_shard_size="20MB", log=lambda m: None)
    extra = {"ema": average} if ema else {}
    ck.save(3, model, optimizer, {"config": {"model": {"stem": "cifar"}}}, blocking=True, **extra)
    ck.close()
    return tmp_path / "checkpoints" / "step-00000003", model, average


def test_reader_verifies_checkpoints(tmp_path):
    folder, model, _ = _checkpoint(tmp_path)
    state, run_config = load_model_weights(str(folder))
    assert run_config == {"model": {"stem": "cifar"}}
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    _flip_last_byte(shard)
    with pytest.raises(CheckpointError, match=f"checksum mismatch on file {shard.name}"):
        load_model_weights(str(folder))
    os.remove(folder / "COMMITTED")
    with pytest.raises(CheckpointError, match="missing COMMITTED marker"):
        load_model_weights(str(folder))


def test_reader_reads_a_checkpoints_ema_weights(tmp_path):
    from tinydist.ckpt.checkpointer import Checkpointer

    if "ema" not in inspect.signature(Checkpointer.save).parameters:
        pytest.skip("checkpoints hold no EMA set yet")
    folder, model, average = _checkpoint(tmp_path, ema=True)
    state, _ = load_model_weights(str(folder), weights="ema")
    assert all(torch.equal(state[k], v) for k, v in average.state_dict().items())
    with pytest.raises(CheckpointError, match="weights 'opt'"):
        load_model_weights(str(folder), weights="opt")


def test_curves_png_of_a_run(tmp_path):
    """What train.py hands export_model: a fresh drawing when matplotlib and metrics.jsonl are there,
    else the run's curves.png, else None; never an error."""
    from tinydist.export.report import curves_png

    assert curves_png(str(tmp_path)) is None
    (tmp_path / "curves.png").write_bytes(PNG)
    assert curves_png(str(tmp_path)) == PNG  # no metrics.jsonl to draw from: the one drawn before

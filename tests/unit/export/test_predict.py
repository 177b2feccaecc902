"""`python -m tinydist.predict`: top-5 with names from an exported folder, files and folders, errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

from helpers.fixtures import CLASSES, WORDS, build_tiny_imagenet_folder

from tinydist.export import predict
from tinydist.config import load_config
from tinydist.export.writer import export_model
from tinydist.export.labels import class_names
from tinydist.model.build import build_model

GOLDFISH = "n01443537"


@pytest.fixture(scope="module")
def rigged(tmp_path_factory) -> str:
    """An export whose model answers goldfish for every image (zero fc weights, a bias that says so),
    the second most likely class bathtub, with words.txt names from a tiny-imagenet-200 folder."""
    root = tmp_path_factory.mktemp("predict")
    cfg = load_config([f"--data.source={build_tiny_imagenet_folder(str(root / 'data'))}", "--data.image_size=16"])
    model = build_model(cfg.model, len(CLASSES)).eval()
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.copy_(torch.arange(len(CLASSES), dtype=torch.float32) * 0.1)
        model.fc.bias[CLASSES.index(GOLDFISH)] = 5.0
    export_model(model, str(root / "model"), cfg=cfg, classes=CLASSES, class_names=class_names(cfg.data, CLASSES))
    return str(root / "model")


@pytest.fixture
def images(tmp_path):
    """photos/{a/2.png, a/b/1.jpg, broken.jpg, notes.txt} and one loose image."""
    from PIL import Image

    (tmp_path / "photos" / "a" / "b").mkdir(parents=True)
    Image.new("RGB", (30, 20), (10, 200, 30)).save(tmp_path / "photos" / "a" / "2.png")
    Image.new("L", (64, 64), 90).save(tmp_path / "photos" / "a" / "b" / "1.jpg")
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a JPEG at all")
    (tmp_path / "photos" / "notes.txt").write_text("not an image, and not named like one\n")
    Image.new("RGB", (100, 80), (250, 250, 250)).save(tmp_path / "loose.jpeg")
    return tmp_path


def test_names_top1_for_files_and_folders(rigged, images, capsys):
    loose, photos = str(images / "loose.jpeg"), str(images / "photos")
    assert predict.main(["--model", rigged, loose, photos]) == 0
    out, err = capsys.readouterr()
    headers = [line for line in out.splitlines() if not line.startswith(" ")]
    assert headers == [loose, os.path.join(photos, "a", "2.png"), os.path.join(photos, "a", "b", "1.jpg")]
    firsts = out.splitlines()[1::6]  # each image: its path, then 5 lines, the most likely first
    assert len(firsts) == 3 and all(line.split()[1:] == [GOLDFISH, *WORDS[GOLDFISH].split()] for line in firsts), out
    assert sum(line.startswith("  ") for line in out.splitlines()) == 3 * 5
    # The reason in the brackets is PIL's own words, which vary between its versions.
    assert err.count("\n") == 1 and err.startswith(f"warning: skipping {photos}/broken.jpg: not an image PIL can "
                                                    "read ("), err


def test_json_output(rigged, images, capsys):
    assert predict.main(["--model", rigged, "--json", "--device", "cpu", str(images / "photos" / "a")]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [os.path.basename(r["image"]) for r in results] == ["2.png", "1.jpg"]
    for r in results:
        assert len(r["top"]) == 5
        best, second = r["top"][:2]
        assert (best["index"], best["id"], best["name"]) == (CLASSES.index(GOLDFISH), GOLDFISH, WORDS[GOLDFISH])
        assert second["id"] == CLASSES[-1] and second["name"] == WORDS[CLASSES[-1]]
        assert best["prob"] > 0.9 and abs(sum(e["prob"] for e in r["top"]) - 1) < 1e-5


@pytest.mark.parametrize("make_args,message", [
    (lambda t, m: ["--model", str(t / "nope"), str(t / "loose.jpeg")], "--model {t}/nope: no such folder"),
    (lambda t, m: ["--model", m, str(t / "photos" / "notes.txt")], "{t}/photos/notes.txt: not an image PIL can read"),
    (lambda t, m: ["--model", m, str(t / "photos" / "broken.jpg")], "{t}/photos/broken.jpg: not an image"),
    (lambda t, m: ["--model", m, str(t / "missing.jpg")], "{t}/missing.jpg: no such file or folder"),
    (lambda t, m: ["--model", m, str(t / "photos" / "a" / "b" / "empty")], "no such file or folder"),
    (lambda t, m: ["--model", m, "--device", "tpu9", str(t / "loose.jpeg")], "--device tpu9: "),
    (lambda t, m: ["--model", m, "--top", "0", str(t / "loose.jpeg")], "--top 0; expected an int >= 1"),
    (lambda t, m: ["--model", str(t / "photos"), str(t / "loose.jpeg")], "no model.safetensors.index.json"),
])
def test_errors_are_one_line_exit_2(rigged, images, capsys, make_args, message):
    assert predict.main(make_args(images, rigged)) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: "), err
    assert message.format(t=images) in err, err


def test_folder_without_images_and_export_without_config(rigged, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    assert predict.main(["--model", rigged, str(tmp_path / "empty")]) == 2
    assert "no image files" in capsys.readouterr().err
    model = build_model(load_config(["--data.image_size=16"]).model, 5)
    export_model(model, str(tmp_path / "old"), "20MB")  # weights only, as before config.json
    assert predict.main(["--model", str(tmp_path / "old"), str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_help(capsys):
    assert predict.main(["--help"]) == 0  # argparse's exit, returned by cli.run: a console script's code
    out, err = capsys.readouterr()
    assert "--model DIR" in out and err == ""


def test_usage_error_is_2_and_says_what_is_missing(capsys):
    assert predict.main(["cat.jpg"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "the following arguments are required: --model" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_gives_the_cpu_answer(rigged, images):
    cpu = list(predict.predict(rigged, [str(images / "photos")], torch.device("cpu"), warn=lambda m: None))
    gpu = list(predict.predict(rigged, [str(images / "photos")], torch.device("cuda"), warn=lambda m: None))
    assert [[e["id"] for e in r["top"]] for r in gpu] == [[e["id"] for e in r["top"]] for r in cpu]
    for g, c in zip(gpu, cpu):
        assert all(abs(a["prob"] - b["prob"]) < 1e-3 for a, b in zip(g["top"], c["top"]))


@pytest.mark.slow
def test_command_line(rigged, images):
    from helpers.train import PYTHON, describe, run, train_env

    result = run([PYTHON, "-m", "tinydist.predict", "--model", rigged, "--json", str(images / "loose.jpeg")],
                 env=train_env(), timeout=120)
    assert result.returncode == 0, describe(result)
    [line] = result.stdout.splitlines()
    assert json.loads(line)["top"][0]["name"] == WORDS[GOLDFISH]

"""tinydist.data.sources and tinydist.data.cache: every source layout loads to the same labelled
images; the decode-once cache and its fingerprint; the zero-copy view; subsets; the offline `digits`
source; one-line errors; the CLI."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import fixtures as fx
from tinydist.config import ConfigError, DataConfig
from tinydist.data import cache as data
from tinydist.data.cache import load_split
from tinydist.data.sources import DataError, open_source
from tinydist.runtime.exitcodes import TransientError

REPO = Path(__file__).resolve().parents[3]
LAYOUTS = ["hub parquet", "parquet without README", "tiny-imagenet-200", "save_to_disk"]


def quiet(_msg: str) -> None:
    pass


def reference(jpeg: bytes, size: int) -> np.ndarray:
    """What the cache should hold for an image: PIL's decode, as RGB, bicubic-resized if needed."""
    from PIL import Image

    with Image.open(io.BytesIO(jpeg)) as im:
        rgb = im.convert("RGB")
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.BICUBIC)
        return np.asarray(rgb, np.uint8)


def digest(pixels: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(pixels).tobytes()).hexdigest()


def expected_by_content(split: str, size: int = 64, variant: int = 0) -> dict[str, int]:
    """{digest of the decoded image: label} of the fixture split: rows matched by content, not order."""
    out = {digest(reference(s.jpeg, size)): s.label for s in fx.samples(split, variant)}
    assert len(out) == len(fx.samples(split)), "fixture images must be distinct"
    return out


def by_content(cache: data.ImageCache) -> dict[str, int]:
    pixels = cache.gather(np.arange(len(cache)))
    return {digest(p): int(label) for p, label in zip(pixels, cache.labels)}


def build(layout: str, root: Path, variant: int = 0) -> str:
    """One fixture layout under `root`; returns what data.source should say."""
    if layout == "hub parquet":
        return fx.build_hub_parquet(str(root), variant=variant)
    if layout == "parquet without README":
        return fx.build_hub_parquet(str(root), readme=False, variant=variant)
    if layout == "tiny-imagenet-200":
        return fx.build_tiny_imagenet_folder(str(root), variant=variant)
    # labels in wnids.txt order, not sorted: the cache must re-index them
    shutil.rmtree(root, ignore_errors=True)
    return fx.build_save_to_disk(str(root), class_names=fx.WNIDS, variant=variant)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("sources")
    return {layout: build(layout, root / layout.replace(" ", "_")) for layout in LAYOUTS}


# ---- every layout, same result ------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("split", ["train", "valid"])
def test_every_layout_loads_the_same_labelled_images(sources, cache_dir, layout, split):
    cache = load_split(DataConfig(source=sources[layout], cache_dir=cache_dir), split, log=quiet)
    assert cache.classes == fx.CLASSES == sorted(fx.WNIDS)
    assert len(cache) == len(fx.samples(split))
    assert cache.labels.dtype == np.int64
    # label i means CLASSES[i] whatever the source's own label order (save_to_disk uses wnids.txt order)
    assert by_content(cache) == expected_by_content(split)
    # `valid` resolves whatever the source calls its validation split
    assert cache.meta["split"] in ((split,) if split == "train" else ("valid", "validation"))
    assert cache.meta["rows"] == len(cache) and cache.meta["image_size"] == 64


def test_source_label_order_differs_from_sorted_in_the_save_to_disk_fixture(sources):
    """Guards the test above: one source really has unsorted label names, so the remap is exercised."""
    src = open_source(sources["save_to_disk"], "train")
    assert src.classes == fx.WNIDS != sorted(fx.WNIDS)
    raw = [src.classes[label] for label in src.dataset["label"]]
    assert raw == [s.wnid for s in fx.samples("train")]


@pytest.mark.parametrize("split", ["valid", "validation", "val"])
def test_validation_split_aliases_resolve_for_every_layout(sources, split):
    for layout, path in sources.items():
        src = open_source(path, split)
        assert src.split in ("valid", "validation"), layout
        assert len(src.dataset) == len(fx.samples("valid")), layout
        assert src.splits == {"train": 40, src.split: 15}, layout


def test_tiny_imagenet_folder_found_from_its_parent(sources, cache_dir):
    parent = os.path.dirname(sources["tiny-imagenet-200"])
    src = open_source(parent, "valid")
    assert src.kind == "tiny-imagenet-200 folder"
    # val labels come from val_annotations.txt, in file order
    assert [src.classes[label] for label in src.dataset["label"]] == [s.wnid for s in fx.samples("valid")]


def test_grayscale_becomes_rgb_and_is_counted(sources, cache_dir):
    from PIL import Image

    gray = [s for s in fx.samples("train") if s.gray]
    assert gray and all(Image.open(io.BytesIO(s.jpeg)).mode == "L" for s in gray)  # the fixture is honest
    cache = load_split(DataConfig(source=sources["hub parquet"], cache_dir=cache_dir), "train", log=quiet)
    assert cache.meta["grayscale"] == len(gray) == fx.num_grayscale("train")
    pixels = cache.gather(np.arange(len(cache)))
    assert pixels.shape == (len(cache), 64, 64, 3) and pixels.dtype == np.uint8
    gray_digests = {digest(reference(s.jpeg, 64)) for s in gray}
    rows = [i for i, p in enumerate(pixels) if digest(p) in gray_digests]
    assert len(rows) == len(gray)
    for i in rows:  # three equal channels
        assert np.array_equal(pixels[i, ..., 0], pixels[i, ..., 1]) and np.array_equal(pixels[i, ..., 0], pixels[i, ..., 2])
    colour = [i for i in range(len(cache)) if i not in rows]
    assert all(not np.array_equal(pixels[i, ..., 0], pixels[i, ..., 1]) for i in colour)


@pytest.mark.parametrize("size", [32, 48])
def test_cache_is_uint8_at_the_configured_size(sources, cache_dir, size):
    cache = load_split(DataConfig(source=sources["hub parquet"], cache_dir=cache_dir, image_size=size), "valid", log=quiet)
    assert cache.image_size == size == cache.meta["image_size"]
    pixels = cache.gather(np.arange(len(cache)))
    assert pixels.shape == (15, size, size, 3) and pixels.dtype == np.uint8
    assert by_content(cache) == expected_by_content("valid", size)
    assert f"-{size}px-" in os.path.basename(cache.folder)


def test_gather_is_a_uint8_view_equal_to_a_decode(sources, cache_dir):
    cache = load_split(DataConfig(source=sources["tiny-imagenet-200"], cache_dir=cache_dir), "train", log=quiet)
    assert all(not c.flags.owndata and not c.flags.writeable for c in cache._chunks)  # a view of the mapped file
    src = open_source(sources["tiny-imagenet-200"], "train")
    rng = np.random.default_rng(1)
    indices = rng.integers(0, len(cache), 17)  # unsorted, with repeats
    batch = cache.gather(indices)
    assert batch.dtype == np.uint8 and batch.shape == (17, 64, 64, 3)
    for row, i in zip(batch, indices):
        with open(src.dataset[int(i)]["image"]["path"], "rb") as f:
            assert np.array_equal(row, reference(f.read(), 64))


def test_gather_across_arrow_chunks_of_digits(cache_dir):
    """Offline `digits`: 10 classes, train + valid; several Arrow chunks, gathered in any order."""
    cfg = DataConfig(source="digits", image_size=32, cache_dir=cache_dir)
    train = load_split(cfg, "train", log=quiet)
    valid = load_split(cfg, "valid", log=quiet)
    assert train.classes == valid.classes == [f"digit_{d}" for d in range(10)]
    assert len(train) + len(valid) == 1797 and len(valid) == 299
    assert set(train.labels.tolist()) == set(valid.labels.tolist()) == set(range(10))
    assert train.meta["grayscale"] == len(train)  # sklearn digits are mode L
    assert open_source("digits", "validation").split == "valid"
    assert len(train._chunks) > 1
    src = open_source("digits", "train")
    indices = np.array([len(train) - 1, 0, 700, 257, 256, 255, 1200, 3])
    batch = train.gather(indices)
    assert batch.dtype == np.uint8 and batch.shape == (8, 32, 32, 3)
    for row, i in zip(batch, indices):
        assert np.array_equal(row, reference(src.dataset[int(i)]["image"]["bytes"], 32))
        assert train.labels[i] == src.dataset[int(i)]["label"]


# ---- fingerprint: same inputs reuse, changed inputs rebuild --------------------------------------------




def test_same_inputs_reuse_the_cache_folder(sources, tmp_path, build_calls):
    cfg = DataConfig(source=sources["hub parquet"], cache_dir=str(tmp_path))
    first = load_split(cfg, "train", log=quiet)
    meta_file = os.path.join(first.folder, "cache.json")
    stamp = os.stat(meta_file).st_mtime_ns
    second = load_split(DataConfig(source=sources["hub parquet"], cache_dir=str(tmp_path)), "train", log=quiet)
    assert second.folder == first.folder
    assert build_calls == [first.folder]  # built once
    assert os.stat(meta_file).st_mtime_ns == stamp
    assert os.listdir(tmp_path) == [os.path.basename(first.folder)]  # no leftover .tmp folder


def test_changed_image_size_builds_another_folder(sources, tmp_path, build_calls):
    a = load_split(DataConfig(source=sources["hub parquet"], cache_dir=str(tmp_path), image_size=64), "valid", log=quiet)
    b = load_split(DataConfig(source=sources["hub parquet"], cache_dir=str(tmp_path), image_size=40), "valid", log=quiet)
    assert a.folder != b.folder and build_calls == [a.folder, b.folder]
    assert a.gather(np.arange(3)).shape == (3, 64, 64, 3) and b.gather(np.arange(3)).shape == (3, 40, 40, 3)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_changed_source_content_rebuilds(layout, tmp_path, build_calls):
    """A source rewritten in place (same paths, same labels, other pixels) must not serve the old cache."""
    path = build(layout, tmp_path / "src")
    cfg = DataConfig(source=path, cache_dir=str(tmp_path / "cache"))
    old = load_split(cfg, "train", log=quiet)
    assert by_content(old) == expected_by_content("train")
    path = build(layout, tmp_path / "src", variant=1)
    new = load_split(cfg, "train", log=quiet)
    assert new.folder != old.folder
    assert build_calls == [old.folder, new.folder]
    assert by_content(new) == expected_by_content("train", variant=1)


# ---- subsets ----------------------------------------------------------------------------------------------


def test_max_samples_is_a_fixed_subset_of_several_classes(sources, tmp_path):
    path = sources["tiny-imagenet-200"]  # rows sorted by class: the first k would be one class
    full = by_content(load_split(DataConfig(source=path, cache_dir=str(tmp_path / "a")), "train", log=quiet))
    a = load_split(DataConfig(source=path, cache_dir=str(tmp_path / "a")), "train", max_samples=12, log=quiet)
    b = load_split(DataConfig(source=path, cache_dir=str(tmp_path / "b")), "train", max_samples=12, log=quiet)
    assert len(a) == 12 == a.meta["rows"] and a.meta["max_samples"] == 12
    assert len(set(a.labels.tolist())) >= 3
    subset = by_content(a)
    assert subset == by_content(b)  # the same subset in another cache: fixed, not random per run
    assert subset.items() <= full.items()  # real rows with their real labels
    assert load_split(DataConfig(source=path, cache_dir=str(tmp_path / "a")), "train", max_samples=1000, log=quiet).meta["rows"] == 40


# ---- 16-bit images, small images, empty classes ---------------------------------------------------------


class Log(list):
    def __call__(self, message: str) -> None:
        self.append(message)

    def warnings(self) -> list[str]:
        return [m for m in self if m.startswith("warning:")]


def gradient16() -> np.ndarray:
    """A 64x64 16-bit gradient over the whole range: 0 at the top left, 0xFFFF at the bottom right."""
    x, y = np.meshgrid(np.arange(64), np.arange(64))
    return (x * 1024 + y * 16 + y // 4).astype(np.uint16)


def test_a_16_bit_png_decodes_to_its_top_8_bits(tmp_path):
    from PIL import Image

    values = gradient16()
    png = fx.encode_png(values)
    with Image.open(io.BytesIO(png)) as im:  # the fixture is the kind that convert("RGB") clips
        assert im.mode in ("I;16", "I")  # Pillow 10+ opens it as I;16, older ones (the 9.4 floor) as I
        assert (np.asarray(im.convert("RGB")) == 255).mean() > 0.99
    dark = fx.encode_png(np.full((64, 64), 0x00FF, np.uint16))  # every value below 256: black, not full grey
    root = fx.build_class_folders(str(tmp_path / "src"), {fx.CLASSES[0]: [png], fx.CLASSES[1]: [dark]})
    cache = load_split(DataConfig(source=root, cache_dir=str(tmp_path / "cache")), "train", log=quiet)
    pixels = cache.gather(np.arange(2))
    assert pixels.shape == (2, 64, 64, 3)
    assert np.array_equal(pixels[0], np.repeat((values >> 8).astype(np.uint8)[..., None], 3, axis=2))
    assert pixels[0, 0, 0].tolist() == [0, 0, 0]  # value 0
    assert pixels[0, 0, 63].tolist() == [252, 252, 252]  # 63 * 1024 = 0xFC00
    assert pixels[0, 63, 0].tolist() == [3, 3, 3]  # 63 * 16 + 15 = 0x03FF
    assert pixels[0, 63, 63].tolist() == [255, 255, 255]  # 0xFFFF
    assert pixels[0, 32, 10].tolist() == [42, 42, 42]  # 10 * 1024 + 32 * 16 + 8 = 0x2A08
    assert not pixels[1].any()
    assert cache.meta["grayscale"] == 2


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_every_16_bit_mode_keeps_the_top_8_bits(mode):
    from PIL import Image

    values = np.array([[0, 0x00FF, 0x0100, 0x1234], [0x7FFF, 0x8000, 0xABCD, 0xFFFF]], np.uint16)
    if mode == "I":
        im = Image.fromarray(values.astype(np.int32))
    else:
        im = Image.frombytes(mode, (4, 2), values.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    assert im.mode == mode
    rgb = data.to_rgb8(im)
    assert rgb.mode == "RGB"
    assert np.asarray(rgb)[..., 0].tolist() == [[0, 0, 1, 0x12], [0x7F, 0x80, 0xAB, 0xFF]]


def test_integer_pixels_beyond_16_bits_are_refused_not_guessed(tmp_path):
    from PIL import Image

    im = Image.fromarray(np.array([[0, 70000]], np.int32))
    with pytest.raises(ValueError, match=r"I pixels span 0\.\.70000, beyond 16 bits"):
        data.to_rgb8(im)
    with pytest.raises(ValueError, match=r"span -5\.\.3"):
        data.to_rgb8(Image.fromarray(np.array([[-5, 3]], np.int32)))


def test_small_images_are_counted_in_one_warning_per_build(tmp_path):
    normal = [s.jpeg for s in fx.samples("train")[:3]]
    tiny = fx.encode_png(np.full((1, 1, 3), 200, np.uint8))
    thin = fx.encode_png(np.full((64, 7, 3), 90, np.uint8))  # 7 px wide: under the 8 px limit
    edge = fx.encode_png(np.full((8, 8, 3), 30, np.uint8))  # 8 px: small, but not suspicious
    root = fx.build_class_folders(str(tmp_path / "src"), {fx.CLASSES[0]: normal + [edge], fx.CLASSES[1]: [thin, tiny]})
    cfg = DataConfig(source=root, cache_dir=str(tmp_path / "cache"))
    log = Log()
    cache = load_split(cfg, "train", log=log)
    (line,) = log.warnings()
    example = os.path.join(root, "train", fx.CLASSES[1], "images", f"{fx.CLASSES[1]}_0.png")
    assert line == (f"warning: 2 of 6 images of {root} [train] have a side under 8 px, e.g. image #4 ({example}, "
                    "shorter side 7 px); they are upscaled to 64x64 like the rest: check the source")
    assert cache.meta["small_images"] == 2 and len(cache) == 6
    assert cache.gather(np.array([5]))[0].tolist() == np.full((64, 64, 3), 200).tolist()  # still decoded
    log.clear()
    load_split(cfg, "train", log=log)  # the cache is reused: said once, at its build
    assert not log


def test_small_image_in_a_subset_is_named_by_its_row_in_the_source(tmp_path):
    images = [fx.encode_png(np.full((64, 64, 3), k, np.uint8)) for k in range(10)]
    images[7] = fx.encode_png(np.full((2, 2, 3), 7, np.uint8))
    root = fx.build_class_folders(str(tmp_path / "src"), {fx.CLASSES[0]: images})
    subset = data._subset(10, 9)
    assert 7 in subset and list(subset).index(7) != 7  # row 7 of the source is another row of the subset
    log = Log()
    load_split(DataConfig(source=root, cache_dir=str(tmp_path / "cache")), "train", max_samples=9, log=log)
    (line,) = log.warnings()
    assert line.startswith(f"warning: 1 of 9 images of {root} [train] have a side under 8 px, e.g. image #7 (")
    assert f"{fx.CLASSES[0]}_7.png, shorter side 2 px)" in line


def test_an_empty_class_folder_is_a_data_error_naming_the_class_and_the_folder(tmp_path):
    root = fx.build_class_folders(str(tmp_path / "src"), {fx.CLASSES[0]: [s.jpeg for s in fx.samples("train")[:2]],
                                                          fx.CLASSES[1]: []})
    with pytest.raises(DataError) as e:
        load_split(DataConfig(source=root, cache_dir=str(tmp_path / "cache")), "train", log=quiet)
    message = one_line(e)
    folder = os.path.join(root, "train", fx.CLASSES[1], "images")
    assert f"class {fx.CLASSES[1]} has no training images in {folder}" in message
    assert f"remove {fx.CLASSES[1]} from wnids.txt" in message
    assert not (tmp_path / "cache").exists() or not os.listdir(tmp_path / "cache")  # nothing built


def test_a_declared_class_without_images_is_one_warning_per_split(tmp_path):
    extra = "n09999999"  # a ClassLabel name no row uses
    path = fx.build_save_to_disk(str(tmp_path / "src"), class_names=fx.WNIDS + [extra])
    cfg = DataConfig(source=path, cache_dir=str(tmp_path / "cache"))
    for split in ("train", "valid"):
        log = Log()
        cache = load_split(cfg, split, log=log)
        assert log.warnings() == [f"warning: 1 of 6 classes have no images in {path} [{cache.meta['split']}], "
                                  f"e.g. `{extra}`; nothing teaches (train) or tests (valid) them"]
        assert cache.meta["empty_classes"] == [extra] and cache.classes[-1] == extra
    log = Log()
    subset = load_split(cfg, "train", max_samples=20, log=log)  # a subset may miss a class by chance: not said
    assert not log.warnings() and subset.meta["empty_classes"] == []


def test_fixture_sources_build_without_warnings(tmp_path):
    log = Log()
    load_split(DataConfig(source=fx.build_hub_parquet(str(tmp_path / "src")), cache_dir=str(tmp_path / "c")),
               "train", log=log)
    assert log and not log.warnings()


# ---- one-line errors --------------------------------------------------------------------------------------


def one_line(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message
    assert isinstance(excinfo.value, ConfigError)
    return message


def test_missing_path(tmp_path):
    for source in (str(tmp_path / "nowhere"), "./data/tiny-imagenet", "~/no/such/folder"):
        with pytest.raises(DataError) as e:
            open_source(source, "train")
        message = one_line(e)
        assert f"`{source}`" in message and "no such folder" in message


def test_folder_without_a_dataset(tmp_path):
    with pytest.raises(DataError) as e:
        open_source(str(tmp_path), "train")
    message = one_line(e)
    assert "no dataset found" in message and "tiny-imagenet-200" in message


def test_hub_id_offline_says_how_to_point_at_a_local_copy():
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(TransientError) as e:  # unreachable is not "bad data": a relaunch may succeed
        open_source("zh-plus/tiny-imagenet", "train")
    message = str(e.value)
    assert "\n" not in message and "zh-plus/tiny-imagenet" in message and "set data.source to that folder" in message
    assert "configs/smoke.yaml" in message


def test_dataset_without_image_or_label_column(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]}).save_to_disk(str(tmp_path / "text"))
    with pytest.raises(DataError) as e:
        open_source(str(tmp_path / "text"), "train")
    message = one_line(e)
    assert "['text', 'label']" in message and "expected an image column" in message

    images = [{"bytes": s.jpeg, "path": None} for s in fx.samples("valid")[:2]]
    features = datasets.Features({"image": datasets.Image(), "target": datasets.Value("int64")})
    datasets.Dataset.from_dict({"image": images, "target": [0, 1]}, features=features).save_to_disk(str(tmp_path / "nolabel"))
    with pytest.raises(DataError) as e:
        open_source(str(tmp_path / "nolabel"), "train")
    assert "`label` column" in one_line(e)


def test_unknown_split_lists_the_available_ones(sources):
    with pytest.raises(DataError) as e:
        open_source(sources["hub parquet"], "test")
    message = one_line(e)
    assert "no split `test`" in message and "it has train, valid" in message


def test_corrupt_jpeg_names_index_and_source(tmp_path):
    path = fx.build_hub_parquet(str(tmp_path / "bad"), corrupt=7)
    with pytest.raises(DataError) as e:
        load_split(DataConfig(source=path, cache_dir=str(tmp_path / "cache")), "train", log=quiet)
    message = one_line(e)
    assert "image #7" in message and path in message and "[train]" in message
    # nothing that looks like a finished cache is left behind
    assert not list((tmp_path / "cache").glob("*/cache.json"))


def test_bad_val_annotations_line(sources, tmp_path):
    root = Path(shutil.copytree(sources["tiny-imagenet-200"], tmp_path / "tiny-imagenet-200"))
    annotations = root / "val" / "val_annotations.txt"
    lines = annotations.read_text().splitlines()
    lines[2] = "val_2.JPEG\tn99999999\t0\t0\t63\t63"
    annotations.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        open_source(str(root), "valid")
    assert f"{annotations}:3:" in one_line(e)


def test_missing_val_image(sources, tmp_path):
    root = Path(shutil.copytree(sources["tiny-imagenet-200"], tmp_path / "tiny-imagenet-200"))
    (root / "val" / "images" / "val_4.JPEG").unlink()
    with pytest.raises(DataError) as e:
        open_source(str(root), "valid")
    assert str(root / "val" / "images" / "val_4.JPEG") in one_line(e)


# ---- python -m tinydist.data ----------------------------------------------------------------------------


def test_cli_json(sources, tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "tinydist.data", f"--data.source={sources['hub parquet']}",
         "--data.cache_dir", str(tmp_path), "--data.max_train_samples=20", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout)
    assert info["splits"] == {"train": 40, "valid": 15}
    assert info["classes"] == fx.CLASSES and info["num_classes"] == 5
    assert info["kind"] == "parquet folder"
    assert info["grayscale"]["valid"] == fx.num_grayscale("valid")
    assert 0 < info["grayscale"]["train"] <= fx.num_grayscale("train")
    assert info["small_images"] == {"train": 0, "valid": 0}
    assert all(str(tmp_path) in folder and os.path.isfile(os.path.join(folder, "cache.json"))
               for folder in info["cache"].values())


def test_cli_error_is_one_line(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "tinydist.data", f"--data.source={tmp_path / 'missing'}",
         f"--data.cache_dir={tmp_path}", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip().count("\n") == 0 and run.stderr.startswith("error: data.source")


def cache_folders(root: Path) -> set[str]:
    return {p.name for p in root.iterdir()} if root.exists() else set()


def test_cli_builds_exactly_the_caches_train_reads(tmp_path, capsys):
    cache_root = tmp_path / "cache"
    code = data.main(["--config", str(REPO / "configs" / "smoke.yaml"), f"--data.cache_dir={cache_root}", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    info = json.loads(out)
    built = cache_folders(cache_root)
    assert len(built) == 2 and {os.path.basename(f) for f in info["cache"].values()} == built
    assert "-x2-" in os.path.basename(info["cache"]["train"])  # data.train_detail: 2, as train reads it

    from tinydist.config import load_config

    cfg = load_config(["--config", str(REPO / "configs" / "smoke.yaml"), f"--data.cache_dir={cache_root}"])
    # the calls train.py makes today, argument for argument ...
    log = Log()
    train = load_split(cfg.data, cfg.data.train_split, cfg.data.max_train_samples, log=log, detail=cfg.data.train_detail)
    val = load_split(cfg.data, cfg.data.val_split, cfg.data.max_val_samples, log=log)
    # ... and the function it is to call instead
    same = data.load_train_val(cfg.data, log=log)
    assert not log  # nothing decoded: every cache was there
    assert cache_folders(cache_root) == built
    assert [c.folder for c in same] == [train.folder, val.folder] == [info["cache"]["train"], info["cache"]["valid"]]


def test_cli_errors_go_through_cli_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert data.main(["--data.source=./data/no-such-folder", f"--data.cache_dir={tmp_path}"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (f"error: data.source `./data/no-such-folder`: no such folder (relative to {tmp_path}): "
                                 f"{tmp_path / 'data' / 'no-such-folder'}\n")
    assert data.main(["--data.image_size=0"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1 and "image_size" in err
    assert data.main(["--help", "--data.image_size=0"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("usage: python -m tinydist.data --config FILE") and err == ""


def test_digits_are_scikit_learns_without_importing_it():
    """The smoke source reads the file scikit-learn ships (its import is 2 s of every smoke run's start):
    the same images and labels as `load_digits`, in a process that never imports sklearn."""
    probe = ("import sys, json; from tinydist.data.sources import _digits_arrays; x, y = _digits_arrays(); "
             "print(json.dumps([x.tolist(), y.tolist(), 'sklearn' in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    images, labels, imported = json.loads(done.stdout)
    from sklearn.datasets import load_digits

    digits = load_digits()
    assert not imported
    assert np.array_equal(np.array(images), digits.images) and np.array_equal(np.array(labels), digits.target)
    assert np.array(images).shape == (1797, 8, 8) and sorted(set(labels)) == list(range(10))

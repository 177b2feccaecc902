"""`--help` / `-h` on every entry point: every config key with its type, default and the comment above
its field, fast and without torch; and a local path that does not exist is never taken for a hub id."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import fixtures as fx
from tinydist import config
from tinydist.config import schema
from tinydist.data import sources
from tinydist.config import ConfigError, HelpRequested, all_keys, help_text, load_config
from tinydist.data.sources import DataError, open_source
from tinydist.runtime.exitcodes import EXIT_CONFIG, TransientError

REPO = Path(__file__).resolve().parents[3]
TIMEOUT_S = 180.0  # a subprocess that outlives this is hung (train.py imports torch first)
SMOKE = str(REPO / "configs" / "smoke.yaml")


def flat(text: str) -> str:
    return " ".join(text.split())


def source_comments() -> dict[str, str]:
    """{dotted key: its comment}, read from config/schema.py with plain line matching (not the ast/tokenize
    reader under test): the `#` lines directly above each field of each section's dataclass."""
    source = Path(schema.__file__).read_text()
    section_of = {cls: name for name, cls in re.findall(r"^    (\w+): (\w+Config) = field", source, re.M)}
    comments, cls, above = {}, None, []
    for line in source.splitlines():
        if m := re.match(r"^class (\w+)", line):
            cls, above = m.group(1), []
        elif line.strip().startswith("#"):
            above.append(line.strip().lstrip("#").strip())
        elif (m := re.match(r"^    (\w+): ", line)) and cls in section_of:
            comments[f"{section_of[cls]}.{m.group(1)}"] = " ".join(above)
            above = []
        else:
            above = []
    return comments


_runs: dict[tuple[str, ...], subprocess.CompletedProcess] = {}


def run(*argv: str, timeout: float = TIMEOUT_S) -> tuple[subprocess.CompletedProcess, float]:
    """`python -m <argv>` from the repository root; each distinct command runs once per session."""
    if argv not in _runs:
        start = time.monotonic()
        _runs[argv] = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=timeout)
        _runs[argv].elapsed = time.monotonic() - start  # type: ignore[attr-defined]
    return _runs[argv], _runs[argv].elapsed  # type: ignore[attr-defined]


# tinydist.train's --help imports torch in a fresh interpreter (seconds): slow; the other two are the fast loop's.
# (train.main answers --help through cli.run, as every entry point does.)
ENTRY_POINTS = [pytest.param("tinydist.train", marks=pytest.mark.slow), "tinydist.config", "tinydist.data"]


# ---- what --help says ---------------------------------------------------------------------------


def test_every_field_is_commented_and_the_reader_agrees_with_the_source():
    expected = source_comments()
    assert sorted(expected) == sorted(all_keys())
    text = flat(help_text("python -m tinydist.train"))
    for key in all_keys():
        assert expected[key], f"{key} has no comment above its field"
        assert flat(expected[key]) in text, key


def test_sections_in_dataclass_order_and_every_key_under_its_own():
    lines = help_text("python -m tinydist.train").splitlines()
    headers = [line for line in lines if re.fullmatch(r"\[\w+\]", line)]
    assert headers == ["[data]", "[model]", "[optim]", "[train]", "[mix]", "[ema]", "[eval]", "[export]",
                       "[checkpoint]", "[log]", "[preemption]"]
    keys = [m.group(1) for line in lines if (m := re.match(r"^  ([\w.]+): ", line))]
    assert keys == all_keys()
    section = None
    for line in lines:
        if re.fullmatch(r"\[\w+\]", line):
            section = line[1:-1]
        elif m := re.match(r"^  ([\w.]+): ", line):
            assert m.group(1).split(".")[0] == section


@pytest.mark.parametrize("line", [
    "  train.global_batch_size: int = 512",
    "  train.max_steps: int or null = null",
    "  optim.lr: float = 0.2",
    "  data.source: str = zh-plus/tiny-imagenet",
    "  data.crop_scale: list of float = [0.08, 1.0]",
    "  data.hflip: bool = true",
    "  log.report_to: list of str = []",
    "  checkpoint.every_minutes: str = off",
    "  checkpoint.dir: str or null = null",
])
def test_types_and_defaults(line):
    assert line in help_text("python -m tinydist.train").splitlines()


def test_header_says_how_to_run_and_where_to_look():
    text = help_text("python -m tinydist.train")
    assert text.startswith("usage: python -m tinydist.train --config FILE [--section.key=VALUE ...]\n"
                           "       python -m tinydist.train --config FILE [--section.key VALUE ...]\n")
    head = flat(text.split("\n[data]")[0])
    assert "configs/" in head and "smoke.yaml" in head and "tiny_imagenet_resnet18.yaml" in head
    assert "python -m tinydist.config --config FILE" in head
    assert "Exit codes: 0" in head and "README.md" in head


def test_help_anywhere_in_argv_wins_over_bad_arguments():
    for argv in (["--help"], ["-h"], ["--config", "/no/such.yaml", "--help"], ["--train.max_step=3", "-h"],
                 ["--train.epochs", "3", "--help", "--optim.lr=1"], ["stray", "-h"]):
        with pytest.raises(HelpRequested) as e:
            load_config(argv)
        assert "  train.max_steps: " in e.value.text, argv
    assert not issubclass(HelpRequested, ConfigError)  # not an error: exit 0, stdout


def test_config_main_prints_help_to_stdout_and_returns_0(capsys):
    assert config.main(["--optim.bogus=1", "--help"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("usage: python -m tinydist.config ") and "  optim.lr: float = 0.2" in out and err == ""


# ---- --help on the command line ------------------------------------------------------------------


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_cli_help_lists_every_key_with_its_comment(module):
    result, elapsed = run("-m", module, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert out.startswith(f"usage: python -m {module} ")
    for key, comment in source_comments().items():
        assert re.search(rf"^  {re.escape(key)}: \S", out, re.M), key
        assert flat(comment) in flat(out), key
    assert ("Images per optimizer step, whatever the number of processes: this fixes the trajectory."
            in flat(out))
    assert ("Also save every this many minutes by the clock (whichever of this and every_steps comes first): "
            "a number, `off`, or `auto`: Young/Daly's sqrt(2 x save cost x mtbf_minutes), the cost measured."
            in flat(out))
    assert "  train.global_batch_size: int = 512" in out and "  checkpoint.every_minutes: str = off" in out


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_cli_short_flag_mixed_with_other_arguments(module):
    result, _ = run("-m", module, "--config", SMOKE, "--train.max_step=3", "-h", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "  checkpoint.every_minutes: str = off" in result.stdout


def test_data_help_names_its_own_options():
    result, _ = run("-m", "tinydist.data", "--help")
    assert result.stdout.startswith("usage: python -m tinydist.data --config FILE [--section.key=VALUE ...] [--json]")


@pytest.mark.slow  # a fresh interpreter that imports torch
def test_evaluate_help_points_at_the_config_keys():
    result, _ = run("-m", "tinydist.evaluate", "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--checkpoint PATH" in result.stdout and "python -m tinydist.config --help" in result.stdout


@pytest.mark.parametrize("module, entry", [("tinydist.config", "tinydist.config"), ("tinydist.data", "tinydist.data.cache")])
def test_help_does_not_import_torch(module, entry):
    snippet = (f"import sys; from {entry} import main; rc = main(['--help']); "
               "sys.exit(3 if 'torch' in sys.modules else rc)")
    result = subprocess.run([sys.executable, "-c", snippet], cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-2000:]
    timed = subprocess.run([sys.executable, "-X", "importtime", "-m", module, "--help"], cwd=REPO,
                           capture_output=True, text=True, timeout=TIMEOUT_S)
    assert timed.returncode == 0
    imported = [line.rsplit("|", 1)[-1].strip() for line in timed.stderr.splitlines() if line.startswith("import time:")]
    assert imported and not [m for m in imported if m.split(".")[0] in ("torch", "torchvision", "accelerate")]


# ---- a missing path is not a hub id --------------------------------------------------------------


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """Work in an empty folder; any call to the hub fails the test."""
    import datasets

    def load_dataset(*args, **kwargs):
        raise AssertionError(f"the hub was asked for {args}")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def missing(source: str) -> str:
    with pytest.raises(DataError) as e:  # the `no_hub` fixture fails the test on any hub call
        open_source(source, "train")
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"data.source `{source}`: no such folder")
    return message


def test_path_shaped_like_a_hub_id_fails_at_once(no_hub):
    assert missing("data/tiny-imagenet-200") == (
        f"data.source `data/tiny-imagenet-200`: no such folder (relative to {no_hub}); if you meant the Hugging "
        "Face hub dataset `data/tiny-imagenet-200`, it does not look like one: `tiny-imagenet-200` is what "
        "tiny-imagenet-200.zip unpacks to (the hub copy is zh-plus/tiny-imagenet)")


def test_owner_name_whose_owner_is_a_local_folder_is_a_path(no_hub):
    (no_hub / "data").mkdir()
    message = missing("data/tiny-imagenet-200")
    assert f"(relative to {no_hub}), though `data` is a folder there" in message
    (no_hub / "zh-plus").mkdir()
    message = missing("zh-plus/tiny-imagenet")
    assert "`zh-plus` is a folder there" in message and "hub dataset `zh-plus/tiny-imagenet`" in message


@pytest.mark.parametrize("source, hint", [
    ("data/imagenet/tiny", "hub ids are owner/name"),
    ("zh-plus/tiny-imagenet/extra", "hub ids are owner/name"),
    ("zh-plus/tiny-imagenet/", "for the Hugging Face hub dataset, write `zh-plus/tiny-imagenet`"),
    ("./data/tiny-imagenet", "(relative to "),
    ("../data/tiny", "(relative to "),
    ("~/no/such/tinydist-data", f"({os.path.expanduser('~/no/such/tinydist-data')})"),
    ("/no/such/dataset", ""),
    ("no such name", "a hub id (owner/name) like zh-plus/tiny-imagenet, or `digits`"),
])
def test_paths_that_are_not_hub_ids_fail_at_once(no_hub, source, hint):
    assert hint in missing(source)


def test_a_file_is_not_a_folder(no_hub):
    (no_hub / "tiny-imagenet-200.zip").write_bytes(b"PK")
    with pytest.raises(DataError) as e:
        open_source("tiny-imagenet-200.zip", "train")
    assert "is a file, not a folder" in str(e.value) and "unpack" in str(e.value)


def test_an_existing_relative_folder_shaped_like_a_hub_id_is_opened(no_hub):
    fx.build_tiny_imagenet_folder(str(no_hub / "data"))
    assert open_source("data/tiny-imagenet-200", "train").kind == "tiny-imagenet-200 folder"


def test_a_hub_id_still_goes_to_the_hub(monkeypatch, tmp_path):
    import datasets

    monkeypatch.chdir(tmp_path)
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, *a, **k: asked.append(name) or {})
    assert sources._open_all("zh-plus/tiny-imagenet") == ("hub", {})
    assert asked == ["zh-plus/tiny-imagenet"]


def test_a_hub_id_offline_is_transient_and_quick(tmp_path, monkeypatch):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TransientError) as e:
        open_source("zh-plus/tiny-imagenet", "train")
    assert "cannot reach the Hugging Face hub" in str(e.value)


def test_cli_missing_path_exits_2_with_one_line(tmp_path):
    if (REPO / "data" / "tiny-imagenet-200").exists():
        pytest.skip("this checkout has a data/tiny-imagenet-200 folder")
    result = subprocess.run([sys.executable, "-m", "tinydist.data", "--data.source=data/tiny-imagenet-200",
                             f"--data.cache_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == EXIT_CONFIG and result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: data.source `data/tiny-imagenet-200`: no such folder (relative to {REPO})")

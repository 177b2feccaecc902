"""tinydist.data under faults: a damaged decode cache is found on open and rebuilt (once); builds killed
midway leave nothing behind for long; decode workers die with their parent; an unreachable hub is
transient (exit 69) while a hub that answers "no" is a data error (exit 2)."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from tinydist.config import ConfigError, DataConfig
from tinydist.data import cache as data
from tinydist.data import cache_files
from tinydist.data.cache import load_split
from tinydist.data.sources import DataError, open_source
from tinydist.runtime import cli
from tinydist.runtime.exitcodes import EXIT_CONFIG, EXIT_TRANSIENT, TransientError

REPO = Path(__file__).resolve().parents[3]
DIGITS_TRAIN = 1498


class Log(list):
    def __call__(self, message: str) -> None:
        self.append(message)

    def damaged(self) -> list[str]:
        return [m for m in self if "is damaged" in m]




def digits(tmp_path: Path) -> DataConfig:
    return DataConfig(source="digits", image_size=16, cache_dir=str(tmp_path / "cache"))


def snapshot(cache: data.ImageCache) -> tuple[np.ndarray, np.ndarray]:
    return cache.gather(np.arange(len(cache))).copy(), cache.labels.copy()


def build_and_release(cfg: DataConfig, log: Callable[[str], None] = Log()) -> tuple[str, tuple[np.ndarray, np.ndarray]]:
    """Build the cache; return its folder and contents, with no memory map left on its files
    (truncating a mapped file would make the next read of it a SIGBUS, not a test failure)."""
    cache = load_split(cfg, "train", log=log)
    folder, contents = cache.folder, snapshot(cache)
    del cache
    gc.collect()
    return folder, contents


def arrow_file(folder: str) -> Path:
    (path,) = Path(folder).glob("*.arrow")
    return path


def message_ends(path: Path) -> list[int]:
    """Byte offsets at which each IPC message of an Arrow stream file ends: the schema, then batches."""
    import pyarrow as pa

    ends = []
    with pa.OSFile(str(path)) as f:
        reader = pa.ipc.MessageReader.open_stream(f)
        for _ in range(10_000):
            try:
                reader.read_next_message()
            except StopIteration:
                break
            ends.append(f.tell())
    return ends


def overwrite(path: Path, offset: int, size: int, keep_mtime: bool) -> None:
    stat = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(np.random.default_rng(offset).integers(0, 256, size, dtype=np.uint8).tobytes())
    assert path.stat().st_size == stat.st_size
    if keep_mtime:  # so that only the content signature can tell
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def truncate_at_batch_boundary(folder: str) -> None:
    path = arrow_file(folder)
    ends = message_ends(path)
    assert len(ends) >= 4  # schema + several batches: the cut below leaves a valid, shorter stream
    os.truncate(path, ends[-3])


def truncate_mid_batch(folder: str) -> None:
    path = arrow_file(folder)
    ends = message_ends(path)
    os.truncate(path, (ends[-3] + ends[-2]) // 2)


def random_bytes_over_the_middle(folder: str) -> None:
    path = arrow_file(folder)
    size = path.stat().st_size
    overwrite(path, size // 2 - 100_000, 200_000, keep_mtime=True)


def bytes_appended(folder: str) -> None:
    with open(arrow_file(folder), "ab") as f:
        f.write(b"\0" * 4096)


def arrow_file_deleted(folder: str) -> None:
    arrow_file(folder).unlink()


def cache_json_garbage(folder: str) -> None:
    Path(folder, "cache.json").write_bytes(b'{"format": 1, "rows": \xff\xfe garbage')


def cache_json_deleted(folder: str) -> None:
    Path(folder, "cache.json").unlink()


def cache_json_without_signatures(folder: str) -> None:
    """What every cache built before verification existed looks like."""
    meta = json.loads(Path(folder, "cache.json").read_text())
    del meta["arrow"]
    Path(folder, "cache.json").write_text(json.dumps(meta))


def cache_json_rows_edited(folder: str) -> None:
    meta = json.loads(Path(folder, "cache.json").read_text())
    meta["rows"] = 1024
    Path(folder, "cache.json").write_text(json.dumps(meta))


def cache_json_other_format(folder: str) -> None:
    meta = json.loads(Path(folder, "cache.json").read_text())
    meta["format"] = data.CACHE_FORMAT + 1
    Path(folder, "cache.json").write_text(json.dumps(meta))


def cache_json_record_mangled(folder: str) -> None:
    meta = json.loads(Path(folder, "cache.json").read_text())
    meta["arrow"] = {name: {"bytes": "many"} for name in meta["arrow"]}
    Path(folder, "cache.json").write_text(json.dumps(meta))


DAMAGE = [truncate_at_batch_boundary, truncate_mid_batch, random_bytes_over_the_middle, bytes_appended,
          arrow_file_deleted, cache_json_garbage, cache_json_deleted, cache_json_without_signatures,
          cache_json_rows_edited, cache_json_other_format, cache_json_record_mangled]


# ---- a damaged cache is found and rebuilt -------------------------------------------------------------


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__)
def test_damaged_cache_is_rebuilt_with_one_line_saying_why(tmp_path, build_calls, damage):
    cfg = digits(tmp_path)
    folder, (pixels, labels) = build_and_release(cfg)
    damage(folder)
    log = Log()
    cache = load_split(cfg, "train", log=log)
    assert cache.folder == folder and build_calls == [folder, folder]
    (line,) = log.damaged()
    assert line.startswith(f"decode cache {folder} is damaged (") and line.endswith("); rebuilding it")
    assert "\n" not in line
    assert len(cache) == cache.meta["rows"] == DIGITS_TRAIN
    got_pixels, got_labels = snapshot(cache)
    assert np.array_equal(got_pixels, pixels) and np.array_equal(got_labels, labels)  # as a fresh build
    assert os.listdir(tmp_path / "cache") == [os.path.basename(folder)]  # nothing left beside it
    log.clear()
    load_split(cfg, "train", log=log)  # and the rebuilt cache verifies
    assert not log and len(build_calls) == 2


def test_the_reasons_name_what_was_wrong(tmp_path):
    cfg = digits(tmp_path)
    expected = {truncate_at_batch_boundary: "bytes, expected", random_bytes_over_the_middle: "SHA-256",
                cache_json_garbage: "cache.json is unreadable", cache_json_deleted: "cache.json is missing",
                arrow_file_deleted: "decoded.arrow is missing", cache_json_rows_edited: "cache.json says 1024"}
    for damage, words in expected.items():
        folder, _ = build_and_release(cfg)
        damage(folder)
        log = Log()
        load_split(cfg, "train", log=log)
        assert words in log.damaged()[0], (damage.__name__, log)


def test_truncation_at_a_batch_boundary_would_otherwise_read_as_fewer_rows(tmp_path):
    """Guards the test above: the damage is the silent kind, a valid Arrow stream with fewer rows."""
    folder, _ = build_and_release(digits(tmp_path))
    truncate_at_batch_boundary(folder)
    table = data._open_table(str(arrow_file(folder)))
    assert 0 < table.num_rows < DIGITS_TRAIN


def test_a_clean_open_does_not_rewrite_anything(tmp_path, build_calls):
    cfg = digits(tmp_path)
    folder, _ = build_and_release(cfg)
    before = {p.name: p.stat().st_mtime_ns for p in Path(folder).iterdir()}
    log = Log()
    load_split(cfg, "train", log=log)
    assert not log and build_calls == [folder]
    assert {p.name: p.stat().st_mtime_ns for p in Path(folder).iterdir()} == before


def test_sampled_signature_above_the_full_hash_threshold(tmp_path, monkeypatch):
    """Files above FULL_HASH_BYTES (the real dataset) get sampled blocks hashed, unless their mtime moved."""
    monkeypatch.setattr(cache_files, "FULL_HASH_BYTES", 0)
    monkeypatch.setattr(cache_files, "SAMPLE_BLOCK", 4096)
    cfg = digits(tmp_path)

    # damage overlapping a sampled block, mtime kept: found by the sampled signature
    folder, (pixels, _) = build_and_release(cfg)
    path = arrow_file(folder)
    offsets = cache_files._sample_offsets(path.stat().st_size, 4096, cache_files.SAMPLE_BLOCKS)
    assert len(offsets) == cache_files.SAMPLE_BLOCKS and 64 * 4096 < path.stat().st_size  # really a sample
    overwrite(path, offsets[len(offsets) // 2] + 1000, 200, keep_mtime=True)
    log = Log()
    cache = load_split(cfg, "train", log=log)
    assert "sampled blocks" in log.damaged()[0]
    assert np.array_equal(snapshot(cache)[0], pixels)
    del cache
    gc.collect()

    # between sampled blocks (and clear of Arrow headers), written normally: the moved mtime asks for a full hash
    gap = next(o for o in offsets[len(offsets) // 2:] if not any(o - 8192 < end < o + 12288 for end in message_ends(path)))
    overwrite(path, gap + 4096 + 1000, 200, keep_mtime=False)
    log = Log()
    load_split(cfg, "train", log=log)
    assert "SHA-256" in log.damaged()[0] and "sampled blocks" not in log.damaged()[0]
    gc.collect()

    # the same with the mtime put back: the trade-off the sampling makes (cache_files.py), pinned here
    overwrite(path, gap + 4096 + 1000, 200, keep_mtime=True)
    log = Log()
    cache = load_split(cfg, "train", log=log)
    assert not log.damaged() and not np.array_equal(snapshot(cache)[0], pixels)


def test_a_rebuild_that_is_damaged_again_is_a_data_error_not_a_loop(tmp_path, build_calls, monkeypatch):
    original = cache_files.file_record

    def wrong_size(path, table):
        record = original(path, table)
        record["bytes"] += 1
        return record

    monkeypatch.setattr(cache_files, "file_record", wrong_size)
    with pytest.raises(DataError) as e:
        load_split(digits(tmp_path), "train", log=Log())
    message = str(e.value)
    assert "\n" not in message and "damaged right after it was built" in message and "bytes, expected" in message
    assert len(build_calls) == 1


class FakeAccelerator:
    """The part of Accelerate's Accelerator that load_split asks: who is the local main process."""

    def __init__(self, is_local_main_process: bool) -> None:
        self.is_local_main_process = is_local_main_process
        self.entered = 0

    @contextlib.contextmanager
    def local_main_process_first(self):
        self.entered += 1
        yield


def test_only_the_local_main_process_rebuilds(tmp_path, build_calls):
    cfg = digits(tmp_path)
    folder, _ = build_and_release(cfg)
    truncate_mid_batch(folder)
    size = arrow_file(folder).stat().st_size
    for kwargs in ({"local_main": False}, {"main_process_first": FakeAccelerator(False).local_main_process_first}):
        with pytest.raises(DataError) as e:
            load_split(cfg, "train", log=Log(), **kwargs)
        assert "\n" not in str(e.value) and "local main process had just verified it" in str(e.value)
        assert arrow_file(folder).stat().st_size == size and build_calls == [folder]  # left as found
    main = FakeAccelerator(True)
    cache = load_split(cfg, "train", main_process_first=main.local_main_process_first, log=Log())
    assert len(cache) == DIGITS_TRAIN and main.entered == 1 and build_calls == [folder, folder]


def test_accelerate_says_who_the_local_main_process_is():
    """load_split reads `is_local_main_process` off the owner of `local_main_process_first`."""
    import accelerate

    assert isinstance(getattr(accelerate.Accelerator, "is_local_main_process"), property)
    assert callable(accelerate.Accelerator.local_main_process_first)


# ---- temp folders of killed builds --------------------------------------------------------------------


def make_temp(path: Path, age_s: float = 0) -> Path:
    path.mkdir()
    (path / "decoded_00000_of_00002.arrow").write_bytes(b"\0" * 1000)
    if age_s:
        then = time.time() - age_s
        for p in (path / "decoded_00000_of_00002.arrow", path):
            os.utime(p, (then, then))
    return path


def test_next_build_sweeps_temp_folders_of_dead_builds_only(tmp_path):
    cfg = digits(tmp_path)
    folder, _ = build_and_release(cfg)
    Path(folder, "cache.json").unlink()  # the next open rebuilds: the sweep runs
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=60)
    live = subprocess.Popen(["sleep", "120"])
    try:
        machine = cache_files.machine_tag()
        removed = [make_temp(Path(f"{folder}.tmp-{dead.pid}")),  # named before temp folders had a machine
                   make_temp(Path(f"{folder}.tmp-{dead.pid}-{machine}")),
                   make_temp(Path(f"{folder}.tmp-{live.pid}-elsewhere-1"), age_s=2 * 24 * 3600)]
        kept = [make_temp(Path(f"{folder}.tmp-{os.getpid()}")),
                make_temp(Path(f"{folder}.tmp-{live.pid}")),
                make_temp(Path(f"{folder}.tmp-{live.pid}-{machine}")),
                make_temp(Path(f"{folder}.tmp-{dead.pid}-elsewhere-1")),  # another machine's, recent: maybe alive
                make_temp(tmp_path / "cache" / f"digits-valid-16px-0000000000000000.tmp-{dead.pid}")]  # not this folder's
        log = Log()
        cache = load_split(cfg, "train", log=log)
        assert len(cache) == DIGITS_TRAIN
        assert not any(p.exists() for p in removed) and all(p.exists() for p in kept)
        swept = [m for m in log if m.startswith("removed ")]
        assert len(swept) == 3 and all("partial decode cache left by a killed build" in m for m in swept)
        assert sorted(str(p) for p in removed) == sorted(m.split()[1].rstrip(",") for m in swept)
    finally:
        live.kill()
        live.wait(timeout=60)


def test_a_temp_folder_with_this_process_name_is_cleared_before_the_build(tmp_path):
    """Containers restart with the same pids: a temp folder named like ours is a dead process's."""
    cfg = digits(tmp_path)
    folder, _ = build_and_release(cfg)
    Path(folder, "cache.json").unlink()
    ours = make_temp(Path(cache_files.temp_folder(folder)))
    cache = load_split(cfg, "train", log=Log())
    assert len(cache) == DIGITS_TRAIN and not ours.exists()
    assert sorted(os.listdir(folder)) == sorted(["cache.json", *cache.meta["files"]])  # none of its files came along


# ---- decode workers die with their parent -------------------------------------------------------------

CHILD = """
import signal, sys
stop = []  # like preempt.StopFlag: the handlers only set a flag
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
    signal.signal(s, lambda signum, frame: stop.append(signum))
from tinydist.config import DataConfig
from tinydist.data.cache import load_split
load_split(DataConfig(source=sys.argv[1], cache_dir=sys.argv[2], image_size=32, num_proc=2), "train", log=print)
print("finished: the build was too quick for this test", flush=True)
"""
SIGTERM_BIT = 1 << (signal.SIGTERM - 1)


def slow_source(root: Path, images: int = 3000) -> str:
    """A tiny-imagenet-200 folder of `images` links to one 2048x2048 noise JPEG (~50 ms to decode):
    minutes of decoding on 2 processes, for ~2 MB on disk."""
    from PIL import Image

    wnid = "n01443537"
    folder = root / "train" / wnid / "images"
    folder.mkdir(parents=True)
    (root / "wnids.txt").write_text(wnid + "\n")
    noise = np.random.default_rng(0).integers(0, 256, (2048, 2048, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "noise.jpg", quality=85)
    for i in range(images):
        os.symlink(root / "noise.jpg", folder / f"{wnid}_{i}.JPEG")
    return str(root)


def children(pid: int) -> set[int]:
    found = set()
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            found |= {int(p) for p in path.read_text().split()}
    return found


def status(pid: int) -> dict[str, str]:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:  # gone
        return {}
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def running(pid: int) -> bool:
    """Alive and not a zombie (killed children wait as zombies until init reaps them)."""
    return status(pid).get("State", "Z").strip()[:1] not in ("Z", "X")


def catches_sigterm(pid: int) -> bool:
    return bool(int(status(pid).get("SigCgt", "0"), 16) & SIGTERM_BIT)


def wait_until(condition: Callable[[], bool], timeout_s: float, step_s: float = 0.1) -> bool:
    for _ in range(int(timeout_s / step_s) + 1):
        if condition():
            return True
        time.sleep(step_s)
    return condition()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux-only")
@pytest.mark.slow  # kills a real process tree
def test_decode_workers_take_default_sigterm_and_die_with_a_killed_parent(tmp_path):
    source = slow_source(tmp_path / "tiny-imagenet-200")
    out = open(tmp_path / "child.log", "w")
    parent = subprocess.Popen([sys.executable, "-c", CHILD, source, str(tmp_path / "cache")],
                              cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    workers: set[int] = set()
    try:
        # the pool's two workers, then the Manager that datasets starts beside them
        started = wait_until(lambda: len(children(parent.pid)) >= 3 or parent.poll() is not None, timeout_s=90)
        assert started and parent.poll() is None, (tmp_path / "child.log").read_text()[-2000:]
        workers = children(parent.pid)
        assert catches_sigterm(parent.pid)  # the parent keeps its flag-only handler: a clean stop later
        assert wait_until(lambda: not any(catches_sigterm(w) for w in workers if running(w)), timeout_s=5), \
            {w: status(w).get("SigCgt") for w in workers}
        assert all(running(w) for w in workers)  # still decoding when the parent dies

        parent.kill()
        parent.wait(timeout=60)
        assert wait_until(lambda: not any(running(w) for w in workers), timeout_s=20), \
            {w: status(w).get("State") for w in workers if running(w)}
    finally:
        for pid in [parent.pid, *workers]:  # whatever the outcome, leave no decoder running
            if running(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
            parent.wait(timeout=60)
        out.close()


def test_a_worker_not_forked_by_the_build_detaches_on_its_first_batch(monkeypatch):
    """spawn / forkserver workers: default handlers from their first batch on; the builder itself is untouched."""
    calls = []
    monkeypatch.setattr(cache_files, "_detach", lambda parent: calls.append(parent))
    cache_files.detach_worker(os.getpid())
    assert calls == []
    cache_files.detach_worker(os.getpid() + 1)
    assert calls == [None]


# ---- hub: unreachable is transient, "no" is a data error --------------------------------------------


def test_hub_unreachable_offline_is_transient():
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(TransientError) as e:
        open_source("zh-plus/tiny-imagenet", "train")
    message = str(e.value)
    assert not isinstance(e.value, ConfigError) and "\n" not in message
    assert "zh-plus/tiny-imagenet" in message and "set data.source to that folder" in message
    assert "--config configs/smoke.yaml" in message


def _hub_errors() -> dict[str, tuple[BaseException, type]]:
    try:  # huggingface_hub 2.x speaks httpx2; older ones httpx (or requests, without either: skip)
        import httpx2
    except ImportError:
        httpx2 = pytest.importorskip("httpx", reason="neither httpx2 nor httpx to build hub errors with")
    from datasets.exceptions import DataFilesNotFoundError, DatasetNotFoundError
    from huggingface_hub.errors import HfHubHTTPError

    def http(status: int) -> BaseException:
        request = httpx2.Request("GET", "https://huggingface.co/api/datasets/a/b")
        return HfHubHTTPError(f"{status} error", response=httpx2.Response(status, request=request))

    def raised_from(error: BaseException, cause: BaseException) -> BaseException:
        error.__cause__ = cause
        return error

    return {
        "offline": (ConnectionError("Couldn't reach 'a/b' on the Hub (OfflineModeIsEnabled)"), TransientError),
        "dns": (raised_from(OSError("download failed"), httpx2.ConnectError("[Errno -2] Name or service not known")),
                TransientError),
        "timeout": (httpx2.ReadTimeout("timed out"), TransientError),
        "hub down": (http(503), TransientError),
        "rate limited": (http(429), TransientError),
        "no such repo": (DatasetNotFoundError("Dataset 'a/b' doesn't exist on the Hub or cannot be accessed."), DataError),
        "gated": (raised_from(DatasetNotFoundError("Dataset 'a/b' is a gated dataset on the Hub."), http(401)), DataError),
        "no data files": (DataFilesNotFoundError("No (supported) data files found in a/b"), DataError),
        "a script, not a dataset": (RuntimeError("Dataset scripts are no longer supported, but found b.py"), DataError),
        "forbidden": (http(403), DataError),
    }


@pytest.mark.parametrize("case", ["offline", "dns", "timeout", "hub down", "rate limited", "no such repo", "gated",
                                  "no data files", "a script, not a dataset", "forbidden"])
def test_hub_errors_are_sorted_into_transient_and_data(monkeypatch, case):
    import datasets

    error, expected = _hub_errors()[case]

    def load_dataset(*args, **kwargs):
        raise error

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(expected) as e:
        open_source("a/b", "train")
    assert "\n" not in str(e.value) and "`a/b`" in str(e.value)
    assert isinstance(e.value, ConfigError) == (expected is DataError)
    # whatever the hub said, `a/b` may have been meant as a path: the same line says there is no such folder
    assert f"and no local folder {os.path.abspath('a/b')} exists; if you meant a local folder" in str(e.value)


def test_a_bug_under_load_dataset_is_not_called_a_data_or_network_problem(monkeypatch):
    import datasets

    def load_dataset(*args, **kwargs):
        raise KeyError("features")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(KeyError):
        open_source("a/b", "train")


@pytest.mark.parametrize("source", ["./no/such/dataset", "/no/such/dataset", "zh-plus/tiny-imagenet/extra", "not a hub id"])
def test_a_missing_local_path_stays_a_data_error(source):
    with pytest.raises(DataError) as e:
        open_source(source, "train")
    assert "no such folder" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow  # a fresh interpreter through the CLI
def test_cli_exits_transient_when_the_hub_is_unreachable(tmp_path):
    run = subprocess.run([sys.executable, "-m", "tinydist.data", "--data.source=zh-plus/tiny-imagenet",
                          f"--data.cache_dir={tmp_path}", "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == EXIT_TRANSIENT and run.stdout == ""
    error, note = run.stderr.splitlines()  # cli.run: the one error line, then what 69 means
    assert error.startswith("error: cannot reach the Hugging Face hub") and note.startswith("exit 69 (transient)")


# ---- a source that looks like a path but is no folder --------------------------------------------------


def test_owner_name_that_is_no_folder_offline_is_transient_and_says_no_such_folder(tmp_path, monkeypatch):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TransientError) as e:  # data/no-such-folder could be a hub id: the hub is asked
        open_source("data/no-such-folder", "train")
    message = str(e.value)
    assert "\n" not in message and message.startswith("cannot reach the Hugging Face hub for `data/no-such-folder` (")
    assert f"), and no local folder {tmp_path / 'data' / 'no-such-folder'} exists; if you meant a local folder, " \
           "correct the path; for the hub dataset, download it" in message
    assert cli.exit_code_for(e.value) == EXIT_TRANSIENT


@pytest.mark.parametrize("source", ["./data/no-such-folder", "../data/no-such-folder"])
def test_a_relative_path_that_is_no_folder_names_where_it_looked(tmp_path, monkeypatch, source):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    looked = os.path.normpath(tmp_path / "work" / source)
    with pytest.raises(DataError) as e:  # plainly a path: never the hub
        open_source(source, "train")
    assert str(e.value) == f"data.source `{source}`: no such folder (relative to {tmp_path / 'work'}): {looked}"
    assert cli.exit_code_for(e.value) == EXIT_CONFIG


def test_cli_owner_name_that_is_no_folder_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert data.main(["--data.source=data/no-such-folder", f"--data.cache_dir={tmp_path}"]) == EXIT_TRANSIENT
    out, err = capsys.readouterr()
    error, note = err.splitlines()
    assert out == "" and error.startswith("error: cannot reach the Hugging Face hub for `data/no-such-folder`")
    assert f"no local folder {tmp_path / 'data' / 'no-such-folder'} exists" in error
    assert note.startswith("exit 69 (transient)")

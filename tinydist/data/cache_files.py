"""Keeping the decode cache honest: verified on every open, cheaply; built in a temp folder that the
next build sweeps away if this one is killed; decoded by workers that die with their parent.

A cache folder holds Arrow files and `cache.json`. Nothing else guards the Arrow files: a file
truncated at a record-batch boundary reads as a smaller, valid dataset, garbage written over the
pixels reads as valid pixels. So `cache.json` records, per file, its exact size, its mtime, a
SHA-256 of the whole file, a SHA-256 of sampled blocks and its record-batch row counts, and every
open checks them (`check`). What an open costs, and what it catches:

- size, record-batch row counts, column types, labels in range: always (microseconds). Catches any
  truncation or extension, a damaged Arrow header, fewer rows.
- whole-file SHA-256 of every file when the files add up to at most FULL_HASH_BYTES (~1.8 GB/s
  with SHA-NI, so up to ~0.15 s), and of any file whose mtime differs from the recorded one
  (anything written through the filesystem since the build moves the mtime, so a rewrite is
  caught whatever the size; a copy that does not keep mtimes, unlike cp -p or rsync -a, is then
  hashed whole on every open).
- otherwise (Tiny ImageNet at 64 px is ~1.2 GB) SHA-256 of SAMPLE_BLOCKS blocks of SAMPLE_BLOCK
  bytes per file (first, last, evenly spaced between: 4 MiB read per file, milliseconds). This
  misses damage that avoids every sampled block *and* leaves size and mtime alone (a disk
  flipping bits under the filesystem, a tool that restores mtimes); it would then reach training
  as a few wrong images, the price of not reading 1.2 GB on every open of every rank.

A build reads its files back once to record them (about a second per GB, next to minutes of decoding).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import time
from typing import Any, Callable, Iterator, Optional

from tinydist.runtime.quote import first_line
from tinydist.runtime.host import machine_id, pid_alive

FULL_HASH_BYTES = 256 << 20
SAMPLE_BLOCK = 64 << 10
SAMPLE_BLOCKS = 64
STALE_AFTER_S = 24 * 3600  # a temp folder of another machine untouched this long is abandoned


class CacheMismatch(Exception):
    """The cache folder is not what its cache.json says; the message (one line) says how."""


# ---------------------------------------------------------------------------------------------
# Signatures


def _sample_offsets(size: int, block: int, count: int) -> list[int]:
    last = max(size - block, 0)
    return sorted({round(i * last / max(count - 1, 1)) for i in range(count)})


def _sha256(path: str, sample: Optional[tuple[int, int]] = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if sample is None:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        else:
            block, count = sample
            for offset in _sample_offsets(os.fstat(f.fileno()).st_size, block, count):
                f.seek(offset)
                digest.update(f.read(block))
    return digest.hexdigest()


def chunk_rows(table: Any) -> list[int]:
    return [len(chunk) for chunk in table.column("pixels").chunks]


def file_record(path: str, table: Any) -> dict[str, Any]:
    """What cache.json keeps of one Arrow file, `table` being that file opened."""
    stat = os.stat(path)
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": _sha256(path),
            "sampled": {"block": SAMPLE_BLOCK, "count": SAMPLE_BLOCKS,
                        "sha256": _sha256(path, (SAMPLE_BLOCK, SAMPLE_BLOCKS))},
            "chunks": chunk_rows(table)}


# ---------------------------------------------------------------------------------------------
# Verification


def check(folder: str, cache_format: int, open_table: Callable[[str], Any]) -> tuple[dict[str, Any], list[Any]]:
    """cache.json and the Arrow tables of `folder`, each checked against the other (see the module
    docstring), or CacheMismatch. `open_table(path)` memory-maps one Arrow file as a pyarrow Table."""
    import pyarrow as pa
    import pyarrow.compute as pc

    meta = _read_meta(folder, cache_format)
    side = meta["image_size"]
    pixels_type = pa.list_(pa.uint8(), side * side * 3)
    tables = []
    whole = sum(meta["arrow"][name]["bytes"] for name in meta["files"]) <= FULL_HASH_BYTES
    for name in meta["files"]:
        path, record = os.path.join(folder, name), meta["arrow"][name]
        _check_bytes(path, name, record, whole)
        try:
            table = open_table(path)
            table.validate()
        except (OSError, ValueError, TypeError, KeyError, pa.ArrowException) as e:  # pyarrow's words for "garbage"
            raise CacheMismatch(f"{name}: {type(e).__name__}: {first_line(e)}") from None
        if "label" not in table.schema.names or "pixels" not in table.schema.names \
                or table.schema.field("pixels").type != pixels_type:
            raise CacheMismatch(f"{name}: columns {dict(zip(table.schema.names, map(str, table.schema.types)))}, "
                                f"expected pixels {pixels_type} and label")
        rows = chunk_rows(table)
        if rows != record["chunks"]:
            raise CacheMismatch(f"{name}: {sum(rows)} rows in {len(rows)} record batches, expected "
                                f"{sum(record['chunks'])} in {len(record['chunks'])}")
        tables.append(table)
    total = sum(t.num_rows for t in tables)
    if total != meta["rows"]:
        raise CacheMismatch(f"{total} rows in the Arrow files, cache.json says {meta['rows']}")
    for table in tables:
        labels = table.column("label")
        low, high = pc.min(labels).as_py(), pc.max(labels).as_py()
        if len(labels) and (labels.null_count or low < 0 or high >= len(meta["classes"])):
            raise CacheMismatch(f"labels span {low}..{high}, expected 0..{len(meta['classes']) - 1}")
    return meta, tables


def _read_meta(folder: str, cache_format: int) -> dict[str, Any]:
    path = os.path.join(folder, "cache.json")
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CacheMismatch("cache.json is missing") from None
    except (OSError, ValueError) as e:  # ValueError: JSON or UTF-8 decoding
        raise CacheMismatch(f"cache.json is unreadable: {first_line(e)}") from None
    if not isinstance(meta, dict) or meta.get("format") != cache_format:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CacheMismatch(f"cache.json has format {found!r}, expected {cache_format}")
    if not isinstance(meta.get("arrow"), dict):  # written before caches were verified: nothing to check against
        raise CacheMismatch("cache.json has no file signatures (written by an older tinydist)")
    expected = {"rows": int, "image_size": int, "classes": list, "files": list}
    wrong = [key for key, kind in expected.items() if not isinstance(meta.get(key), kind)]
    if wrong or not meta["files"] or not all(isinstance(name, str) for name in meta["files"]) \
            or set(meta["files"]) != set(meta["arrow"]):
        raise CacheMismatch(f"cache.json's {', '.join(wrong) or 'files'} not as a build writes them")
    for name, record in meta["arrow"].items():
        if not _is_record(record):
            raise CacheMismatch(f"cache.json's record of {name} is incomplete")
    return meta


def _is_record(record: Any) -> bool:
    try:
        return (all(isinstance(record[key], int) for key in ("bytes", "mtime_ns"))
                and isinstance(record["sha256"], str) and isinstance(record["sampled"]["sha256"], str)
                and all(isinstance(record["sampled"][key], int) and record["sampled"][key] > 0 for key in ("block", "count"))
                and isinstance(record["chunks"], list) and all(isinstance(n, int) for n in record["chunks"]))
    except (KeyError, TypeError):
        return False


def _check_bytes(path: str, name: str, record: dict[str, Any], whole: bool) -> None:
    try:
        stat = os.stat(path)
        if stat.st_size != record["bytes"]:
            raise CacheMismatch(f"{name}: {stat.st_size} bytes, expected {record['bytes']}")
        if whole or stat.st_mtime_ns != record["mtime_ns"]:
            found, expected, how = _sha256(path), record["sha256"], "SHA-256"
        else:
            sample = record["sampled"]
            found = _sha256(path, (sample["block"], sample["count"]))
            expected, how = sample["sha256"], f"SHA-256 of {sample['count']} sampled blocks"
    except FileNotFoundError:
        raise CacheMismatch(f"{name} is missing") from None
    except OSError as e:
        raise CacheMismatch(f"{name} is unreadable: {first_line(e)}") from None
    if found != expected:
        raise CacheMismatch(f"{name}: {how} {found[:12]}..., expected {expected[:12]}...")


# ---------------------------------------------------------------------------------------------
# Temp folders: `{folder}.tmp-{pid}-{machine}`


def machine_tag() -> str:
    """This machine (host.machine_id: host, boot, pid namespace) as a file name may spell it: two
    containers sharing a cache volume, or one host before and after a reboot, must not judge each
    other's pids. At most ~120 characters (a Linux host name has at most 64)."""
    return re.sub(r"[^\w.-]+", "_", machine_id())


def temp_folder(folder: str) -> str:
    return f"{folder}.tmp-{os.getpid()}-{machine_tag()}"


def _last_touched(path: str) -> float:
    times = [os.stat(path).st_mtime]
    with os.scandir(path) as entries:
        times += [e.stat(follow_symlinks=False).st_mtime for e in entries]
    return max(times)


def remove_stale_temps(folder: str, log: Callable[[str], None]) -> list[str]:
    """Remove what builds of `folder` killed midway left: temp folders of processes that are gone on
    this machine, and those of other machines untouched for STALE_AFTER_S. Never a live process's."""
    parent, base = os.path.split(folder)
    pattern = re.compile(re.escape(base) + r"\.tmp-(\d+)(?:-(.+))?")
    here = machine_tag()
    removed = []
    try:
        names = os.listdir(parent or ".")
    except FileNotFoundError:
        return removed
    for name in names:
        m = pattern.fullmatch(name)
        if not m:
            continue
        path, pid, machine = os.path.join(parent, name), int(m.group(1)), m.group(2)
        try:
            if machine in (None, here):  # None: named before temp folders carried the machine
                if pid == os.getpid() or pid_alive(pid):
                    continue
                why = f"process {pid} is gone"
            else:
                age = time.time() - _last_touched(path)
                if age < STALE_AFTER_S:
                    continue
                why = f"untouched for {age / 3600:.0f} h"
        except FileNotFoundError:  # its owner finished (renamed it) or removed it meanwhile
            continue
        shutil.rmtree(path, ignore_errors=True)
        log(f"removed {path}, a partial decode cache left by a killed build ({why})")
        removed.append(path)
    return removed


def discard(folder: str) -> None:
    """Remove a damaged cache folder. Renamed away first, so that no process (of this node or of
    another sharing the filesystem) sees it half-deleted, and a kill during the removal leaves a
    temp folder for the next sweep rather than a damaged cache under the real name."""
    trash = temp_folder(folder)
    shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(folder, trash)
    except FileNotFoundError:  # someone else removed it first
        return
    shutil.rmtree(trash, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Decode workers
#
# `Dataset.map(num_proc>1)` forks pool workers and a Manager from a process whose SIGTERM, SIGINT
# and SIGUSR1 handlers only set a stop flag (runtime/preempt.py). Inherited, those handlers make the
# children ignore SIGTERM, and when the parent is killed with SIGKILL they decode on, orphaned
# (1.2 GB each). So every process forked during a build gets default handlers and asks the kernel
# for SIGTERM when its parent dies. The parent keeps its handlers: a SIGTERM during a long build
# still means "stop cleanly" once the cache is done (the workers survive it unless the whole
# process group is signalled).

PR_SET_PDEATHSIG = 1
_BUILDER_PID: Optional[int] = None  # set while this process runs a build's map
_DETACHED_PID: Optional[int] = None  # the process that has already run _detach


@contextlib.contextmanager
def forks_detached() -> Iterator[None]:
    """Every process forked inside this block is a decode child: see above."""
    global _BUILDER_PID
    _BUILDER_PID = os.getpid()
    try:
        yield
    finally:
        _BUILDER_PID = None


def detach_worker(builder: int) -> None:
    """For a worker that was not forked inside `forks_detached` (spawn or forkserver start methods):
    detach on its first batch. A no-op in the builder itself (num_proc=1) and after the first call."""
    if os.getpid() != builder:
        _detach(None)


def _detach(parent: Optional[int]) -> None:
    global _DETACHED_PID
    if _DETACHED_PID == os.getpid():
        return
    _DETACHED_PID = os.getpid()
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP):  # the stop signals but INT (below)
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        import ctypes

        # Sent when the *thread* that forked us exits: the one calling map, which outlives the pool.
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: no parent-death signal; the default handlers still help
        pass
    if parent is not None and os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _after_fork_in_child() -> None:
    # At fork rather than at the first batch: no window in which a worker ignores SIGTERM or
    # outlives its parent, and the Manager, which never runs a batch, is covered too.
    if _BUILDER_PID is not None:
        _detach(_BUILDER_PID)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

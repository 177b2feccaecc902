"""One checkpoint folder: its record (state.json) and the marker that commits it.

    {set}.safetensors.index.json + shards   one sharded set each (layout.py): model, optimizer, ema, ...
    part-{rank:05d}.json   the files each rank wrote, with checksums (bookkeeping for the commit)
    state.json             the record: the caller's state (a run's is state.TrainState) and the commit's
                           own fields: step, format, world_size, saved_at, versions, the optimizer's
                           JSON (type, param groups by parameter name, scalars), files (the file table)
    COMMITTED              sha256 of state.json; written last, so a folder without it does not exist

A checkpoint is input from storage that other people and programs can write: state.json is checked
against its marker and a schema (types, ranges, its step against its folder's name), and every file
against the table it holds (layout.Sealed).
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional

import safetensors
import torch

from tinydist.ckpt.layout import (DamagedCheckpointError, InvalidCheckpointError, Sealed, check_file_table,
                                  is_count, sha256, tensor_sets)
from tinydist.ckpt.storage import Storage

FORMAT = "tinydist-checkpoint/1"
MARKER = "COMMITTED"
STATE = "state.json"
STEP_DIR = re.compile(r"^step-(\d{8,})$")
# The commit's own fields of state.json; the caller's state may use none of them.
RESERVED = ("step", "format", "world_size", "saved_at", "versions", "optimizer", "files")


def step_folder(step: int) -> str:
    return f"step-{step:08d}"


def folder_step(name: str) -> Optional[int]:
    """The step of a step-N folder name (or a path ending in one); None for anything else."""
    m = STEP_DIR.match(name.rstrip("/").rpartition("/")[2])
    return int(m.group(1)) if m else None


def versions() -> dict[str, Optional[str]]:
    from tinydist import __version__

    return {"torch": torch.__version__, "safetensors": safetensors.__version__, "tinydist": __version__}


def validate_record(label: str, record: Any, folder: str) -> dict:
    """state.json's own fields: the format, its step (matching the folder), world size, file table."""
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise InvalidCheckpointError(f"{label}: {STATE} is not a {FORMAT} state; expected its `format`")
    expected = folder_step(folder)
    step = record.get("step")
    if not is_count(step) or expected is None or step != expected:
        raise InvalidCheckpointError(f"{label}: {STATE} says step {step!r}; expected the folder's own step "
                                     f"{expected if expected is not None else '?'} (edited by hand?)")
    world = record.get("world_size")
    if not is_count(world) or world < 1:
        raise InvalidCheckpointError(f"{label}: {STATE} world_size {world!r}; expected an int >= 1")
    check_file_table(label, record.get("files"), STATE)
    if "optimizer" in tensor_sets(record) and not isinstance(record.get("optimizer"), dict):
        raise InvalidCheckpointError(f"{label}: {STATE} has no optimizer section; expected a JSON object "
                                     "(the optimizer's type and param groups)")
    return record


def read_record(storage: Storage, folder: str) -> dict:
    """state.json of a committed checkpoint, checked against its marker and the schema."""
    label = f"checkpoint {storage.show(folder)}"
    try:
        marker = storage.read(f"{folder}/{MARKER}").decode(errors="replace").strip()
    except FileNotFoundError:
        raise DamagedCheckpointError(f"{label}: missing {MARKER} marker (save interrupted or still in "
                                     "flight); expected a committed checkpoint") from None
    try:
        data = storage.read(f"{folder}/{STATE}")
    except FileNotFoundError:
        raise DamagedCheckpointError(f"{label}: {STATE} is missing; expected it next to {MARKER}") from None
    if sha256(data) != marker:
        raise DamagedCheckpointError(f"{label}: checksum mismatch on file {STATE}; expected the one in {MARKER}")
    try:
        record = json.loads(data)
    except ValueError as e:
        raise InvalidCheckpointError(f"{label}: {STATE} is not JSON ({e}); expected a JSON object") from None
    return validate_record(label, record, folder)


def sealed(storage: Storage, folder: str, record: dict) -> Sealed:
    """The folder's files, read through the record's file table."""
    return Sealed(storage, folder, record["files"], STATE, f"checkpoint {storage.show(folder)}")


def check_committed(storage: Storage, folder: str) -> dict:
    """The cheap check of a committed folder, without downloading its tensors: marker, state.json
    (schema and checksum) and one listing that every file it names is there at its size. Bit rot
    inside a shard is found while loading, which reads (and hashes) every file once."""
    record = read_record(storage, folder)
    sealed(storage, folder, record).check_sizes()
    return record

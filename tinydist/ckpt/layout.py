"""The sharded safetensors layout, written and read here alone, for checkpoint sets and exported
models alike (Hugging Face's layout: any safetensors client loads it without tinydist).

    {set}.safetensors.index.json        {"metadata": {"total_size": N, ...}, "weight_map": {tensor: shard}}
    {set}-0000k-of-0000n.safetensors    at most max_shard_size each ({set}.safetensors when one is enough)

A folder is read against a file table, {name: {"sha256", "bytes"}}: a checkpoint's table is its
state.json (record.py, itself sealed by the COMMITTED marker); an export's is the `files` entry of its
index's metadata (the index is written last, after every file it lists). Every file is checked
against its size and sha256 as it is read, every name an index gives must stay inside the folder,
every tensor an index names must be in its shards. A failure is one `CheckpointError` line. No pickle.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

import safetensors
import safetensors.torch
import torch
from huggingface_hub import split_torch_state_dict_into_shards

from tinydist.ckpt.storage import Storage
from tinydist.runtime.exitcodes import PermanentError, one_line

INDEX_SUFFIX = ".safetensors.index.json"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
FileTable = dict[str, dict[str, Any]]  # file name -> {"sha256": 64 hex digits, "bytes": int}


class CheckpointError(PermanentError):
    """A checkpoint or an exported model is missing, corrupt, invalid or does not fit the model. One line."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


class DamagedCheckpointError(CheckpointError):
    """Storage-level damage: a missing, truncated or bit-flipped file, or no marker. The loader falls
    back to an older checkpoint; nobody chose this state."""


class InvalidCheckpointError(CheckpointError):
    """Sealed (every checksum matches) yet invalid: edited by hand or by another program. Unlike damage
    (a torn write, bit rot), which is skipped in favour of an older checkpoint, this is refused: falling
    back silently would hide the edit, or start a run from scratch over it."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_entry(parts: list[Any]) -> dict[str, Any]:
    """A file table entry for a file written as `parts` (bytes-like), hashed piece by piece: hashlib
    lets go of the GIL on large pieces, so a background writer does not stall the loop."""
    digest = hashlib.sha256()
    for piece in parts:
        digest.update(piece)
    return {"sha256": digest.hexdigest(), "bytes": sum(len(p) for p in parts)}


def index_name(prefix: str) -> str:
    return prefix + INDEX_SUFFIX


def tensor_sets(record: dict) -> list[str]:
    """The sharded sets whose index a checkpoint's record lists in `files` (e.g. ema, model, optimizer)."""
    return sorted(name[:-len(INDEX_SUFFIX)] for name in record.get("files", {}) if name.endswith(INDEX_SUFFIX))


def check_name(label: str, name: Any, source: str) -> None:
    # Names come from files someone else may have written: never let one point outside the folder.
    if not isinstance(name, str) or not name or name in (".", "..") or any(c in name for c in "/\\:\0"):
        raise InvalidCheckpointError(f"{label}: {source} names file {name!r} which leaves the folder; "
                                     "expected a plain file name such as model-00001-of-00005.safetensors")


# Checks of values read from JSON, shared by every reader of checkpoint JSON (bool is an int to Python).
def is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_file_table(label: str, files: Any, source: str) -> FileTable:
    """A file table as read from JSON: plain names, each with a sha256 and a byte count."""
    if not isinstance(files, dict) or not files:
        raise InvalidCheckpointError(f"{label}: {source} has no file table; expected `files`: "
                                     "{name: {'sha256': ..., 'bytes': ...}}")
    for name, meta in files.items():
        check_name(label, name, source)
        if not (isinstance(meta, dict) and is_count(meta.get("bytes"))
                and isinstance(meta.get("sha256"), str) and _SHA256.match(meta["sha256"])):
            raise InvalidCheckpointError(f"{label}: {source} entry for {name} is {meta!r}; "
                                         "expected {'sha256': 64 hex digits, 'bytes': int >= 0}")
    return files


# ---- writing ---------------------------------------------------------------------------------------

_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


def safetensors_parts(tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> list[Any]:
    """A safetensors file as a header plus one zero-copy view per tensor (contiguous CPU tensors), for
    writing and hashing piece by piece. `safetensors.torch.save` builds the whole file as one bytes
    object first: a second copy of every checkpoint, made holding the GIL, which stalls the loop's
    thread while a background save runs. The format: an 8-byte little-endian header length, the JSON
    header (names -> dtype, shape, byte offsets) padded with spaces to 8 bytes, then the data."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    views, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name]
        if t.device.type != "cpu" or not t.is_contiguous() or t.dtype not in _DTYPES:
            raise ValueError(f"tensor {name}: {t.dtype} on {t.device}; expected a contiguous CPU tensor")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        if size:
            views.append(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return [len(text).to_bytes(8, "little") + text, *views]


@dataclass(frozen=True)
class Plan:
    """How one set is split into shards: file names and their tensors, in file order."""
    prefix: str
    shards: list[tuple[str, list[str]]]
    weight_map: dict[str, str]
    total_size: int


def plan(prefix: str, tensors: dict[str, torch.Tensor], max_shard_size: int) -> Plan:
    split = split_torch_state_dict_into_shards(tensors, filename_pattern=prefix + "{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    return Plan(prefix, sorted((name, list(keys)) for name, keys in split.filename_to_tensors.items()),
                dict(sorted(split.tensor_to_filename.items())), split.metadata["total_size"])


def write_shards(layout: Plan, tensors: dict[str, torch.Tensor], write: Callable[[str, Any], None], *,
                 mine: Callable[[int], bool] = lambda i: True,
                 before_each: Callable[[], None] = lambda: None) -> FileTable:
    """Write the shards `mine(i)` selects (rank r of n writes i % n == r) through `write(name, parts)`;
    their file table. `before_each` may raise to stop between shards (a superseded save)."""
    files: FileTable = {}
    for i, (filename, keys) in enumerate(layout.shards):
        if not mine(i):
            continue
        before_each()
        parts = safetensors_parts({k: tensors[k] for k in keys}, metadata={"format": "pt"})
        files[filename] = file_entry(parts)
        write(filename, parts)
    return files


def index_bytes(layout: Plan, files: Optional[FileTable] = None) -> bytes:
    """The set's index; with `files`, the table a reader checks every file against (exports)."""
    metadata: dict[str, Any] = {"total_size": layout.total_size}
    if files is not None:
        metadata["files"] = dict(sorted(files.items()))
    return (json.dumps({"metadata": metadata, "weight_map": layout.weight_map}, indent=2, sort_keys=True)
            + "\n").encode()


# ---- reading ---------------------------------------------------------------------------------------

def parse_index(label: str, name: str, data: bytes) -> tuple[dict[str, str], dict[str, Any]]:
    """(weight map, metadata) of an index, every shard name inside the folder."""
    try:
        index = json.loads(data)
        mapping, metadata = index["weight_map"], index.get("metadata", {})
    except (ValueError, KeyError, TypeError, AttributeError):
        mapping, metadata = None, None
    if not isinstance(mapping, dict) or not all(isinstance(k, str) for k in mapping) \
            or not isinstance(metadata, dict):
        raise InvalidCheckpointError(f"{label}: {name} is malformed; expected the HF layout "
                                     "{'metadata': {...}, 'weight_map': {tensor: shard file}}")
    for shard in set(mapping.values()):
        check_name(label, shard, name)
    return mapping, metadata


@dataclass(frozen=True)
class Sealed:
    """A folder whose files are read only through its file table (see the module docstring)."""
    storage: Storage
    folder: str  # inside `storage`; "" for its root
    files: FileTable
    table: str  # what holds the table, for messages: state.json, or an export's index
    label: str  # how messages name the folder, e.g. "checkpoint s3://bucket/ck/step-00000004"

    def path(self, name: str) -> str:
        return f"{self.folder}/{name}" if self.folder else name

    def read(self, name: str) -> bytes:
        """One listed file, checked against its size and sha256."""
        check_name(self.label, name, self.table)
        if name not in self.files:
            raise CheckpointError(f"{self.label}: file {name} is not listed in {self.table}; "
                                  "expected a checksum for it")
        try:
            data = self.storage.read(self.path(name))
        except FileNotFoundError:
            raise DamagedCheckpointError(f"{self.label}: file {name} listed in {self.table} is missing; "
                                         "expected every listed file to be present") from None
        expected = self.files[name]
        if len(data) != expected["bytes"]:
            raise DamagedCheckpointError(f"{self.label}: size mismatch on file {name} ({len(data)} bytes); "
                                         f"expected {expected['bytes']} bytes (truncated?)")
        if sha256(data) != expected["sha256"]:
            raise DamagedCheckpointError(f"{self.label}: checksum mismatch on file {name}; "
                                         f"expected sha256 {expected['sha256']}")
        return data

    def check_sizes(self) -> None:
        """One listing: every listed file there at its size (no download; bit rot shows when read)."""
        sizes = self.storage.sizes(self.folder)
        for name, meta in self.files.items():
            if name not in sizes:
                raise DamagedCheckpointError(f"{self.label}: file {name} listed in {self.table} is missing; "
                                             "expected every listed file to be present")
            if sizes[name] != meta["bytes"]:
                raise DamagedCheckpointError(f"{self.label}: size mismatch on file {name} ({sizes[name]} bytes); "
                                             f"expected {meta['bytes']} bytes (truncated?)")

    def weight_map(self, prefix: str) -> dict[str, str]:
        """The set's verified index; every shard it names has an entry in the table."""
        name = index_name(prefix)
        mapping, _ = parse_index(self.label, name, self.read(name))
        self._check_listed(name, mapping)
        return mapping

    def _check_listed(self, name: str, mapping: dict[str, str]) -> None:
        for shard in set(mapping.values()):
            if shard not in self.files:
                raise InvalidCheckpointError(f"{self.label}: shard {shard} from {name} is not listed in "
                                             f"{self.table}; expected every shard to have a checksum")

    def tensors(self, prefix: str, mapping: Optional[dict[str, str]] = None) -> dict[str, torch.Tensor]:
        """Every tensor of one set, each shard verified as it is read. `mapping`: the set's weight map
        when the caller has read the index already (an export's index holds the table itself)."""
        if mapping is None:
            mapping = self.weight_map(prefix)
        else:
            self._check_listed(index_name(prefix), mapping)
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(mapping.values())):
            data = self.read(shard)
            try:
                tensors.update(safetensors.torch.load(data))
            except safetensors.SafetensorError as e:
                raise DamagedCheckpointError(f"{self.label}: {shard} is not a safetensors file ({e}); "
                                             "expected safetensors bytes") from None
        absent = sorted(k for k in mapping if k not in tensors)
        if absent:
            raise CheckpointError(f"{self.label}: tensors {absent[:3]} of {index_name(prefix)} are not in its "
                                  "shards; expected the index to match the shards")
        return tensors


def locate(path: str, storage: Optional[Storage] = None) -> tuple[Storage, str]:
    """A folder's path (URL or local; inside `storage` or anywhere) -> the storage of its parent and its
    name, so that the folder itself is read as one named thing (a checkpoint step-N, an export)."""
    parent, _, name = path.rstrip("/").rpartition("/")
    if storage is not None and path.rstrip("/") in (storage.show(name), storage.path(name)):
        return storage, name
    return Storage(parent or "."), name


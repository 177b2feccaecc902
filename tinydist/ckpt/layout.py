"""The on-disk format of one checkpoint folder, and the checks that make it safe to load.

    model.safetensors.index.json + model-0000k-of-0000n.safetensors      Hugging Face sharded layout
    optimizer.safetensors.index.json + optimizer-0000k-of-0000n...       state keyed "{param}.{key}"
    part-{rank:05d}.json   files written by each rank, with checksums (bookkeeping for the commit)
    state.json             caller's meta + step, format, world_size, versions, optimizer groups, files
    COMMITTED              sha256 of state.json; written last, so a folder without it does not exist

A checkpoint is input from storage that other people and programs can write: every name is
checked to stay inside the folder, every file against its size and sha256, state.json against a
schema (types, ranges, its step against its folder's name), and every optimizer tensor against the
parameter it belongs to. A failure is one `CheckpointError` line; nothing half-loaded. No pickle.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any, Optional

import safetensors
import safetensors.torch
import torch

from tinydist.runtime.exitcodes import PermanentError, one_line
from tinydist.ckpt.storage import Storage

FORMAT = "tinydist-checkpoint/1"
MARKER = "COMMITTED"
STATE = "state.json"
STEP_DIR = re.compile(r"^step-(\d{8,})$")
RESERVED = ("step", "format", "world_size", "saved_at", "versions", "optimizer", "files")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class CheckpointError(PermanentError):
    """A checkpoint is missing, corrupt, invalid or does not fit the model. Always one line."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


class DamagedCheckpointError(CheckpointError):
    """Storage-level damage: a missing, truncated or bit-flipped file, or no marker. The loader falls
    back to an older checkpoint; nobody chose this state."""


class InvalidCheckpointError(CheckpointError):
    """Sealed (every checksum matches) yet invalid: edited by hand or by another program. Unlike damage
    (a torn write, bit rot), which is skipped in favour of an older checkpoint, this is refused: falling
    back silently would hide the edit, or start a run from scratch over it."""


def step_folder(step: int) -> str:
    return f"step-{step:08d}"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_name(where: str, name: Any, source: str) -> None:
    # Names come from files someone else may have written: never let one point outside the folder.
    if not isinstance(name, str) or not name or name in (".", "..") or any(c in name for c in "/\\:\0"):
        raise InvalidCheckpointError(f"checkpoint {where}: {source} names file {name!r} which leaves the checkpoint folder; "
                              "expected a plain file name such as model-00001-of-00005.safetensors")


def versions() -> dict[str, Optional[str]]:
    from tinydist import __version__

    return {"torch": torch.__version__, "safetensors": safetensors.__version__, "tinydist": __version__}


def _jsonable(value: Any) -> Any:
    # lr and betas may hold 0-d tensors (capturable optimizers); JSON holds their value.
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value.item() if torch.is_tensor(value) else value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# ---- writing a safetensors file without copying it -------------------------------------------------

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


# ---- optimizer state <-> tensors + JSON ----------------------------------------------------------------

def flatten_optimizer(where: str, model: torch.nn.Module,
                      optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state as {"{param name}.{key}": tensor} plus JSON (type, groups by param name, scalars)."""
    names = {id(p): n for n, p in model.named_parameters()}
    tensors, groups, extra = {}, [], {}
    for group in optimizer.param_groups:
        group_names = []
        for p in group["params"]:
            if id(p) not in names:
                raise CheckpointError(f"checkpoint {where}: the optimizer holds a parameter that is not in "
                                      "model.named_parameters(); expected the (unwrapped) model it optimizes")
            pname = names[id(p)]
            group_names.append(pname)
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value):
                    tensors[f"{pname}.{key}"] = value
                else:
                    extra.setdefault(pname, {})[key] = _jsonable(value)
        groups.append({**{k: _jsonable(v) for k, v in group.items() if k != "params"}, "params": group_names})
    as_json = {"type": type(optimizer).__name__, "param_groups": groups, "extra_state": extra}
    try:  # a private copy, in JSON now: fail in the caller, not in a background thread
        return tensors, json.loads(json.dumps(as_json))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {where}: optimizer hyper-parameters or state are not JSON-serialisable "
                              f"({e}); expected numbers, bools, strings and tensors") from e


def _restore_group_value(where: str, index: int, key: str, live: Any, saved: Any) -> Any:
    """A saved hyper-parameter, checked against the live one's kind and turned back into its type."""
    bad = f"checkpoint {where}: optimizer param group {index} `{key}` = {saved!r} "
    if isinstance(live, bool) or live is None or isinstance(live, str):
        if type(saved) is not type(live):
            raise CheckpointError(bad + f"; expected {type(live).__name__} like the optimizer's {live!r}")
        return saved
    if isinstance(live, (tuple, list)):
        if not isinstance(saved, list) or len(saved) != len(live) or not all(map(_is_number, saved)):
            raise CheckpointError(bad + f"; expected {len(live)} finite numbers like {list(live)}")
        return tuple(saved) if isinstance(live, tuple) else saved
    if isinstance(live, (int, float)) or torch.is_tensor(live):
        if not _is_number(saved) or (key == "lr" and saved < 0):
            raise CheckpointError(bad + "; expected a finite number" + (" >= 0" if key == "lr" else ""))
        if torch.is_tensor(live):
            return torch.tensor(saved, dtype=live.dtype, device=live.device)
        return saved
    return saved


def unflatten_optimizer(where: str, saved: Any, tensors: dict[str, torch.Tensor], model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer) -> dict:
    """torch's optimizer state_dict for `optimizer`, from a checkpoint's JSON and tensors, every value
    checked: same type, same groups of the same parameters, each state tensor the shape of its
    parameter (a scalar only for `step`), floating point and finite-typed, hyper-parameters typed."""
    if not isinstance(saved, dict) or saved.get("type") != type(optimizer).__name__:
        kind = saved.get("type") if isinstance(saved, dict) else saved
        raise CheckpointError(f"checkpoint {where}: optimizer state was saved from {kind}; "
                              f"expected {type(optimizer).__name__} (the optimizer being loaded)")
    params = dict(model.named_parameters())
    names = {id(p): n for n, p in params.items()}
    current = [[names.get(id(p), "?") for p in g["params"]] for g in optimizer.param_groups]
    saved_groups = saved.get("param_groups")
    if not isinstance(saved_groups, list) or not all(isinstance(g, dict) for g in saved_groups) \
            or [g.get("params") for g in saved_groups] != current:
        sizes = [len(g.get("params") or []) for g in saved_groups] if isinstance(saved_groups, list) else None
        raise CheckpointError(
            f"checkpoint {where}: optimizer param groups differ (saved sizes {sizes}, optimizer has "
            f"{[len(g) for g in current]}); expected the same parameters in the same groups")
    number = {n: i for i, n in enumerate(n for group in current for n in group)}  # torch numbers params in order
    extra_state = saved.get("extra_state", {})
    if not isinstance(extra_state, dict) or not all(isinstance(v, dict) for v in extra_state.values()):
        raise CheckpointError(f"checkpoint {where}: optimizer extra_state is malformed; expected {{param: {{key: value}}}}")
    values = list(tensors.items())
    values += [(f"{p}.{k}", v) for p, extra in extra_state.items() for k, v in extra.items()]
    torch_state: dict[int, dict[str, Any]] = {}
    for full_key, value in values:
        pname, _, key = full_key.rpartition(".")  # state keys (exp_avg, step...) have no dots; names do
        if pname not in number:
            raise CheckpointError(f"checkpoint {where}: optimizer state {key!r} is for parameter {pname!r} which "
                                  "the optimizer does not have; expected state only for the optimizer's parameters")
        param = params[pname]
        if torch.is_tensor(value):
            scalar_step = key == "step" and value.dim() == 0
            if not scalar_step and (value.shape != param.shape or not value.dtype.is_floating_point):
                raise CheckpointError(f"checkpoint {where}: optimizer state {full_key} is {tuple(value.shape)} "
                                      f"{value.dtype}; expected {tuple(param.shape)} floating point like the parameter")
            if scalar_step and not (math.isfinite(value.item()) and value.item() >= 0):
                raise CheckpointError(f"checkpoint {where}: optimizer state {full_key} = {value.item()}; "
                                      "expected a step count >= 0")
        elif not (value is None or (key == "step" and _is_number(value) and value >= 0)):
            raise CheckpointError(f"checkpoint {where}: optimizer state {full_key} = {value!r}; "
                                  "expected a tensor (or a step count)")
        torch_state.setdefault(number[pname], {})[key] = value
    groups = []
    for index, (live, group) in enumerate(zip(optimizer.param_groups, saved_groups)):
        missing = sorted(set(live) - set(group) - {"params"})
        if missing:
            raise CheckpointError(f"checkpoint {where}: optimizer param group {index} lacks {missing}; "
                                  "expected every hyper-parameter of the optimizer")
        restored = {k: _restore_group_value(where, index, k, live.get(k), v)
                    for k, v in group.items() if k != "params"}
        groups.append({**restored, "params": [number[n] for n in group["params"]]})
    return {"state": torch_state, "param_groups": groups}


# ---- reading a committed folder ----------------------------------------------------------------------

def validate_state(where: str, state: Any, folder: str) -> dict:
    """state.json's own fields: the format, its step (matching the folder), the file table."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InvalidCheckpointError(f"checkpoint {where}: {STATE} is not a {FORMAT} state; expected its `format`")
    m = STEP_DIR.match(folder)
    step = state.get("step")
    if not _is_count(step) or m is None or step != int(m.group(1)):
        raise InvalidCheckpointError(f"checkpoint {where}: {STATE} says step {step!r}; expected the folder's own step "
                              f"{int(m.group(1)) if m else '?'} (edited by hand?)")
    if not isinstance(state.get("world_size"), int) or isinstance(state["world_size"], bool) or state["world_size"] < 1:
        raise InvalidCheckpointError(f"checkpoint {where}: {STATE} world_size {state.get('world_size')!r}; expected an int >= 1")
    files = state.get("files")
    if not isinstance(files, dict) or not files:
        raise InvalidCheckpointError(f"checkpoint {where}: {STATE} has no file table; expected `files`: {{name: ...}}")
    for name, meta in files.items():
        check_name(where, name, STATE)
        if not (isinstance(meta, dict) and _is_count(meta.get("bytes"))
                and isinstance(meta.get("sha256"), str) and _SHA256.match(meta["sha256"])):
            raise InvalidCheckpointError(f"checkpoint {where}: {STATE} entry for {name} is {meta!r}; "
                                  "expected {'sha256': 64 hex digits, 'bytes': int >= 0}")
    if not isinstance(state.get("optimizer"), dict):
        raise InvalidCheckpointError(f"checkpoint {where}: {STATE} has no optimizer section; expected a JSON object")
    return state


def read_state(storage: Storage, folder: str) -> dict:
    """state.json of a committed checkpoint, checked against its marker and the schema."""
    where = storage.show(folder)
    try:
        marker = storage.read(f"{folder}/{MARKER}").decode(errors="replace").strip()
    except FileNotFoundError:
        raise DamagedCheckpointError(f"checkpoint {where}: missing {MARKER} marker (save interrupted or still in "
                              "flight); expected a committed checkpoint") from None
    try:
        data = storage.read(f"{folder}/{STATE}")
    except FileNotFoundError:
        raise DamagedCheckpointError(f"checkpoint {where}: {STATE} is missing; expected it next to {MARKER}") from None
    if sha256(data) != marker:
        raise DamagedCheckpointError(f"checkpoint {where}: checksum mismatch on file {STATE}; expected the one in {MARKER}")
    try:
        state = json.loads(data)
    except ValueError as e:
        raise InvalidCheckpointError(f"checkpoint {where}: {STATE} is not JSON ({e}); expected a JSON object") from None
    return validate_state(where, state, folder)


def read_file(storage: Storage, folder: str, name: str, state: dict) -> bytes:
    """One file named in state.json, checked against its size and sha256."""
    where = storage.show(folder)
    check_name(where, name, STATE)
    if name not in state["files"]:
        raise CheckpointError(f"checkpoint {where}: file {name} is not listed in {STATE}; expected a checksum for it")
    try:
        data = storage.read(f"{folder}/{name}")
    except FileNotFoundError:
        raise DamagedCheckpointError(f"checkpoint {where}: file {name} listed in {STATE} is missing; "
                              "expected every listed file to be present") from None
    expected = state["files"][name]
    if len(data) != expected["bytes"]:
        raise DamagedCheckpointError(f"checkpoint {where}: size mismatch on file {name} ({len(data)} bytes); "
                              f"expected {expected['bytes']} bytes (truncated?)")
    if sha256(data) != expected["sha256"]:
        raise DamagedCheckpointError(f"checkpoint {where}: checksum mismatch on file {name}; "
                              f"expected sha256 {expected['sha256']}")
    return data


def weight_map(storage: Storage, folder: str, state: dict, prefix: str,
               cache: Optional[dict[str, bytes]] = None) -> dict[str, str]:
    """The verified HF index of one sharded set; every shard it names is a listed file in the folder."""
    where, index_name = storage.show(folder), f"{prefix}.safetensors.index.json"
    if index_name not in state["files"]:
        raise CheckpointError(f"checkpoint {where}: {index_name} is not listed in {STATE}; expected it in 'files'")
    data = cache[index_name] if cache and index_name in cache else read_file(storage, folder, index_name, state)
    try:
        mapping = json.loads(data)["weight_map"]
    except (ValueError, KeyError, TypeError):
        mapping = None
    if not isinstance(mapping, dict) or not all(isinstance(k, str) for k in mapping):
        raise InvalidCheckpointError(f"checkpoint {where}: {index_name} is malformed; "
                              "expected the HF layout {'metadata': ..., 'weight_map': {key: file}}")
    for shard in set(mapping.values()):
        check_name(where, shard, index_name)
        if shard not in state["files"]:
            raise InvalidCheckpointError(f"checkpoint {where}: shard {shard} from {index_name} is not listed in "
                                  f"{STATE}; expected every shard to have a checksum")
    return mapping


def load_tensors(storage: Storage, folder: str, state: dict, prefix: str,
                 cache: Optional[dict[str, bytes]] = None) -> dict[str, torch.Tensor]:
    """All tensors of one sharded set (model or optimizer); files verified as read (or taken from
    `cache`, bytes verified moments ago by `verify`)."""
    where, mapping = storage.show(folder), weight_map(storage, folder, state, prefix, cache)
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(mapping.values())):
        data = cache[shard] if cache and shard in cache else read_file(storage, folder, shard, state)
        try:
            tensors.update(safetensors.torch.load(data))
        except safetensors.SafetensorError as e:
            raise DamagedCheckpointError(f"checkpoint {where}: {shard} is not a safetensors file ({e}); "
                                  "expected safetensors bytes") from None
    absent = sorted(k for k in mapping if k not in tensors)
    if absent:
        raise CheckpointError(f"checkpoint {where}: tensors {absent[:3]} of the {prefix} index are not in its "
                              "shards; expected the index to match the shards")
    return tensors


def check_committed(storage: Storage, folder: str) -> dict:
    """The cheap check of a committed folder, without downloading its tensors: marker, state.json
    (schema and checksum) and one listing that every file it names is there at its size. Bit rot
    inside a shard is found while loading, which reads (and hashes) every file once."""
    state = read_state(storage, folder)
    sizes = storage.sizes(folder)
    for name, meta in state["files"].items():
        if name not in sizes:
            raise DamagedCheckpointError(f"checkpoint {storage.show(folder)}: file {name} listed in {STATE} is "
                                         "missing; expected every listed file to be present")
        if sizes[name] != meta["bytes"]:
            raise DamagedCheckpointError(f"checkpoint {storage.show(folder)}: size mismatch on file {name} "
                                         f"({sizes[name]} bytes); expected {meta['bytes']} bytes (truncated?)")
    return state


def tensor_sets(state: dict) -> list[str]:
    """The sharded sets a checkpoint holds: model, optimizer, and ema where it was kept."""
    return [p for p in ("model", "optimizer", "ema") if f"{p}.safetensors.index.json" in state["files"]]


def verify(storage: Storage, folder: str) -> tuple[dict, dict[str, bytes]]:
    """Everything a load checks at the storage level (marker, schema, indexes, sizes, sha256); returns
    the state and the verified bytes."""
    state = read_state(storage, folder)
    files = {name: read_file(storage, folder, name, state) for name in state["files"]}
    for prefix in tensor_sets(state):
        weight_map(storage, folder, state, prefix, files)
    return state, files

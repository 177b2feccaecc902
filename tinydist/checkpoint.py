"""Sharded safetensors checkpoints: atomic, asynchronous, on any fsspec URL, loadable on any world size.

Layout of ``{directory}/step-{N:08d}/`` (DESIGN principles 3, 4 and 6):

    model.safetensors.index.json + model-0000k-of-0000n.safetensors      Hugging Face sharded layout
    optimizer.safetensors.index.json + optimizer-0000k-of-0000n...       state keyed "{param}.{key}"
    part-{rank:05d}.json   files written by each rank, with checksums (bookkeeping for the commit)
    state.json             caller's meta + step, format, world_size, versions, optimizer groups, files
    COMMITTED              sha256 of state.json; written last, so a folder without it does not exist

No pickle anywhere: loading a checkpoint from shared storage can never execute code.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import threading
import time
from typing import Any, Callable

import fsspec
import safetensors
import safetensors.torch
import torch
from fsspec.implementations.local import LocalFileSystem
from huggingface_hub import split_torch_state_dict_into_shards

FORMAT = "tinydist-checkpoint/1"
MARKER = "COMMITTED"
STATE = "state.json"
DEFAULT_MAX_SHARD_SIZE = "10MB"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_RESERVED = ("step", "format", "world_size", "saved_at", "versions", "optimizer", "files")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class CheckpointError(Exception):
    """A checkpoint is missing, corrupt or does not fit the model. The message is always one line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


def parse_size(size: str | int) -> int:
    """'500KB', '10MB', '2GB', '1GiB' or a positive int -> bytes (KB/MB/GB are powers of 10, like the HF hub)."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size > 0:
            return size
    elif isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", size.upper())
        if m and float(m.group(1)) > 0:
            return int(float(m.group(1)) * _UNITS[m.group(2) or ""])
    raise ValueError(f"max_shard_size {size!r} is not a size; expected bytes > 0 or e.g. '500KB', '10MB', '2GB'")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_name(where: str, name: Any, source: str) -> None:
    # Names come from files someone else may have written: never let one point outside the folder.
    if not isinstance(name, str) or not name or name in (".", "..") or any(c in name for c in "/\\:\0"):
        raise CheckpointError(f"checkpoint {where}: {source} names file {name!r} which leaves the checkpoint folder; "
                              "expected a plain file name such as model-00001-of-00005.safetensors")


def _versions() -> dict[str, str | None]:
    try:
        from tinydist import __version__ as tinydist_version
    except ImportError:
        tinydist_version = None
    return {"torch": torch.__version__, "safetensors": safetensors.__version__, "tinydist": tinydist_version}


def _jsonable(value: Any) -> Any:
    # lr and betas may hold 0-d tensors (capturable optimizers); JSON holds their value.
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value.item() if torch.is_tensor(value) else value


class Checkpointer:
    """Save and load checkpoints under ``directory`` (a local path or fsspec URL: s3://, gs://, file://).

    Every rank builds one with its ``rank``/``world_size`` and calls ``save`` at the same step; rank r writes
    shards i with i % world_size == r, rank 0 commits once every rank's part file is in storage.
    ``storage_options`` go to fsspec (e.g. ``{"endpoint_url": ...}`` for an S3-compatible store).
    A save runs in a background thread: call ``wait()`` before the process exits.
    """

    def __init__(self, directory: str, *, keep_last: int, max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
                 rank: int = 0, world_size: int = 1, log: Callable[[str], None] = print,
                 commit_timeout_s: float = 1800.0, storage_options: dict[str, Any] | None = None) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last}; expected at least 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} with world_size={world_size}; expected 0 <= rank < world_size")
        self.directory = directory.rstrip("/")
        self.fs, self._root = fsspec.core.url_to_fs(self.directory, **(storage_options or {}))
        self._root = self._root.rstrip("/")
        self._local = isinstance(self.fs, LocalFileSystem)
        self.keep_last, self.max_shard_size = keep_last, parse_size(max_shard_size)
        self.rank, self.world_size, self.log, self.commit_timeout_s = rank, world_size, log, commit_timeout_s
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._host_buffers: dict[str, torch.Tensor] = {}

    # ---- paths -------------------------------------------------------------------------------------------
    def _url(self, name: str) -> str:
        return f"{self.directory}/{name}"

    def _folder(self, path: str) -> str:
        """Any user-facing checkpoint path -> the filesystem's own path."""
        return self.fs._strip_protocol(path).rstrip("/")

    def _step_folders(self) -> list[tuple[int, str]]:
        """(step, name) of every step-* folder, committed or not, oldest first."""
        self.fs.invalidate_cache(self._root)  # other ranks and processes write here: no stale listings
        try:
            entries = self.fs.ls(self._root, detail=False)
        except FileNotFoundError:
            return []
        found = [(m, e.rstrip("/").rsplit("/", 1)[-1]) for e in entries
                 if (m := _STEP_DIR.match(e.rstrip("/").rsplit("/", 1)[-1]))]
        return sorted((int(m.group(1)), name) for m, name in found)

    def _is_committed(self, name: str) -> bool:
        self.fs.invalidate_cache(f"{self._root}/{name}")
        return self.fs.exists(f"{self._root}/{name}/{MARKER}")

    # ---- writing -----------------------------------------------------------------------------------------
    def _write(self, path: str, data: bytes) -> None:
        """Write one file whole: temp + fsync + atomic rename locally, a single put on object stores."""
        if not self._local:
            self.fs.pipe_file(path, data)
            return
        tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(os.path.dirname(path), os.O_RDONLY)
        try:  # the rename itself must survive a power cut before the marker can claim it
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _to_host(self, tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
        """Copy to host memory now: training mutates these tensors in place as soon as save() returns.
        The buffers are reused from save to save (the previous save has finished by now): fresh ones
        would cost page faults on the CPU and pinned allocations on a GPU, inside the blocked time."""
        out, devices = {}, set()
        for key, t in tensors.items():
            t = t.detach()
            buf = self._host_buffers.get(prefix + key)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.device.type == "cuda")
                self._host_buffers[prefix + key] = buf
            out[key] = buf.copy_(t, non_blocking=t.device.type == "cuda")
            if t.device.type == "cuda":
                devices.add(t.device)
        for device in devices:
            torch.cuda.synchronize(device)
        return out

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             meta: dict, *, blocking: bool = False) -> None:
        """Snapshot model + optimizer to host memory, then write (and on rank 0 commit) in the background."""
        self.wait()
        name = f"step-{step:08d}"
        try:
            meta = json.loads(json.dumps(meta))  # a private copy; fails early on what JSON cannot hold
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {self._url(name)}: meta is not JSON-serialisable ({e}); "
                                  "expected a dict of str/int/float/bool/None/list/dict") from e
        clash = [k for k in _RESERVED if k in meta and not (k == "step" and meta[k] == step)]
        if clash:
            raise CheckpointError(f"checkpoint {self._url(name)}: meta uses reserved keys {clash}; "
                                  f"expected none of {list(_RESERVED)}")
        names = {id(p): n for n, p in model.named_parameters()}
        optim_tensors, groups, extra = {}, [], {}
        for group in optimizer.param_groups:
            group_names = []
            for p in group["params"]:
                if id(p) not in names:
                    raise CheckpointError(f"checkpoint {self._url(name)}: the optimizer holds a parameter that is not "
                                          "in model.named_parameters(); expected the (unwrapped) model it optimizes")
                pname = names[id(p)]
                group_names.append(pname)
                for key, value in optimizer.state.get(p, {}).items():
                    if torch.is_tensor(value):
                        optim_tensors[f"{pname}.{key}"] = value
                    else:
                        extra.setdefault(pname, {})[key] = _jsonable(value)
            groups.append({**{k: _jsonable(v) for k, v in group.items() if k != "params"}, "params": group_names})
        optim_json = {"type": type(optimizer).__name__, "param_groups": groups, "extra_state": extra}
        try:  # a private copy, in JSON now: fail here, in the caller, not in the thread
            optim_json = json.loads(json.dumps(optim_json))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {self._url(name)}: optimizer hyper-parameters or state are not "
                                  f"JSON-serialisable ({e}); expected numbers, bools, strings and tensors") from e
        model_host = self._to_host(model.state_dict(), "model/")
        optim_host = self._to_host(optim_tensors, "optimizer/")
        state = {**meta, "step": step, "format": FORMAT, "world_size": self.world_size,
                 "versions": _versions(), "optimizer": optim_json}
        self._error = None
        self._thread = threading.Thread(target=self._run, args=(name, model_host, optim_host, state),
                                        name=f"tinydist-checkpoint-{name}", daemon=True)
        self._thread.start()
        if blocking:
            self.wait()

    def wait(self) -> None:
        """Wait for the in-flight save (rank 0: including commit and cleanup); re-raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _run(self, name: str, model: dict, optim: dict, state: dict) -> None:
        try:
            self._write_and_commit(name, model, optim, state)
        except CheckpointError as e:
            self._error = e
        except Exception as e:  # noqa: BLE001 - storage errors of any fsspec backend; re-raised by wait()
            self._error = CheckpointError(f"checkpoint {self._url(name)}: save failed ({type(e).__name__}: {e}); "
                                          "expected to write every file; the previous checkpoint stays the newest")
            self._error.__cause__ = e

    def _write_and_commit(self, name: str, model: dict, optim: dict, state: dict) -> None:
        folder, t0 = f"{self._root}/{name}", time.monotonic()
        if self._is_committed(name):  # e.g. saved again right after a resume: never rewrite a good checkpoint
            if self.rank == 0:
                self.log(f"checkpoint {self._url(name)} is already committed; not saving it again")
            return
        if self._local:
            self.fs.makedirs(folder, exist_ok=True)
        part = f"part-{self.rank:05d}.json"
        if self.fs.exists(f"{folder}/{part}"):  # left by an interrupted attempt: must not pass for this one
            self.fs.rm(f"{folder}/{part}")
        files: dict[str, dict[str, Any]] = {}
        for prefix, tensors in (("model", model), ("optimizer", optim)):
            split = split_torch_state_dict_into_shards(tensors, filename_pattern=prefix + "{suffix}.safetensors",
                                                       max_shard_size=self.max_shard_size)
            for i, (filename, keys) in enumerate(sorted(split.filename_to_tensors.items())):
                if i % self.world_size == self.rank:
                    data = safetensors.torch.save({k: tensors[k] for k in keys}, metadata={"format": "pt"})
                    files[filename] = {"sha256": _sha256(data), "bytes": len(data)}
                    self._write(f"{folder}/{filename}", data)
            if self.rank == 0:
                index = {"metadata": {"total_size": split.metadata["total_size"]},
                         "weight_map": dict(sorted(split.tensor_to_filename.items()))}
                data = (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()
                files[f"{prefix}.safetensors.index.json"] = {"sha256": _sha256(data), "bytes": len(data)}
                self._write(f"{folder}/{prefix}.safetensors.index.json", data)
        part_data = {"step": state["step"], "world_size": self.world_size, "rank": self.rank, "files": files}
        self._write(f"{folder}/{part}", json.dumps(part_data, indent=2).encode())
        if self.rank != 0:
            return
        for other in self._wait_for_parts(name, state["step"]):
            files.update(other)
        state["saved_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        state["files"] = dict(sorted(files.items()))
        data = (json.dumps(state, indent=2) + "\n").encode()
        self._write(f"{folder}/{STATE}", data)
        self._write(f"{folder}/{MARKER}", (_sha256(data) + "\n").encode())
        size = sum(f["bytes"] for f in files.values()) / 1e6
        self.log(f"checkpoint {self._url(name)} committed: {len(files)} files, {size:.1f} MB, "
                 f"{time.monotonic() - t0:.1f} s after save()")
        self._cleanup()

    def _wait_for_parts(self, name: str, step: int) -> list[dict]:
        """Poll storage until every other rank's part file (and the files it lists) is there."""
        folder = f"{self._root}/{name}"
        wanted = {f"part-{r:05d}.json": r for r in range(1, self.world_size)}
        found: dict[str, dict] = {}
        deadline, delay = time.monotonic() + self.commit_timeout_s, 0.05
        while True:
            self.fs.invalidate_cache(folder)
            sizes = {e["name"].rsplit("/", 1)[-1]: e["size"] for e in self.fs.ls(folder, detail=True)}
            for part in (p for p in wanted if p in sizes and p not in found):
                try:
                    info = json.loads(self.fs.cat_file(f"{folder}/{part}"))
                except (FileNotFoundError, ValueError):
                    continue  # replaced or half-visible right now: look again next round
                # A part from an interrupted attempt (other step or world size) is ignored until replaced.
                ours = {k: info.get(k) for k in ("step", "world_size", "rank")} == {
                    "step": step, "world_size": self.world_size, "rank": wanted[part]}
                if ours and all(sizes.get(f) == meta["bytes"] for f, meta in info["files"].items()):
                    found[part] = info["files"]
            if len(found) == len(wanted):
                return list(found.values())
            if time.monotonic() > deadline:
                error = CheckpointError(
                    f"checkpoint {self._url(name)}: part files {sorted(set(wanted) - set(found))} did not appear "
                    f"within {self.commit_timeout_s:g} s; not committed (expected every rank to save this step)")
                self.log(str(error))
                raise error
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def _cleanup(self) -> None:
        """Drop committed checkpoints beyond keep_last and abandoned folders older than the newest commit."""
        folders = [(step, name, self._is_committed(name)) for step, name in self._step_folders()]
        committed = [name for _, name, ok in folders if ok]
        if not committed:
            return
        newest = max(step for step, _, ok in folders if ok)
        for step, name, ok in folders:
            # Never touch an uncommitted folder newer than the newest commit: it may be in flight.
            if (ok and name not in committed[-self.keep_last:]) or (not ok and step < newest):
                try:
                    if ok:  # marker first: a half-deleted checkpoint must never look committed
                        self.fs.rm(f"{self._root}/{name}/{MARKER}")
                    self.fs.rm(f"{self._root}/{name}", recursive=True)
                except OSError as e:
                    self.log(f"could not delete old checkpoint {self._url(name)}: {type(e).__name__}: {e}")

    # ---- finding and loading -----------------------------------------------------------------------------
    def committed(self) -> list[str]:
        """Committed checkpoint paths (folders with their marker), oldest first; checksums not checked."""
        return [self._url(name) for _, name in self._step_folders() if self._is_committed(name)]

    def latest(self) -> str | None:
        """Newest committed checkpoint whose files verify; every skipped one is logged with the reason."""
        for _, name in reversed(self._step_folders()):
            try:
                self._verify(self._url(name))
                return self._url(name)
            except CheckpointError as e:
                self.log(f"skipping {e}")
        return None

    def _read(self, path: str, folder: str, name: str, files: dict) -> bytes:
        """Read one file named in state.json and check its size and sha256."""
        _check_name(path, name, STATE)
        try:
            data = self.fs.cat_file(f"{folder}/{name}")
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {path}: file {name} listed in {STATE} is missing; "
                                  "expected every listed file to be present") from None
        expected = files[name]
        if len(data) != expected["bytes"]:
            raise CheckpointError(f"checkpoint {path}: size mismatch on file {name} ({len(data)} bytes); "
                                  f"expected {expected['bytes']} bytes (truncated?)")
        if _sha256(data) != expected["sha256"]:
            raise CheckpointError(f"checkpoint {path}: checksum mismatch on file {name}; "
                                  f"expected sha256 {expected['sha256']}")
        return data

    def _state(self, path: str) -> dict:
        """state.json of a committed checkpoint, checked against its marker."""
        folder = self._folder(path)
        self.fs.invalidate_cache(folder)
        try:
            marker = self.fs.cat_file(f"{folder}/{MARKER}").decode().strip()
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {path}: missing {MARKER} marker (save interrupted or still in "
                                  "flight); expected a committed checkpoint") from None
        try:
            data = self.fs.cat_file(f"{folder}/{STATE}")
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {path}: {STATE} is missing; expected it next to {MARKER}") from None
        if _sha256(data) != marker:
            raise CheckpointError(f"checkpoint {path}: checksum mismatch on file {STATE}; expected the one in {MARKER}")
        try:
            state = json.loads(data)
        except ValueError as e:
            raise CheckpointError(f"checkpoint {path}: {STATE} is not JSON ({e}); expected a JSON object") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("files"), dict):
            raise CheckpointError(f"checkpoint {path}: {STATE} is not a {FORMAT} state; expected its format and files")
        for name in state["files"]:
            _check_name(path, name, STATE)
        return state

    def _verify(self, path: str) -> dict:
        """Everything load() checks at the storage level: marker, state.json, indexes, sizes and sha256."""
        state, folder = self._state(path), self._folder(path)
        for prefix in ("model", "optimizer"):
            self._weight_map(path, state, prefix)
        for name in state["files"]:
            self._read(path, folder, name, state["files"])
        return state

    def _weight_map(self, path: str, state: dict, prefix: str) -> dict[str, str]:
        """The verified HF index of one sharded set; every shard it names is a listed file in the folder."""
        files, index_name = state["files"], f"{prefix}.safetensors.index.json"
        if index_name not in files:
            raise CheckpointError(f"checkpoint {path}: {index_name} is not listed in {STATE}; expected it in 'files'")
        try:
            weight_map = json.loads(self._read(path, self._folder(path), index_name, files))["weight_map"]
        except (ValueError, KeyError, TypeError):
            weight_map = None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"checkpoint {path}: {index_name} is malformed; "
                                  "expected the HF layout {'metadata': ..., 'weight_map': {key: file}}")
        for shard in set(weight_map.values()):
            _check_name(path, shard, index_name)
            if shard not in files:
                raise CheckpointError(f"checkpoint {path}: shard {shard} from {index_name} is not listed in "
                                      f"{STATE}; expected every shard to have a checksum")
        return weight_map

    def _load_tensors(self, path: str, state: dict, prefix: str) -> dict[str, torch.Tensor]:
        """All tensors of one sharded set (model or optimizer), every file verified as it is read."""
        folder, files, weight_map = self._folder(path), state["files"], self._weight_map(path, state, prefix)
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            try:
                loaded = safetensors.torch.load(self._read(path, folder, shard, files))
            except safetensors.SafetensorError as e:
                raise CheckpointError(f"checkpoint {path}: {shard} is not a safetensors file ({e}); "
                                      "expected safetensors bytes") from None
            tensors.update(loaded)
        absent = sorted(k for k in weight_map if k not in tensors)
        if absent:
            raise CheckpointError(f"checkpoint {path}: tensors {absent[:3]} of the {prefix} index are not in its "
                                  "shards; expected the index to match the shards")
        return tensors

    def load(self, path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
        """Verify ``path``, load it into ``model`` (strict) and ``optimizer``; return the saved state.json."""
        state = self._state(path)
        saved = self._load_tensors(path, state, "model")
        hint = "saved with another model.stem or number of classes?"
        expected = model.state_dict()
        missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
        if missing or unexpected:
            raise CheckpointError(f"checkpoint {path}: model tensors missing from the checkpoint {missing[:3]} "
                                  f"({len(missing)} in all), unexpected {unexpected[:3]} ({len(unexpected)} in all); "
                                  f"expected exactly the model's state_dict keys ({hint})")
        for key, want in expected.items():
            got = saved[key]
            if got.shape != want.shape or got.dtype != want.dtype:
                raise CheckpointError(f"checkpoint {path}: tensor {key} has shape {tuple(got.shape)} {got.dtype} in "
                                      f"the checkpoint but the model expects {tuple(want.shape)} {want.dtype}; {hint}")
        # Everything is validated before anything is touched: a failed load leaves model and optimizer as they were.
        optimizer_state = None if optimizer is None else self._optimizer_state(path, state, optimizer, model)
        model.load_state_dict(saved, strict=True)  # copies into the model's tensors, whatever their device
        if optimizer is not None:
            optimizer.load_state_dict(optimizer_state)  # casts to each param's device (and dtype, except step)
        return state

    def _optimizer_state(self, path: str, state: dict, optimizer: torch.optim.Optimizer,
                         model: torch.nn.Module) -> dict:
        """The checkpoint's optimizer state in torch's own state_dict format, for this optimizer's params."""
        saved = state.get("optimizer") or {}
        if saved.get("type") != type(optimizer).__name__:
            raise CheckpointError(f"checkpoint {path}: optimizer state was saved from {saved.get('type')}; "
                                  f"expected {type(optimizer).__name__} (the optimizer being loaded)")
        names = {id(p): n for n, p in model.named_parameters()}
        current = [[names.get(id(p), "?") for p in g["params"]] for g in optimizer.param_groups]
        saved_groups = saved["param_groups"]
        if [g["params"] for g in saved_groups] != current:
            raise CheckpointError(
                f"checkpoint {path}: optimizer param groups differ (saved {len(saved_groups)} groups of sizes "
                f"{[len(g['params']) for g in saved_groups]}, optimizer has {len(current)} of sizes "
                f"{[len(g) for g in current]}); expected the same parameters in the same groups")
        number = {n: i for i, n in enumerate(n for group in current for n in group)}  # torch numbers params in order
        values = list(self._load_tensors(path, state, "optimizer").items())
        values += [(f"{p}.{k}", v) for p, extra in saved.get("extra_state", {}).items() for k, v in extra.items()]
        torch_state: dict[int, dict[str, Any]] = {}
        for full_key, value in values:
            pname, _, key = full_key.rpartition(".")  # state keys (exp_avg, step...) have no dots; names do
            if pname not in number:
                raise CheckpointError(f"checkpoint {path}: optimizer state {key!r} is for parameter {pname!r} which "
                                      "the optimizer does not have; expected state only for the optimizer's parameters")
            torch_state.setdefault(number[pname], {})[key] = value
        groups = []
        for live, group in zip(optimizer.param_groups, saved_groups):
            restored = {}
            for k, v in group.items():  # JSON turned tuples (betas) into lists and tensor lrs into floats
                old = live.get(k)
                if isinstance(old, tuple) and isinstance(v, list):
                    v = tuple(v)
                elif torch.is_tensor(old) and not torch.is_tensor(v):
                    v = torch.tensor(v, dtype=old.dtype, device=old.device)
                restored[k] = v
            groups.append({**restored, "params": [number[n] for n in group["params"]]})
        return {"state": torch_state, "param_groups": groups}

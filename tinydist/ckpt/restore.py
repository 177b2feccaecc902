"""Which checkpoint a run resumes from, and whether it may: the state first, then the tensors.

`restore` finds the checkpoint `checkpoint.resume` names (`auto`: the newest that verifies, falling
back past damaged ones), reads its TrainState (state.py) from state.json and checks it — the
settings a resume cannot change (ConfigError), counters that hold together (InvalidCheckpointError)
— and only then reads the tensor sets into the run's model, optimizer and EMA (Checkpointer.load:
every file verified, every set checked before any is touched). docs/design.md, "One checkpoint".

`load_resume_point`, `check_resume_state` and `config_changes` are the older calls, which load the
tensors first and check the state after; they stay until train.py calls `restore`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from tinydist import config as config_lib
from tinydist.ckpt.checkpointer import Checkpointer
from tinydist.ckpt.layout import tensor_sets
from tinydist.ckpt.state import TrainState, config_changes
from tinydist.config import Config, ConfigError

# config_changes lives with TrainState; train.py imports it from here.
__all__ = ["Restored", "restore", "state_check", "load_resume_point", "check_resume_state", "config_changes"]


@dataclass(frozen=True)
class Restored:
    path: str  # the checkpoint resumed from
    state: TrainState
    record: dict  # its state.json as read: world_size, versions, saved_at, files...
    changes: list[str]  # one line per setting the config changes, in effect from state.step on
    sets: list[str]  # the tensor sets it held: without "ema", the EMA given was left as it was

    @property
    def step(self) -> int:
        return self.state.step


def state_check(cfg: Config, dataset_size: int,
                found: Optional[dict[str, Restored]] = None) -> Callable[[str, dict], None]:
    """`check(path, record)`: a checkpoint's state read and checked against `cfg` and the data
    (`dataset_size` images) — what a resume cannot change (ConfigError), counters that hold together
    (InvalidCheckpointError) — with no tensor read; what passes is recorded in `found`."""
    def check(path: str, record: dict) -> None:
        state = TrainState.from_record(path, record)
        changes = state.config_changes(path, cfg)  # refuses what a resume cannot change
        state.check(path, dataset_size)
        if found is not None:
            found[path] = Restored(path, state, record, changes, tensor_sets(record))
    return check


def restore(cfg: Config, checkpointer: Checkpointer, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            ema: Optional[torch.nn.Module] = None, dataset_size: int, path: Optional[str] = None) -> Optional[Restored]:
    """Resume what checkpoint.resume names (or `path`, a checkpoint the caller chose: the local tier's)
    into model, optimizer and ema, or None to start fresh. The state is read and checked against `cfg`
    and the data (`dataset_size` images) before any tensor is."""
    found: dict[str, Restored] = {}
    check = state_check(cfg, dataset_size, found)
    sets = {"model": model, "optimizer": optimizer, "ema": ema}
    resume = cfg.checkpoint.resume if path is None else path
    if resume == "never":
        _refuse_to_overwrite(cfg, checkpointer)
        return None
    if resume == "auto":
        loaded = checkpointer.load_latest(sets=sets, check=check)
        return None if loaded is None else found[loaded[0]]
    record = checkpointer.read_record(resume)
    check(resume, record)
    checkpointer.load(resume, sets=sets, record=record)
    return found[resume]


def _refuse_to_overwrite(cfg: Config, checkpointer: Checkpointer) -> None:
    existing = checkpointer.committed()
    if existing:
        raise ConfigError(f"checkpoint.resume=never but {config_lib.checkpoint_dir(cfg)} already holds "
                          f"{len(existing)} committed checkpoints (newest {existing[-1]}); they would be "
                          "overwritten: start fresh with another checkpoint.dir (e.g. "
                          f"--checkpoint.dir={config_lib.checkpoint_dir(cfg).rstrip('/')}-new), or continue "
                          "them with checkpoint.resume=auto")


# ---- the older calls (train.py today) ------------------------------------------------------------------

def load_resume_point(cfg: Config, checkpointer: Checkpointer, model: torch.nn.Module,
                      optimizer: torch.optim.Optimizer, ema: Optional[torch.nn.Module] = None) -> Optional[tuple[str, dict]]:
    """Load what checkpoint.resume names into model, optimizer and ema: (path, state.json), or None to
    start fresh; the caller checks the state afterwards (config_changes, check_resume_state). Prefer
    `restore`, which checks it first."""
    resume = cfg.checkpoint.resume
    if resume == "auto":
        return checkpointer.load_latest(model, optimizer, ema)
    if resume == "never":
        _refuse_to_overwrite(cfg, checkpointer)
        return None
    return resume, checkpointer.load(resume, model, optimizer, ema)


def check_resume_state(path: str, meta: dict, cfg: Config, dataset_size: int) -> int:
    """The step to resume at, after checking the loop's fields of state.json (TrainState: one line)."""
    state = TrainState.from_record(path, meta)
    state.check(path, dataset_size)
    return state.step

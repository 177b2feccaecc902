"""Which checkpoint a run resumes from, and whether what it says can be trusted.

ckpt_format.py checks what any checkpoint holds (files, checksums, tensors, optimizer state); here
the training loop's own fields of state.json are checked against the run being resumed: counters
that agree with each other, the schedule's state, and the settings a resume cannot change.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from tinydist import config as config_lib
from tinydist.checkpoint import Checkpointer, CheckpointError
from tinydist.config import Config, ConfigError


def resume_path(cfg: Config, checkpointer: Checkpointer) -> Optional[str]:
    resume = cfg.checkpoint.resume
    if resume == "auto":
        return checkpointer.latest()
    if resume == "never":
        existing = checkpointer.committed()
        if existing:
            raise ConfigError(f"checkpoint.resume=never but {config_lib.checkpoint_dir(cfg)} already holds "
                              f"{len(existing)} committed checkpoints (newest {existing[-1]}); they would be "
                              "overwritten: choose another checkpoint.dir, delete them, or use checkpoint.resume=auto")
        return None
    return resume


def _same_kind(fresh: Any, saved: Any) -> bool:
    if isinstance(fresh, bool) or fresh is None or isinstance(fresh, str):
        return type(saved) is type(fresh)
    if isinstance(fresh, (int, float)):
        return isinstance(saved, (int, float)) and not isinstance(saved, bool) and math.isfinite(saved)
    if isinstance(fresh, (list, tuple)):
        return isinstance(saved, list) and len(saved) == len(fresh) and all(map(_same_kind, fresh, saved))
    if isinstance(fresh, dict):
        return isinstance(saved, dict) and set(saved) == set(fresh) and all(
            _same_kind(fresh[k], saved[k]) for k in fresh)
    return True  # anything else the schedule keeps is not ours to judge


def check_resume_state(path: str, meta: dict, cfg: Config, schedule: Any, dataset_size: int) -> int:
    """The step to resume at, after checking the loop's fields of state.json; CheckpointError (one line)
    for a checkpoint whose fields do not hold together, ConfigError for one this config cannot continue."""
    def bad(what: str, expected: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path}: {what}; expected {expected} (edited, or not written by tinydist?)")

    step, batch = meta["step"], meta.get("global_batch_size")
    saved_cfg = meta.get("config")
    if not isinstance(saved_cfg, dict) or not isinstance(saved_cfg.get("train"), dict):
        raise bad("state.json has no `config.train` section", "the run's config")
    saved_train = saved_cfg["train"]
    if not (isinstance(batch, int) and not isinstance(batch, bool) and batch > 0) or batch != saved_train.get(
            "global_batch_size"):
        raise bad(f"global_batch_size {batch!r} (config says {saved_train.get('global_batch_size')!r})",
                  "one positive integer in both places")
    if batch != cfg.train.global_batch_size or saved_train.get("seed") != cfg.train.seed:
        raise ConfigError(f"{path} was trained with train.global_batch_size={batch} and train.seed="
                          f"{saved_train.get('seed')}; this run has {cfg.train.global_batch_size} and "
                          f"{cfg.train.seed}, and a resume must keep both: pass the saved values, or start a new run "
                          "in another checkpoint.dir")
    if meta.get("samples") != step * batch:
        raise bad(f"samples {meta.get('samples')!r} at step {step}", f"step x global batch = {step * batch}")
    epoch = meta.get("epoch")
    if not (isinstance(epoch, (int, float)) and not isinstance(epoch, bool)
            and math.isclose(epoch, step * batch / dataset_size, rel_tol=1e-9, abs_tol=1e-9)):
        raise bad(f"epoch {epoch!r} at step {step}", f"{step * batch / dataset_size:.6g} for {dataset_size} images")
    saved_epochs, saved_max = saved_train.get("epochs"), saved_train.get("max_steps")
    if isinstance(saved_epochs, (int, float)) and not isinstance(saved_epochs, bool) and math.isfinite(saved_epochs):
        limit = math.ceil(saved_epochs * dataset_size / batch)
        if isinstance(saved_max, int) and not isinstance(saved_max, bool) and saved_max > 0:
            limit = min(limit, saved_max)
        if step > limit:
            raise bad(f"step {step}", f"at most the {limit} steps its own config trains")
    if not isinstance(meta.get("wandb_run_id"), (str, type(None))):
        raise bad(f"wandb_run_id {meta.get('wandb_run_id')!r}", "a string or null")
    saved_schedule, fresh = meta.get("schedule"), schedule.state_dict()
    if not _same_kind(fresh, saved_schedule) or saved_schedule.get("last_epoch") != step:
        last = saved_schedule.get("last_epoch") if isinstance(saved_schedule, dict) else saved_schedule
        raise bad(f"learning-rate schedule state (last_epoch {last!r}) does not fit this schedule at step {step}",
                  f"the keys and types of {type(schedule).__name__} with last_epoch = {step}")
    schedule.load_state_dict(saved_schedule)
    if not all(math.isfinite(lr) and lr >= 0 for lr in schedule.get_last_lr()):
        raise bad(f"learning rates {schedule.get_last_lr()}", "finite rates >= 0")
    return step

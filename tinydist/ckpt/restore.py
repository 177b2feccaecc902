"""Which checkpoint a run resumes from, and whether what it says can be trusted.

ckpt_format.py checks what any checkpoint holds (files, checksums, tensors, optimizer state); here
the training loop's own fields of state.json are checked against the run being resumed: counters
that agree with each other, and the settings a resume cannot change. (The learning rate is a
function of the step, optim.lr_at: nothing of it is saved.)
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from tinydist import config as config_lib
from tinydist.ckpt.checkpointer import Checkpointer, CheckpointError
from tinydist.config import Config, ConfigError


def load_resume_point(cfg: Config, checkpointer: Checkpointer, model: torch.nn.Module,
                      optimizer: torch.optim.Optimizer, ema: Optional[torch.nn.Module] = None) -> Optional[tuple[str, dict]]:
    """Load what checkpoint.resume names into model, optimizer and ema: (path, state.json), or None to
    start fresh. `auto` takes the newest checkpoint that verifies as it is read, falling back past
    damaged ones; an explicit path must verify itself."""
    resume = cfg.checkpoint.resume
    if resume == "auto":
        return checkpointer.load_latest(model, optimizer, ema)
    if resume == "never":
        existing = checkpointer.committed()
        if existing:
            raise ConfigError(f"checkpoint.resume=never but {config_lib.checkpoint_dir(cfg)} already holds "
                              f"{len(existing)} committed checkpoints (newest {existing[-1]}); they would be "
                              "overwritten: start fresh with another checkpoint.dir (e.g. "
                              f"--checkpoint.dir={config_lib.checkpoint_dir(cfg).rstrip('/')}-new), or continue "
                              "them with checkpoint.resume=auto")
        return None
    return resume, checkpointer.load(resume, model, optimizer, ema)


def check_resume_state(path: str, meta: dict, cfg: Config, dataset_size: int) -> int:
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
    return step


# Settings a resume cannot change: they define which samples each step sees, or the model and
# optimizer the saved tensors belong to. Everything else (learning rate, epochs, warmup, logging,
# evaluation and save cadence, storage, timeouts...) applies from the resume step on.
FIXED = ("train.global_batch_size", "train.seed", "data.source", "data.train_split", "data.image_size",
         "data.max_train_samples", "model.stem", "model.extra_fc", "optim.name", "optim.schedule")


def _flat(values: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def config_changes(path: str, saved_config: dict, cfg: Config) -> list[str]:
    """One line per setting that differs from the checkpoint's; ConfigError (one line, with a way forward
    that works) for a setting that a resume cannot change."""
    saved, now = _flat(saved_config), _flat(config_lib.to_dict(cfg))
    changed = [(k, saved.get(k), now[k]) for k in now if k in saved and saved[k] != now[k]]
    for key, old, new in changed:
        if key in FIXED:
            raise ConfigError(f"{key}={new!r} but {path} was trained with {key}={old!r}, which a resume cannot "
                              f"change; pass --{key}={old!r} to continue that run, or start a new run in another "
                              f"checkpoint.dir (e.g. --checkpoint.dir={config_lib.checkpoint_dir(cfg).rstrip('/')}-new)")
    return [f"{key}: {old!r} -> {new!r}" for key, old, new in changed]

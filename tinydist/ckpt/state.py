"""A run's state in a checkpoint besides its tensors: `TrainState`, its JSON and its checks.

The training loop builds one at each save and gets one back on restore; its fields sit at the top
level of state.json next to the commit's own (record.py), as they always have. Reading one checks
its types; `check` then asks whether its counters hold together, and `config_changes` whether the
run being resumed may continue it. (The learning rate is a function of the step, optim.lr_at:
nothing of it is saved.)
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from tinydist import config as config_lib
from tinydist.ckpt.layout import InvalidCheckpointError, is_count, is_number
from tinydist.config import Config, ConfigError

# Settings a resume cannot change: they define which samples each step sees, or the model and
# optimizer the saved tensors belong to. Everything else (learning rate, epochs, warmup, logging,
# evaluation and save cadence, storage, timeouts...) applies from the resume step on.
FIXED = ("train.global_batch_size", "train.seed", "data.source", "data.train_split", "data.image_size",
         "data.max_train_samples", "model.stem", "model.extra_fc", "optim.name", "optim.schedule")


@dataclass(frozen=True)
class TrainState:
    step: int  # optimizer steps taken
    epoch: float  # samples / dataset size
    samples: int  # step x global batch
    global_batch_size: int
    config: dict[str, Any]  # the run's resolved config (config.to_dict)
    device: Optional[str] = None  # what it was saved from, for the resume line
    wandb_run_id: Optional[str] = None  # the tracker run a resume continues
    metrics: dict[str, Optional[float]] = field(default_factory=dict)  # validation at this step ({}: none)
    run_id: Optional[str] = None  # the run's identity (tiers.run_identity): a local-tier checkpoint must carry ours

    def to_json(self) -> dict[str, Any]:
        """The fields as strict JSON (no NaN; a private copy): fails in the caller, not in a thread."""
        try:
            fields = dataclasses.asdict(self)
            if fields["run_id"] is None:  # a run without a local tier writes state.json as it always did
                del fields["run_id"]
            return json.loads(json.dumps(fields, allow_nan=False))
        except (TypeError, ValueError) as e:
            raise ValueError(f"TrainState at step {self.step} is not strict JSON ({e}); expected numbers, "
                             "strings, lists and dicts, metrics finite or None (divergence.finite_or_none)") from e

    @classmethod
    def from_record(cls, where: str, record: dict[str, Any]) -> "TrainState":
        """The state recorded in a checkpoint's state.json, every field type-checked (InvalidCheckpointError,
        one line). `device`, `wandb_run_id`, `metrics` and `run_id` may be absent (older checkpoints)."""
        def bad(what: str, expected: str) -> InvalidCheckpointError:
            return InvalidCheckpointError(f"checkpoint {where}: {what}; expected {expected} "
                                          "(edited, or not written by tinydist?)")

        config = record.get("config")
        if not isinstance(config, dict) or not isinstance(config.get("train"), dict):
            raise bad("state.json has no `config.train` section", "the run's config")
        step, batch = record.get("step"), record.get("global_batch_size")
        if not is_count(step):
            raise bad(f"step {step!r}", "an int >= 0")
        if not (is_count(batch) and batch > 0):
            raise bad(f"global_batch_size {batch!r}", "a positive integer")
        if not is_count(record.get("samples")):
            raise bad(f"samples {record.get('samples')!r} at step {step}", "an int >= 0")
        if not (is_number(record.get("epoch")) and record["epoch"] >= 0):
            raise bad(f"epoch {record.get('epoch')!r} at step {step}", "a finite number >= 0")
        for key in ("device", "wandb_run_id", "run_id"):
            if not isinstance(record.get(key), (str, type(None))):
                raise bad(f"{key} {record.get(key)!r}", "a string or null")
        metrics = record.get("metrics") or {}
        if not isinstance(metrics, dict) or not all(v is None or is_number(v) for v in metrics.values()):
            raise bad(f"metrics {metrics!r}", "{name: finite number or null}")
        return cls(step=step, epoch=record["epoch"], samples=record["samples"], global_batch_size=batch,
                   config=config, device=record.get("device"), wandb_run_id=record.get("wandb_run_id"),
                   metrics=metrics, run_id=record.get("run_id"))

    def check(self, where: str, dataset_size: int) -> None:
        """The counters hold together: the batch is the config's, samples = step x batch, epoch =
        samples / dataset size, and the step is within what its own config trains."""
        def bad(what: str, expected: str) -> InvalidCheckpointError:
            return InvalidCheckpointError(f"checkpoint {where}: {what}; expected {expected} "
                                          "(edited, or not written by tinydist?)")

        step, batch, saved_train = self.step, self.global_batch_size, self.config["train"]
        if batch != saved_train.get("global_batch_size"):
            raise bad(f"global_batch_size {batch!r} (config says {saved_train.get('global_batch_size')!r})",
                      "one positive integer in both places")
        if self.samples != step * batch:
            raise bad(f"samples {self.samples!r} at step {step}", f"step x global batch = {step * batch}")
        if not math.isclose(self.epoch, step * batch / dataset_size, rel_tol=1e-9, abs_tol=1e-9):
            raise bad(f"epoch {self.epoch!r} at step {step}", f"{step * batch / dataset_size:.6g} for "
                      f"{dataset_size} images")
        saved_epochs, saved_max = saved_train.get("epochs"), saved_train.get("max_steps")
        if is_number(saved_epochs):
            limit = math.ceil(saved_epochs * dataset_size / batch)
            if is_count(saved_max) and saved_max > 0:
                limit = min(limit, saved_max)
            if step > limit:
                raise bad(f"step {step}", f"at most the {limit} steps its own config trains")

    def config_changes(self, where: str, cfg: Config) -> list[str]:
        """One line per setting `cfg` changes; ConfigError for one a resume cannot change (FIXED)."""
        return config_changes(where, self.config, cfg)


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


def _flat(values: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


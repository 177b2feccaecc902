"""What the main process tells the world: metrics.jsonl and the trackers (W&B, TensorBoard).

The W&B run id is kept in the checkpoint, so a resumed job, on any machine, continues the same
run: one curve, not two halves. The metrics file is cut back to the checkpoint's step on resume,
so steps replayed after a hard kill are not written twice.
"""

from __future__ import annotations

import json
import netrc
import os
import re
import secrets
import string
from typing import Any, Optional

import fsspec

from tinydist.config import Config, to_dict
from tinydist.storage import Storage, StorageError


def is_local(url: str) -> bool:
    return fsspec.core.url_to_fs(url)[0].protocol in ("file", ("file", "local"), "local")


def local_staging_dir(output_dir: str) -> str:
    """Trackers write local files; for a bucket output dir they live here (W&B syncs them itself)."""
    if is_local(output_dir):
        return os.path.abspath(os.path.expanduser(output_dir))
    return os.path.join(os.path.expanduser("~/.cache/tinydist/runs"), re.sub(r"[^\w.-]+", "_", output_dir))


def wandb_never_blocks(log: Any) -> None:
    """Without credentials and an explicit WANDB_MODE, run W&B offline instead of prompting for a login."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return
    except (OSError, netrc.NetrcParseError):
        pass
    os.environ["WANDB_MODE"] = "offline"
    log("W&B: no credentials found (WANDB_API_KEY or `wandb login`), logging offline; "
        "upload later with `wandb sync <output_dir>/wandb/offline-run-*`")


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"optim.lr": 0.2, ...}; TensorBoard's hparams take scalars and strings only."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


class MetricsFile:
    """`{output_dir}/metrics.jsonl`: one JSON object per event. Appended locally; on object storage,
    which cannot append, the whole (small) file is rewritten at each flush."""

    def __init__(self, output_dir: str, resume_step: Optional[int], log: Any = print):
        self.url = f"{output_dir.rstrip('/')}/metrics.jsonl"
        self.storage, self.log = Storage(output_dir), log
        self.lines: list[str] = []
        if resume_step is not None:
            try:
                text = self.storage.read("metrics.jsonl").decode()
            except FileNotFoundError:
                text = ""
            self.lines = [line for line in text.splitlines()
                          if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        self.storage.makedirs("")
        self.storage.write("metrics.jsonl", "".join(line + "\n" for line in self.lines).encode())
        self._failing = False
        self._local = open(self.storage.path("metrics.jsonl"), "a") if self.storage.local else None

    def _rewrite(self) -> None:
        """Object stores cannot append: the whole (small) file again. An outage costs nothing but a
        line: the next flush writes everything, and the file is never needed to resume."""
        try:
            self.storage.write("metrics.jsonl", "".join(line + "\n" for line in self.lines).encode())
        except StorageError as e:
            if not self._failing:
                self.log(f"could not write {self.url} ({e}); it is written again at the next flush")
            self._failing = True
            return
        self._failing = False

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record)
        self.lines.append(line)
        if self._local:
            self._local.write(line + "\n")
            self._local.flush()

    def flush(self) -> None:
        if self._local is None:
            self._rewrite()

    def close(self) -> None:
        self.flush()
        if self._local:
            self._local.close()


class RunLog:
    """Main process only: metrics file + Accelerate trackers. Other ranks get a RunLog that does nothing."""

    def __init__(self, accelerator: Any, cfg: Config, run_id: Optional[str], resume_step: Optional[int],
                 dataset_size: int = 0):
        self.accelerator = accelerator
        # Every record says where in training it is: epoch and samples follow from the step.
        self.global_batch, self.dataset_size = cfg.train.global_batch_size, dataset_size
        self.active = accelerator.is_main_process
        self.run_id = run_id
        self.uses_wandb = "wandb" in cfg.log.report_to
        if not self.active:
            return
        self.metrics = MetricsFile(cfg.train.output_dir, resume_step, accelerator.print)
        if not cfg.log.report_to:
            return
        staging = local_staging_dir(cfg.train.output_dir)
        os.makedirs(staging, exist_ok=True)
        init_kwargs: dict[str, Any] = {}
        if "wandb" in cfg.log.report_to:
            wandb_never_blocks(accelerator.print)
            self.run_id = run_id or "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
            init_kwargs["wandb"] = {"id": self.run_id, "resume": "allow", "dir": staging,
                                    "name": cfg.log.run_name or os.path.basename(cfg.train.output_dir.rstrip("/"))}
        accelerator.init_trackers(cfg.log.project, config=flatten(to_dict(cfg)), init_kwargs=init_kwargs)

    def position(self, step: int) -> dict[str, Any]:
        samples = step * self.global_batch
        return {"step": step, "epoch": round(samples / self.dataset_size, 4) if self.dataset_size else 0.0,
                "samples": samples}

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.active:
            return
        self.metrics.write({**self.position(step), **metrics})
        if metrics:
            self.accelerator.log(metrics, step=step)

    def event(self, name: str, step: int, **details: Any) -> None:
        """Resume and preemption marks, for the report's picture; not sent to the trackers."""
        if self.active:
            self.metrics.write({**self.position(step), "event": name, **details})
            self.metrics.flush()

    def flush(self) -> None:
        if self.active:
            self.metrics.flush()

    def finish(self, preempted: bool) -> None:
        """On every rank: Accelerate's end_training also tears down the process group."""
        if self.active:
            if preempted and self.uses_wandb:
                run = self.accelerator.get_tracker("wandb", unwrap=True)
                if hasattr(run, "mark_preempting"):
                    run.mark_preempting()
            self.metrics.close()
        self.accelerator.end_training()

"""A run's last phase: the export of its model, idempotent."""

from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Callable, Optional

import torch

from tinydist.ckpt.backoff import retry_storage
from tinydist.ckpt.checkpointer import Checkpointer
from tinydist.config import Config
from tinydist.export.labels import class_names
from tinydist.export.report import curves_png
from tinydist.export.writer import export_if_changed, exported_weights
from tinydist.loop.timing import Phases
from tinydist.model.ema import ModelEma
from tinydist.runtime.exitcodes import EXIT_OK


def finish(cfg: Config, checkpointer: Checkpointer, model: torch.nn.Module, ema: Optional[ModelEma], step: int,
           metrics: dict[str, float], classes: list[str], main_process: bool, say: Callable[[str], None],
           phases: Optional[Phases] = None, curves: Optional[Future] = None) -> int:
    """Export the model (main process) unless the export in place is already exactly this one; the exit
    code. Rerun on a finished run, it completes a missing or partial export. Its line ends with where
    the wall time went (`phases`, when given). `curves`: the picture, drawing since just before the last
    save (report.curves_png_in_background); drawn here when not given."""
    phases = phases or Phases()
    if main_process:
        began = time.perf_counter()
        module, provenance = exported_weights(cfg, checkpointer, model, ema, step, metrics)
        model_url = f"{cfg.train.output_dir.rstrip('/')}/model"
        names = class_names(cfg.data, classes)
        curves_bytes = curves.result() if curves is not None else curves_png(cfg.train.output_dir)
        wrote = retry_storage(lambda: export_if_changed(module, model_url, cfg.checkpoint.max_shard_size, cfg=cfg,
                                                        classes=classes, class_names=names, provenance=provenance,
                                                        curves_png=curves_bytes),
                              f"exporting the model to {model_url}", max_outage_s=cfg.checkpoint.max_outage_s,
                              retry_s=cfg.checkpoint.retry_s, log=say)
        phases.spent["export"] += time.perf_counter() - began
        say(f"done: step {step}; model in {model_url} ({provenance['weights']} weights of the "
            f"{provenance['selected']} checkpoint, step {provenance['step']})"
            + ("" if wrote else "; it was already complete and current, left as it was") + f"; {phases.describe()}")
    return EXIT_OK

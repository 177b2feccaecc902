"""A validation between steps: the raw weights and/or their average, scored in one pass."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from tinydist.loop.evaluate import evaluate
from tinydist.loop.run import Run, _silent, sync_buffers
from tinydist.loop.tracking import RunLog
from tinydist.model.precise_bn import recompute_bn_statistics


def validate(run: Run, runlog: Optional[RunLog] = None, say: Callable[[str], None] = _silent) -> dict[str, float]:
    """Validation metrics of the raw weights and/or their average (`eval.weights`), each with BN statistics
    for its own weights: the model's synchronised ones, then PreciseBN's (`eval.precise_bn_images`). One
    pass over the validation images scores them all: each batch is gathered and transformed once.
    Logged to `runlog` and said when given."""
    sync_buffers(run)
    cfg, accelerator = run.cfg, run.accelerator
    reduce_sum = lambda t: accelerator.reduce(t, "sum")  # noqa: E731
    scored: dict[str, torch.nn.Module] = {}
    if cfg.eval.weights != "ema" or run.ema is None:
        scored["val"] = run.bare_model
    if run.ema is not None and cfg.eval.weights != "raw":
        run.ema.take_buffers(run.bare_model)
        scored["val_ema"] = run.ema.module
    for module in scored.values():
        if cfg.eval.precise_bn_images:
            recompute_bn_statistics(module, run.train_data, cfg.eval.precise_bn_images, cfg.train.seed, run.device,
                                    run.world, run.rank, reduce_sum, cfg.model.channels_last, accelerator.autocast)
    (first, model), *others = scored.items()
    metrics = evaluate(model, run.val_data, cfg.train.eval_batch_size, run.device, run.world, run.rank, reduce_sum,
                       cfg.model.channels_last, accelerator.autocast, cfg.eval.flip_tta, first, also=dict(others))
    if runlog is not None:
        runlog.log(metrics, run.step)
    say(describe_validation(run, metrics))
    return metrics


def describe_validation(run: Run, metrics: dict[str, float]) -> str:
    """The line a validation prints: top-1, top-5 and loss of the weights and of their average."""
    flip = run.cfg.eval.flip_tta
    return f"step {run.step} epoch {run.sampler.epoch_at(run.step):.2f}: " + "; ".join(
        f"{p} top-1 {metrics[p + '/top1']:.4f} top-5 {metrics[p + '/top5']:.4f} loss {metrics[p + '/loss']:.4f}"
        + (f" (flip TTA top-1 {metrics[p + '/top1_flip']:.4f})" if flip else "")
        for p in ("val", "val_ema") if p + "/top1" in metrics)

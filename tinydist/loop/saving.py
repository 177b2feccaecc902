"""The saves between steps: a checkpoint of the run's state, durable or in this machine's local tier."""

from __future__ import annotations

import time
from typing import Callable, Optional

from tinydist import config as config_lib
from tinydist.ckpt.state import TrainState
from tinydist.ckpt.storage import StorageFullError
from tinydist.ckpt.tiers import Tiers
from tinydist.loop.cadence import SaveClock
from tinydist.loop.run import Run, sync_buffers
from tinydist.loop.tracking import RunLog
from tinydist.runtime.divergence import finite_or_none
from tinydist.runtime.exitcodes import TransientError


def save(run: Run, tiers: Tiers, clock: SaveClock, wandb_run_id: Optional[str], metrics: dict[str, float],
         blocking: bool, durable: bool = True) -> None:
    """A checkpoint of step `run.step`, durable or (`durable` False) in the local tier only; in the
    background unless `blocking` (a stop, the last step)."""
    sync_buffers(run)
    cfg, step = run.cfg, run.step
    started = time.perf_counter()
    sets = {"model": run.bare_model, "optimizer": run.optimizer.optimizer, "ema": run.ema and run.ema.module}
    state = TrainState(step=step, epoch=run.sampler.epoch_at(step), samples=step * cfg.train.global_batch_size,
                       global_batch_size=cfg.train.global_batch_size, config=config_lib.to_dict(cfg),
                       device=run.device.type, wandb_run_id=wandb_run_id, metrics=finite_or_none(metrics),
                       run_id=tiers.local and tiers.local.run_id)
    tiers.save(step, sets, state, durable=durable, blocking=blocking)
    if durable:
        clock.saved(time.perf_counter() - started)


def save_after_step(run: Run, tiers: Tiers, clock: SaveClock, runlog: RunLog, metrics: dict[str, float], *,
                    durable_due: bool, stopping: bool, signal_name: str, say: Callable[[str], None]) -> None:
    """What a step's end saves: a durable checkpoint when one is due (waited for when stopping or at the
    last step), else this machine's local snapshot when the local tier is due, else nothing.

    A full disk on a durable save is not the end of a run that goes on (the export still happens), but a
    stop with nothing saved to stop after is: a TransientError, so that the launcher backs off rather
    than relaunching into the same full disk."""
    if durable_due:
        try:
            save(run, tiers, clock, runlog.run_id, metrics, blocking=stopping or run.step == run.last_step)
        except StorageFullError as e:
            if stopping:
                raise TransientError(f"stopping after {signal_name}, but the checkpoint could not be saved ({e}); "
                                     "a relaunch resumes from the last commit") from e
            say("warning: no final checkpoint (the disk is full, see above); exporting the model anyway")
        runlog.flush()
    elif tiers.local_due(run.step):  # lose at most a step to a crash
        save(run, tiers, clock, runlog.run_id, metrics, blocking=False, durable=False)

"""When the loop logs, validates and saves: named rules of the step, so train.py reads as a loop."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

from tinydist.config import Config

if TYPE_CHECKING:
    from tinydist.loop.run import Run

# A training image costs about three forward passes (the backward pass is about two: Kaplan et al. 2020's
# 6N vs 2N FLOPs per token), a validation or PreciseBN image one: on this project's 2-core CPU a validation
# image measured ~1/5 of a training one (batched, no gradients), so the estimate errs towards fewer validations.
TRAIN_IMAGE_FORWARDS = 3


def validation_share(cfg: Config, train_rows: int, val_rows: int) -> float:
    """One validation's estimated compute as a fraction of the whole run's training compute: PreciseBN's
    images plus the val images (twice with flip TTA), for each set of weights scored."""
    weight_sets = 2 if cfg.ema.enabled and cfg.eval.weights == "both" else 1
    images = min(cfg.eval.precise_bn_images, train_rows) + val_rows * (2 if cfg.eval.flip_tta else 1)
    return weight_sets * images / (TRAIN_IMAGE_FORWARDS * max(train_rows, 1) * cfg.train.epochs)


def validation_every_epochs(cfg: Config, train_rows: int, val_rows: int) -> int:
    """`eval.every_epochs`, widened so that the run's validations (the last step's included) stay within
    `eval.max_share` of its compute: a pure function of the config and the data's size, so a resumed run,
    on any number of processes, validates at the same steps."""
    every = cfg.eval.every_epochs
    if not every or not cfg.eval.max_share:
        return every
    affordable = max(1, math.floor(cfg.eval.max_share / validation_share(cfg, train_rows, val_rows)))
    return max(every, math.ceil(cfg.train.epochs / affordable))


@dataclass
class Triggers:
    cfg: Config
    epoch_at: Callable[[int], float]  # epochs completed after a number of steps (sampler.epoch_at)
    last_step: int  # the loop stops after this step
    # Validate at every this many epoch ends (validation_every_epochs); None = eval.every_epochs as it is.
    eval_every_epochs: Optional[int] = None

    @classmethod
    def for_run(cls, run: "Run", say: Callable[[str], None]) -> "Triggers":
        """The run's triggers; says so when `eval.max_share` spaces the epoch-end validations out."""
        cfg = run.cfg
        every = validation_every_epochs(cfg, len(run.train_data), len(run.val_data))
        if every != cfg.eval.every_epochs:
            share = validation_share(cfg, len(run.train_data), len(run.val_data))
            say(f"validation: every {every} epochs and at the last step (eval.max_share {cfg.eval.max_share:g}: one "
                f"costs ~{100 * share:.1f}% of the run's compute; --eval.max_share=0 for every "
                f"{cfg.eval.every_epochs})")
        return cls(cfg, run.sampler.epoch_at, run.last_step, every)

    def epoch_ended(self, step: int) -> bool:
        """Step `step` (1-based count of steps done) completed an epoch."""
        return math.floor(self.epoch_at(step)) > math.floor(self.epoch_at(step - 1))

    def should_log(self, step: int, stopping: bool) -> bool:
        return step % self.cfg.log.every_steps == 0 or step == self.last_step or stopping

    def should_eval(self, step: int) -> bool:
        """Every `eval.every_epochs`-th epoch end (as widened by `eval.max_share`), the last step, every
        `train.eval_every_steps`."""
        every = self.cfg.train.eval_every_steps
        epochs = self.cfg.eval.every_epochs if self.eval_every_epochs is None else self.eval_every_epochs
        epoch_due = bool(epochs) and self.epoch_ended(step) and math.floor(self.epoch_at(step)) % epochs == 0
        return epoch_due or step == self.last_step or bool(every and step % every == 0)

    def should_save(self, step: int, stopping: bool, clock_due: bool) -> bool:
        every = self.cfg.checkpoint.every_steps
        return (stopping or clock_due or self.epoch_ended(step) or step == self.last_step
                or bool(every and step % every == 0))

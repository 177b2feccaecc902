"""When the loop logs, validates and saves: named rules of the step, so train.py reads as a loop."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from tinydist.config import Config


@dataclass
class Triggers:
    cfg: Config
    epoch_at: Callable[[int], float]  # epochs completed after a number of steps (sampler.epoch_at)
    last_step: int  # the loop stops after this step

    def epoch_ended(self, step: int) -> bool:
        """Step `step` (1-based count of steps done) completed an epoch."""
        return math.floor(self.epoch_at(step)) > math.floor(self.epoch_at(step - 1))

    def should_log(self, step: int, stopping: bool) -> bool:
        return step % self.cfg.log.every_steps == 0 or step == self.last_step or stopping

    def should_eval(self, step: int) -> bool:
        """Every `eval.every_epochs`-th epoch end, the last step, every `train.eval_every_steps`."""
        every, epochs = self.cfg.train.eval_every_steps, self.cfg.eval.every_epochs
        epoch_due = bool(epochs) and self.epoch_ended(step) and math.floor(self.epoch_at(step)) % epochs == 0
        return epoch_due or step == self.last_step or bool(every and step % every == 0)

    def should_save(self, step: int, stopping: bool, clock_due: bool) -> bool:
        every = self.cfg.checkpoint.every_steps
        return (stopping or clock_due or self.epoch_ended(step) or step == self.last_step
                or bool(every and step % every == 0))

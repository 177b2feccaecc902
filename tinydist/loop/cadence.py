"""Saves by the clock: on a spot VM what a preemption costs is minutes of work, not steps.

`checkpoint.every_minutes` is a number of minutes, `off`, or `auto`: Young/Daly's optimum interval
between checkpoints, sqrt(2 x C x MTBF), where C is what one save costs the run (the time the loop is
blocked by it, measured) and MTBF the expected time between preemptions (`checkpoint.mtbf_minutes`).
Frequent saves waste C each; rare ones lose half an interval of work per preemption on average; the
square root balances the two. It is clamped to at least a minute: the cost measured on a fast copy
can be milliseconds, and saving every few seconds would only churn storage.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

from tinydist.config import Config
from tinydist.config.units import parse_every_minutes

MIN_AUTO_MINUTES = 1.0


def young_daly_minutes(save_cost_s: float, mtbf_minutes: float) -> float:
    """The interval (minutes) minimising expected lost time: sqrt(2 x save cost x time between failures)."""
    return max(MIN_AUTO_MINUTES, math.sqrt(2.0 * max(save_cost_s, 0.0) * mtbf_minutes * 60.0) / 60.0)


class SaveClock:
    """When the next time-based save is due. `due()` is local; the loop agrees on it over all ranks."""

    def __init__(self, every_minutes: str, mtbf_minutes: float, log: Callable[[str], None] = print) -> None:
        self.minutes = parse_every_minutes(every_minutes)
        self.auto = self.minutes is not None and math.isnan(self.minutes)
        self.mtbf_minutes, self.log = mtbf_minutes, log
        self.cost_s: Optional[float] = None
        self.last = time.monotonic()

    @classmethod
    def from_config(cls, cfg: Config, log: Callable[[str], None] = print) -> SaveClock:
        """`checkpoint.every_minutes`, with `checkpoint.mtbf_minutes` for `auto`."""
        return cls(cfg.checkpoint.every_minutes, cfg.checkpoint.mtbf_minutes, log)

    def start(self, estimated_cost_s: float) -> None:
        """Log the cadence at start; with `auto`, from an estimate of a save's cost until one is measured."""
        if self.minutes is None:
            return
        if self.auto:
            self._set_cost(estimated_cost_s, "estimated at start")
        else:
            self.log(f"checkpoint: saving every {self.minutes:g} min by the clock (and every_steps, epoch ends)")
        self.last = time.monotonic()

    def _set_cost(self, cost_s: float, how: str) -> None:
        old = self.minutes
        self.cost_s = cost_s
        self.minutes = young_daly_minutes(cost_s, self.mtbf_minutes)
        if old is None or math.isnan(old) or abs(self.minutes - old) > 0.25 * old:
            self.log(f"checkpoint.every_minutes=auto: every {self.minutes:.1f} min = sqrt(2 x save cost "
                     f"{cost_s:.3f} s ({how}) x mtbf {self.mtbf_minutes:g} min), at least {MIN_AUTO_MINUTES:g} min")

    def due(self) -> bool:
        return self.minutes is not None and time.monotonic() - self.last >= self.minutes * 60.0

    def saved(self, blocked_s: float) -> None:
        """A save happened (for any reason): the clock restarts; `auto` learns what it cost."""
        self.last = time.monotonic()
        if self.auto:
            measured = blocked_s if self.cost_s is None else 0.5 * self.cost_s + 0.5 * blocked_s
            self._set_cost(measured, "measured")

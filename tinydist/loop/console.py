"""What the main process prints while training, readable live in a terminal and in a log file.

In a terminal: tqdm's live bar, with messages printed above it (tqdm.write), never glued to it.
Redirected (SLURM, nohup, a container's log): no bar, whose redraws turn into hundreds of
carriage-return fragments; plain lines instead, and a timestamped progress line at most every
`interval_s` seconds, so a log holds one line per half minute, not one per step. (Messages keep
their plain form, which scripts and tests grep; the progress lines carry the clock.)
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from typing import Any, Optional

from tqdm.auto import tqdm


def _eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Console:
    def __init__(self, active: bool, total: int, start: int, interval_s: float = 30.0,
                 tty: Optional[bool] = None) -> None:
        self.active, self.total, self.interval_s = active, total, interval_s
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.bar: Optional[tqdm] = None
        self._last_line, self._start_step, self._start_time = 0.0, start, time.monotonic()
        self._step, self._postfix, self._postfix_step, self._shown_step = start, "", start, start

    def start_progress(self, total: Optional[int] = None, start: Optional[int] = None) -> None:
        """The loop begins: `total` steps in all, from step `start` (a resumed run starts part way)."""
        if total is not None:
            self.total = total
        if start is not None:
            self._start_step = self._step = self._postfix_step = self._shown_step = start
            self._start_time = time.monotonic()
        if self.active and self.tty and not os.environ.get("TQDM_DISABLE"):
            self.bar = tqdm(total=self.total, initial=self._step, desc="train", mininterval=1)
        self._last_line = time.monotonic()

    def say(self, message: str) -> None:
        """A message line (main process only): above the bar in a terminal, timestamped in a log."""
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stdout)
        else:
            print(message, flush=True)

    def progress(self, step: int, epoch: float, **values: Any) -> None:
        """After each step; `values` (loss, lr, images/s) when they were just logged."""
        self._step = step
        if values:
            self._postfix = " ".join(f"{k} {v}" for k, v in values.items())
            self._postfix_step = step
        if not self.active:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if values:
                self.bar.set_postfix_str(self._postfix, refresh=False)
            return
        now = time.monotonic()
        if self.tty or (now - self._last_line < self.interval_s and step < self.total):
            return
        self._last_line = now
        done = step - self._start_step
        eta = (now - self._start_time) / done * (self.total - step) if done else 0.0
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        # Values logged since the last line are news; older ones would read as the loss of this step.
        fresh = self._postfix if self._postfix_step > self._shown_step else ""
        if fresh and self._postfix_step != step:
            fresh += f" (at step {self._postfix_step})"
        self._shown_step = step
        self.say(f"{stamp} step {step}/{self.total} epoch {epoch:.2f} {fresh} eta {_eta(eta)}".replace("  ", " "))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

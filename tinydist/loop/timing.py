"""Where a run's wall time goes: start-up, the decode cache, validation, saves, the export, and the
steps (the rest). Read by the clock (perf_counter) for the run's final line and `bench quality` only:
nothing in training reads it, so the run stays a pure function of (config, seed, step)."""

from __future__ import annotations

import bisect
import collections
import contextlib
import time
from typing import Iterator

# The phases in the order a run meets them; "steps" is what is left of the wall time.
PHASES = ("data", "start-up", "validation", "saves", "export")


class Phases:
    """Seconds per phase since construction (the run's start)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.spent: dict[str, float] = {name: 0.0 for name in PHASES}
        self.save_drag = SaveDrag()  # what background saves cost the steps, inside "steps"

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Adds the time the block takes to phase `name`, even when it raises."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.spent[name] = self.spent.get(name, 0.0) + time.perf_counter() - began

    def until_now(self, name: str) -> None:
        """Phase `name` is everything since the start not yet counted (start-up, taken when the loop begins)."""
        self.spent[name] = self.spent.get(name, 0.0) + max(0.0, self.wall() - sum(self.spent.values()))

    def wall(self) -> float:
        return time.perf_counter() - self.started

    def seconds(self) -> dict[str, float]:
        """Every phase's seconds, `steps` (the rest) and `wall`."""
        wall = self.wall()
        return {**self.spent, "steps": max(0.0, wall - sum(self.spent.values())), "wall": wall}

    def describe(self) -> str:
        """`wall 123 s: steps 80%, validation 6% (7.4 s), ...`: the phases that took any time, largest first."""
        seconds = self.seconds()
        wall = seconds.pop("wall")
        parts = sorted(((s, n) for n, s in seconds.items() if s >= 0.05), reverse=True)
        drag = self.save_drag.seconds
        return (f"wall {wall:.0f} s: " + ", ".join(f"{n} {100 * s / max(wall, 1e-9):.0f}% ({s:.1f} s)" for s, n in parts)
                + (f"; the steps include {drag:.1f} s of slowdown while saves wrote in the background" if drag >= 0.05
                   else ""))

    def as_metrics(self) -> dict[str, float]:
        """`time/<phase>_s` for metrics.jsonl (bench quality reads them back)."""
        return {**{f"time/{name.replace('-', '')}_s": round(s, 3) for name, s in self.seconds().items()},
                "time/save_drag_s": round(self.save_drag.seconds, 3)}


class SaveDrag:
    """Seconds the steps lost to saves writing in the background: each step during which one wrote, beyond
    the median of the last `window` steps taken while none did. On a GPU the writer uses idle host cores;
    on a CPU it takes cores from the compute, and that cost shows only here, inside the steps' time."""

    def __init__(self, window: int = 31) -> None:
        self.seconds = 0.0
        self._recent: collections.deque[float] = collections.deque(maxlen=window)
        self._sorted: list[float] = []

    def step(self, seconds: float, saving: bool) -> None:
        if saving:
            if self._sorted:
                self.seconds += max(0.0, seconds - self._sorted[len(self._sorted) // 2])
            return
        if len(self._recent) == self._recent.maxlen:
            del self._sorted[bisect.bisect_left(self._sorted, self._recent[0])]
        self._recent.append(seconds)
        bisect.insort(self._sorted, seconds)

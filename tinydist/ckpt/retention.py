"""Which step folders stay: the last `keep_last` commits, the best by `best_metric` (the highest
meta["metrics"][best_metric], ties to the later step), and uncommitted folders that may still be a
save in flight. Everything else goes, a committed folder's marker first, so that a half-deleted
checkpoint never looks committed.
"""

from __future__ import annotations

from typing import Callable, Optional

from tinydist.ckpt.layout import CheckpointError
from tinydist.ckpt.record import MARKER, folder_step, read_record
from tinydist.ckpt.storage import TMP_TAG, Storage


class Retention:
    def __init__(self, storage: Storage, keep_last: int, best_metric: Optional[str],
                 log: Callable[[str], None]) -> None:
        self.storage, self.keep_last, self.best_metric, self.log = storage, keep_last, best_metric, log
        self._metric_of: dict[str, Optional[float]] = {}  # folder -> its metric, read once per folder
        self.pinned: set[str] = set()  # folders being copied elsewhere (the local tier's, to the durable tier)

    def step_folders(self) -> list[tuple[int, str]]:
        """(step, name) of every step-* folder, committed or not, oldest first."""
        found = [(step, name) for name in self.storage.sizes() if (step := folder_step(name)) is not None]
        return sorted(found)

    def is_committed(self, name: str) -> bool:
        return self.storage.exists(f"{name}/{MARKER}")

    def committed(self) -> list[str]:
        """Names of the committed folders (marker present; checksums not checked), oldest first."""
        return [name for _, name in self.step_folders() if self.is_committed(name)]

    def cleanup(self, everything_uncommitted: bool = False) -> None:
        """Drop committed checkpoints beyond keep_last (but the best), uncommitted folders and stray
        temp files. Uncommitted folders newer than the newest commit may be another rank's save in
        flight, so they are kept unless `everything_uncommitted` (at start, under the lease, nothing
        is in flight)."""
        folders = [(step, name, self.is_committed(name)) for step, name in self.step_folders()]
        committed = [name for _, name, ok in folders if ok]
        newest = max((step for step, _, ok in folders if ok), default=-1)
        keep = set(committed[-self.keep_last:]) | {self.best(committed)} - {None} | self.pinned
        for step, name, ok in folders:
            stale = not ok and (step < newest or everything_uncommitted)
            if (ok and name not in keep) or stale:
                if ok:  # marker first: a half-deleted checkpoint must never look committed
                    self.storage.remove(f"{name}/{MARKER}")
                self.storage.remove(name, recursive=True)
                self._metric_of.pop(name, None)
                if stale:
                    self.log(f"removed uncommitted {self.storage.show(name)} (an interrupted or failed save)")
            elif ok and self.storage.local:
                for entry in self.storage.sizes(name):
                    if TMP_TAG in entry:
                        self.storage.remove(f"{name}/{entry}")
        if self.storage.local:
            for entry in self.storage.sizes():
                if TMP_TAG in entry:
                    self.storage.remove(entry)

    def _metric(self, name: str) -> Optional[float]:
        """The best_metric recorded in a committed folder's state.json (None: not evaluated at that step)."""
        if name not in self._metric_of:
            try:
                value = read_record(self.storage, name).get("metrics", {}).get(self.best_metric)
            except (CheckpointError, AttributeError):
                value = None
            self._metric_of[name] = float(value) if isinstance(value, (int, float)) and not isinstance(
                value, bool) and value == value else None
        return self._metric_of[name]

    def best(self, committed: Optional[list[str]] = None) -> Optional[str]:
        """The name of the committed folder with the highest best_metric, if any was scored."""
        if not self.best_metric:
            return None
        names = self.committed() if committed is None else committed
        scored = [(self._metric(name), folder_step(name), name) for name in names]
        scored = [entry for entry in scored if entry[0] is not None]
        return max(scored)[2] if scored else None  # ties: the later step

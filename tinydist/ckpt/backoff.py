"""One retry policy for storage outages, for the checkpoint saves and for every other write a run
makes (config.yaml, the export): waits of `retry_s` doubling up to `max_retry_s`, and a budget of
`max_outage_s` counted from the first failure since the last success. The last wait is cut short
so that one more try lands at the budget, never after it.

`Outage` is the clock alone: the checkpointer shares one between its saves (a newer save that
supersedes one still retrying inherits the outage, not a fresh budget); each retried action has
its own `Backoff` (its waits start short again).
"""

from __future__ import annotations

import time
from typing import Callable, Optional, TypeVar

from tinydist.runtime.exitcodes import TransientError
from tinydist.ckpt.storage import StorageError, StorageFullError

T = TypeVar("T")
MIN_WAIT_S = 0.01  # a zero retry_s must not turn the retry loop into a busy loop


class Outage:
    """How long storage has been failing: since the first failure after the last success."""

    def __init__(self) -> None:
        self.since: Optional[float] = None

    def failed(self) -> float:
        """Record a failure; seconds since the first one of this outage."""
        now = time.monotonic()
        if self.since is None:
            self.since = now
        return now - self.since

    def ended(self) -> None:
        self.since = None


class Backoff:
    """The waits of one retried action under the shared policy (see the module docstring)."""

    def __init__(self, *, max_outage_s: float, retry_s: float, max_retry_s: float = 60.0,
                 outage: Optional[Outage] = None) -> None:
        self.max_outage_s, self.max_retry_s = max_outage_s, max(max_retry_s, MIN_WAIT_S)
        self.outage = outage if outage is not None else Outage()
        self._next = max(retry_s, MIN_WAIT_S)
        self.down_s = 0.0  # how long storage had been failing at the last failure

    def after_failure(self) -> Optional[float]:
        """Seconds to wait before the next try, or None: storage has failed for `max_outage_s`."""
        self.down_s = self.outage.failed()
        left = self.max_outage_s - self.down_s
        if left <= 0:
            return None
        wait = min(self._next, left)
        self._next = min(self._next * 2, self.max_retry_s)
        return wait

    def succeeded(self) -> None:
        self.outage.ended()

    def gave_up(self, directory: str, last: BaseException) -> TransientError:
        """The fault that stops a run whose checkpoints could not be committed for `max_outage_s`."""
        return TransientError(f"no checkpoint committed to {directory} for {self.down_s:.0f} s of storage faults "
                              f"(checkpoint.max_outage_s={self.max_outage_s:g}); last: {last}")


def retry_storage(action: Callable[[], T], what: str, *, max_outage_s: float, retry_s: float,
                  log: Callable[[str], None], max_retry_s: float = 60.0) -> T:
    """`action()`, retried under the policy while it raises StorageError; one line per failure.
    Once storage has failed for `max_outage_s`: TransientError (the run exits 69 and is relaunched
    later). A full disk is not retried here: waiting does not free space."""
    backoff = Backoff(max_outage_s=max_outage_s, retry_s=retry_s, max_retry_s=max_retry_s)
    while True:
        try:
            result = action()
        except StorageFullError:
            raise
        except StorageError as e:
            wait = backoff.after_failure()
            if wait is None:
                raise TransientError(f"{what} failed for {backoff.down_s:.0f} s (checkpoint.max_outage_s="
                                     f"{max_outage_s:g}); last: {e}") from e
            log(f"{what} failed ({e}); retrying in {wait:.3g} s")
            time.sleep(wait)
            continue
        backoff.succeeded()
        return result

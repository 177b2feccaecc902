"""Retrying a storage action through an outage, with the same budget as checkpoint saves."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

from tinydist.runtime.exitcodes import TransientError
from tinydist.ckpt.storage import StorageError, StorageFullError

T = TypeVar("T")


def retry_storage(action: Callable[[], T], what: str, *, max_outage_s: float, retry_s: float,
                  log: Callable[[str], None], max_retry_s: float = 60.0) -> T:
    """`action()`, retried with exponential backoff while it raises StorageError; one line per failure.
    After `max_outage_s` of failures: TransientError (the run exits 69 and is relaunched later).
    A full disk is not retried here: waiting does not free space."""
    start, delay = time.monotonic(), max(retry_s, 0.01)
    while True:
        try:
            return action()
        except StorageFullError:
            raise
        except StorageError as e:
            down = time.monotonic() - start
            if down + delay > max_outage_s:
                raise TransientError(f"{what} failed for {down:.0f} s (checkpoint.max_outage_s="
                                     f"{max_outage_s:g}); last: {e}") from e
            log(f"{what} failed ({e}); retrying in {delay:.0f} s")
            time.sleep(delay)
            delay = min(delay * 2, max_retry_s)

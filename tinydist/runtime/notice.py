"""Cloud preemption notices: a spot VM is told of its end before (or instead of) SIGTERM.

The SIGTERM that follows a notice may come late or never (a hard stop after the notice). So a thread
polls the local metadata service (cloud_metadata.py: each provider's dialect, bounded requests) and,
on a notice, calls `on_notice(description)` once — typically `StopFlag.request`, so the run saves
and exits 75 at the next step boundary, exactly as a signal would.

The watcher never raises and never spams: the first failure of a streak is one line, the recovery
another, nothing in between. Like cloud_metadata.py, the standard library only: launchers may import it.
"""

from __future__ import annotations

import threading
from typing import Callable, Optional

from tinydist.runtime.cloud_metadata import MODES, PROVIDERS, REQUEST_TIMEOUT_S, check_once, detect_provider
from tinydist.runtime.quote import clipped


class NoticeWatcher:
    """Polls one provider's metadata every poll_s in a daemon thread until stop() or a notice; on a
    notice sets `notice` and calls on_notice(description) exactly once, then stops polling.

    Failures never escape the thread and never spam: the first failure of a streak is one line, its
    recovery one more. on_notice is never called once stop() has returned (unless on_notice itself
    hangs past stop's timeout)."""

    def __init__(self, provider: str, on_notice: Callable[[str], None], *, metadata_url: str | None = None,
                 poll_s: float = 5.0, log: Callable[[str], None] = print) -> None:
        if provider not in PROVIDERS:
            raise ValueError(f"unknown provider {provider!r}; expected one of {', '.join(PROVIDERS)}")
        if not poll_s > 0:
            raise ValueError(f"poll_s must be > 0, got {poll_s!r}")
        self.provider = provider
        self.metadata_url = metadata_url
        self.poll_s = float(poll_s)
        self.notice: str | None = None
        self._on_notice = on_notice
        self._log = log
        self._stop = threading.Event()
        self._lock = threading.RLock()  # RLock: on_notice may call stop() from the watcher thread
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "NoticeWatcher":
        """Start polling (once; a second call changes nothing). Returns self, for chaining."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"tinydist-notice-{self.provider}",
                                            daemon=True)
            self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop polling and wait up to timeout_s for the thread (a poll in flight ends within its
        request timeout). Safe to call twice, before start(), or from on_notice."""
        acquired = self._lock.acquire(timeout=max(timeout_s, 0.0))
        try:
            self._stop.set()
        finally:
            if acquired:
                self._lock.release()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(max(timeout_s, 0.0))

    def _say(self, message: str) -> None:
        try:
            self._log(message)
        except Exception:  # a broken logger must not end the watcher
            pass

    def _run(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                description = check_once(self.provider, self.metadata_url, timeout_s=REQUEST_TIMEOUT_S)
            except Exception as e:  # network or format: never fatal, logged once per streak
                if not failing:
                    failing = True
                    self._say(f"preemption notices: cannot poll {self.provider} metadata "
                              f"({type(e).__name__}: {clipped(str(e), 160)}); retrying every {self.poll_s:g} s, "
                              "quietly until it answers")
            else:
                if failing:
                    failing = False
                    self._say(f"preemption notices: {self.provider} metadata answers again")
                if description is not None:
                    self._deliver(clipped(description))
                    return
            self._stop.wait(self.poll_s)

    def _deliver(self, description: str) -> None:
        with self._lock:
            if self._stop.is_set():
                return
            self.notice = description
            try:
                self._on_notice(description)
            except Exception as e:
                self._say(f"preemption notices: on_notice failed on {description!r} "
                          f"({type(e).__name__}: {clipped(str(e), 160)})")


def start_watcher(mode: str, on_notice: Callable[[str], None], *, metadata_url: str | None = None,
                  poll_s: float = 5.0, log: Callable[[str], None] = print) -> NoticeWatcher | None:
    """mode in MODES: "off" -> None; "auto" -> detect_provider (~1 s at most; None -> no log, None:
    off on laptops and on-prem clusters); a provider name -> no probe. Returns a started watcher
    after one line `preemption notices: watching <provider> metadata every <poll_s> s`. An unknown
    mode raises ValueError (a config error, to be caught at config time)."""
    if mode not in MODES:
        raise ValueError(f"unknown preemption notice mode {mode!r}; expected one of {', '.join(MODES)}")
    if mode == "off":
        return None
    provider = detect_provider(metadata_url) if mode == "auto" else mode
    if provider is None:
        return None
    watcher = NoticeWatcher(provider, on_notice, metadata_url=metadata_url, poll_s=poll_s, log=log)
    log(f"preemption notices: watching {provider} metadata every {poll_s:g} s")
    return watcher.start()


def watch_in_background(mode: str, on_notice: Callable[[str], None], *, metadata_url: str | None = None,
                        poll_s: float = 5.0, log: Callable[[str], None] = print) -> Callable[[], None]:
    """`start_watcher` in a daemon thread, so that detecting the cloud (up to ~1 s off-cloud) never
    delays a start-up; returns the function that stops the watcher (bounded: never raises, never
    waits more than a few seconds)."""
    started: list[NoticeWatcher] = []

    def run() -> None:
        try:
            watcher = start_watcher(mode, on_notice, metadata_url=metadata_url, poll_s=poll_s, log=log)
        except Exception as e:  # noqa: BLE001 - a watcher must never take the run down
            log(f"preemption notices: not watching ({type(e).__name__}: {clipped(str(e))})")
            return
        if watcher is not None:
            started.append(watcher)

    thread = threading.Thread(target=run, name="tinydist-notice-detect", daemon=True)
    thread.start()

    def stop() -> None:
        thread.join(timeout=5.0)
        for watcher in started:
            watcher.stop()

    return stop

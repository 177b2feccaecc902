"""The exit-code contract: what a launcher may conclude from the code alone.

    0   finished, model exported                                      stop
    75  stopped at a step boundary after a committed checkpoint       relaunch at once
    69  transient: storage or network unreachable, hub down, a peer   relaunch with backoff
        lost, a bounded wait timed out, the checkpoint dir's lease
        held by a job that may still be alive
    2   no relaunch can fix it: bad config, bad data content, an      stop, tell the user
        incompatible or invalid checkpoint
    any other code: a crash (a bug)                                   relaunch with backoff, bounded

`train.main` alone turns what happened into a code (`exit_code_for`); the exception classes below
only say which of those happened. No torch import here: launchers read these constants.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_TRANSIENT = 69  # EX_UNAVAILABLE: a service the run needs is not there right now
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: saved and stopped; relaunch at once
EXIT_CRASH = 1


def one_line(message: object) -> str:
    return " ".join(str(message).split())


class TransientError(Exception):
    """Something outside the run is unavailable for now (storage, network, hub, a peer, a lease).
    A relaunch later can succeed. The message is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))

"""The exit-code contract: what a launcher may conclude from the code alone.

    0   finished, model exported                                      stop
    75  stopped at a step boundary after a committed checkpoint       relaunch at once
    69  transient: storage or network unreachable, hub down, a peer   relaunch with backoff
        lost, a bounded wait timed out, the checkpoint dir's lease
        held by a job that may still be alive
    2   no relaunch can fix it: bad config, bad data content, an      stop, tell the user
        incompatible or invalid checkpoint
    any other code: a crash (a bug)                                   relaunch with backoff, bounded

`cli.exit_code_for` alone turns what happened into a code, for every entry point (`cli.run`); the
two exception classes below are the contract's own words for "relaunch later" and "never relaunch",
and each module's errors say which they are by deriving from one of them, on purpose (never by
happening to inherit from OSError or ValueError). No torch import here: launchers read these constants.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_TRANSIENT = 69  # EX_UNAVAILABLE: a service the run needs is not there right now
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: saved and stopped; relaunch at once
EXIT_CRASH = 1


def one_line(message: object) -> str:
    """A message as one line: what every error the user sees must be (newlines and runs of spaces folded)."""
    return " ".join(str(message).split())


class TransientError(Exception):
    """Something outside the run is unavailable for now (storage, network, hub, a peer, a lease).
    A relaunch later can succeed. The message is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


class HelpRequested(Exception):
    """`--help` / `-h`: `text` goes to stdout and the code is 0; not a run, not an error."""

    def __init__(self, text: str) -> None:
        super().__init__("help requested")
        self.text = text


class PermanentError(Exception):
    """No relaunch can fix it: a bad config, bad data content, an invalid or incompatible checkpoint,
    storage that refuses writes (read-only, no permission). Exit 2; the message is one line."""

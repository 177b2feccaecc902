"""The one wrapper every entry point runs under: what happened -> the exit-code contract, in one line.

    def main(argv=None) -> int:
        return cli.run(lambda: _main(argv))

`train`, `evaluate`, `predict`, `data`, `config`, `report`, `bench` and `launch` all end here, so a
launcher (or a user's shell script) reads the same codes from each: 0 done, 2 a relaunch cannot fix
it, 69 transient, 75 stopped after a commit, anything else a crash (with its traceback). The table
itself is in exitcodes.py and docs/design.md ("Exit codes and the fault model").
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable, Optional

from tinydist.runtime.exitcodes import (EXIT_CONFIG, EXIT_CRASH, EXIT_OK, EXIT_TRANSIENT, HelpRequested, PermanentError, TransientError,
                                one_line)


def exit_code_for(error: Optional[BaseException]) -> int:
    """The one place that maps what happened to the exit-code contract (see exitcodes.py)."""
    if error is None:
        return EXIT_OK
    if isinstance(error, PermanentError):
        return EXIT_CONFIG  # bad config, data content, checkpoint or storage permissions: no relaunch can fix it
    if isinstance(error, TransientError) or _is_peer_failure(error):
        return EXIT_TRANSIENT  # storage, network, hub, a peer, a lease: relaunch with backoff
    return EXIT_CRASH  # a bug


def _is_peer_failure(error: BaseException) -> bool:
    # A collective's error is a peer lost only where torch.distributed ran at all; a CLI that never
    # imported torch must not pay for importing it to learn that.
    if "torch" not in sys.modules:
        return False
    from tinydist.runtime.peers import is_peer_failure

    return is_peer_failure(error)


def describe(error: BaseException, code: int) -> str:
    """The one line the user reads (stderr), and the launcher repeats last."""
    text = one_line(error)
    if code == EXIT_CRASH:
        return f"error: crashed with {type(error).__name__}: {text[:300]}"
    if code == EXIT_TRANSIENT and not isinstance(error, TransientError):  # raised by a collective of the loop
        return f"error: a peer process was lost: {text[:300]}"
    return f"error: {text}"


def run(main: Callable[[], Optional[int]], *, on_exit: Optional[Callable[[int, str], None]] = None) -> int:
    """`main()`'s code (None counts as 0), or the contract's code for what it raised, said in one line
    on stderr (a crash also prints its traceback above that line). `--help` is not an error: its text
    goes to stdout and the code is 0. `on_exit(code, message)` runs last, whatever happened."""
    from tinydist.runtime.launch import record_exit_code  # light: no torch; lets `tinydist.runtime.launch` keep the codes

    code, message = EXIT_CRASH, ""
    try:
        code = main() or EXIT_OK
    except KeyboardInterrupt:  # outside train's stop flag (a CLI, or train before it installed one)
        code, message = 130, "error: interrupted"
        print(message, file=sys.stderr)
    except SystemExit as e:  # argparse's usage errors (2) and --help (0) keep their own codes
        code = e.code if isinstance(e.code, int) else (EXIT_OK if e.code is None else EXIT_CONFIG)
    except Exception as e:  # noqa: BLE001 - every failure gets a code from the contract, not a default
        if isinstance(e, HelpRequested):
            print(e.text, end="")
            code = EXIT_OK
        else:
            code = exit_code_for(e)
            message = describe(e, code)
            if code == EXIT_CRASH:
                traceback.print_exc()
            # Every rank meets the same config error: one says it. Transient faults differ per rank.
            if code == EXIT_CRASH or os.environ.get("RANK", "0") == "0" or code == EXIT_TRANSIENT:
                print(message, file=sys.stderr)
            if code == EXIT_TRANSIENT:
                print(f"exit {EXIT_TRANSIENT} (transient): a relaunch after a pause can succeed", file=sys.stderr)
    finally:
        record_exit_code(code, message)
        if on_exit is not None:
            on_exit(code, message)
    return code


"""Run a training script in this process and leave its exit code where the launcher can read it.

Usage (launch/common.sh does this for every launcher):
    TINYDIST_EXIT_DIR=DIR accelerate launch [flags] launch/exit_status.py tinydist/train.py [args ...]

Why: `accelerate launch` reports every failure as exit 1 (its simple launcher raises
CalledProcessError, torchrun raises ChildFailedError), so a launcher could not tell 75 (saved and
stopped: relaunch) from 2 (configuration error: never relaunch) from a crash. Each rank writes its
own code to DIR/rank<RANK>.code; launch/common.sh reads them after accelerate returns.

The script runs in this very process (runpy), as `python tinydist/train.py` would run it: same
argv, sys.path[0], __main__ and signal handlers, no extra process between it and its signals.
A rank that dies without running Python's exit path (SIGKILL, a fatal signal) writes nothing.
"""

import os
import runpy
import signal
import sys

_PID = os.getpid()  # forked children (DataLoader workers) must not write the rank's code


def _record(code: int) -> None:
    out_dir = os.environ.get("TINYDIST_EXIT_DIR")
    if not out_dir or os.getpid() != _PID:
        return
    path = os.path.join(out_dir, f"rank{os.environ.get('RANK', '0')}.code")
    try:
        with open(path + ".tmp", "w") as f:
            f.write(f"{code}\n")
        os.replace(path + ".tmp", path)
    except OSError as e:  # never turn a finished run into a crash because of bookkeeping
        print(f"exit_status: cannot write {path}: {e}", file=sys.stderr)


def _exit_code(exc: SystemExit) -> int:
    # The status the interpreter itself would exit with for this SystemExit.
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code & 0xFF
    return 1  # sys.exit("message")


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: exit_status.py SCRIPT [ARGS ...]")
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path[0] = os.path.dirname(os.path.abspath(script))

    # The launchers ignore TERM/INT/USR1 so that only the training processes act on them (and the
    # launchers live on to report the code); ignored dispositions are inherited, so give the script
    # the defaults it would have had if started directly.
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        if signal.getsignal(sig) == signal.SIG_IGN:
            signal.signal(sig, signal.SIG_DFL)
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)

    # A training loop may leave through os._exit (to skip a hanging NCCL teardown): record that too.
    real_os_exit = os._exit

    def _os_exit(code: int) -> None:
        _record(code & 0xFF)
        real_os_exit(code)

    os._exit = _os_exit

    code = 1  # an uncaught exception: Python exits with 1
    try:
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc)
        raise
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT
        raise
    finally:
        _record(code)


if __name__ == "__main__":
    main()

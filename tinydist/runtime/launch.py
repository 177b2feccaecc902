"""`accelerate launch` that keeps tinydist's exit codes and lives through preemption signals.

    python -m tinydist.launch [accelerate launch flags] tinydist/train.py --config ... [--a.b=v ...]
    python -m tinydist.launch --torchrun [torchrun flags] tinydist/train.py --config ...   (elastic)

`accelerate launch` reports every failure as exit 1, so a launcher could not tell "saved and
stopped, relaunch me" (75) from "bad config, don't" (2) or a crash. Here each training process
writes its own exit code to a folder (see `record_exit_code`), and this command returns the
group's code after Accelerate's own launch command, run unchanged, returns.

Signals: SLURM sends SIGUSR1 to every process of a job step, Kubernetes sends SIGTERM to the first
process only, a closing terminal sends SIGHUP. So this process never dies of TERM/INT/USR1/HUP
itself: it passes them on to its children (torchrun's agent, when several processes are launched,
installs its own TERM/INT/HUP forwarding) and waits for them to save and exit (75). Started under
`nohup` (SIGHUP inherited ignored) it leaves SIGHUP ignored, for its children too.

Its own errors (bad flags, a training script that is not there) end like every entry point's,
through `cli.run`: one line, the contract's code; otherwise the code is the group's.

Elastic runs (a lost machine does not end the job) need torchrun's `--nnodes=MIN:MAX` with a c10d
rendezvous, which `accelerate launch` cannot express (its --num_machines is one number). With
`--torchrun` first, the rest goes to torchrun itself, with the same exit codes and signal handling;
the training script builds its Accelerator from torchrun's environment as usual.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Any, Optional, Sequence

from tinydist.runtime import cli
from tinydist.runtime.exitcodes import EXIT_CONFIG, EXIT_PREEMPTED, EXIT_TRANSIENT, PermanentError
from tinydist.runtime.preempt import stop_signals

EXIT_DIR_ENV = "TINYDIST_EXIT_DIR"


class LaunchError(PermanentError):
    """The launch command itself is wrong (exit 2, one line): no training process was started."""


def record_exit_code(code: int, message: str = "") -> None:
    """Called by each training process on its way out, when launched through this module: its code,
    and its one-line error, which the launcher repeats last, after whatever torchrun printed."""
    folder = os.environ.get(EXIT_DIR_ENV)
    if not folder:
        return
    # The elastic agent restarts workers with new ranks: only the last round's codes count.
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    path = os.path.join(folder, f"round{restart}-rank{os.environ.get('RANK', '0')}.code")
    try:
        with open(path + ".tmp", "w") as f:
            f.write(f"{code}\n{message}\n")
        os.replace(path + ".tmp", path)
    except OSError as e:  # bookkeeping must never turn a finished run into a crash
        print(f"tinydist.launch: cannot record exit code in {path}: {e.strerror}", file=sys.stderr)


def group_exit_code(codes: Sequence[int], fallback: int) -> int:
    """The code that tells a launcher the most: a config error anywhere wins (never relaunch), then a
    crash (a bug: bounded relaunches), then transient (relaunch with backoff), then 75 (saved and stopped)."""
    if EXIT_CONFIG in codes:
        return EXIT_CONFIG
    crashes = [c for c in codes if c not in (0, EXIT_PREEMPTED, EXIT_TRANSIENT)]
    if crashes:
        return crashes[0]
    if EXIT_TRANSIENT in codes:
        return EXIT_TRANSIENT
    if EXIT_PREEMPTED in codes:
        return EXIT_PREEMPTED
    return fallback  # every rank that recorded finished; a rank that could not record (SIGKILL) shows here


def _children() -> list[int]:
    pids: list[int] = []
    for path in glob.glob(f"/proc/{os.getpid()}/task/*/children"):  # Linux; elsewhere nothing to forward
        try:
            with open(path) as f:
                pids += [int(p) for p in f.read().split()]
        except OSError:  # a thread ended between glob and open; raising in a signal handler would kill us
            continue
    return pids


def _forward(signum: int, frame: Any) -> None:
    for pid in _children():
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _recorded(folder: str) -> list[tuple[int, str]]:
    """(exit code, error line) of the last round of workers (the elastic agent may have restarted them),
    in rank order."""
    found = [(int(m.group(1)), int(m.group(2)), p) for p in glob.glob(os.path.join(folder, "round*-rank*.code"))
             if (m := re.match(r"round(\d+)-rank(\d+)\.code$", os.path.basename(p)))]
    if not found:
        return []
    last, out = max(round_ for round_, _, _ in found), []
    for _, _, path in sorted(r for r in found if r[0] == last):
        code, _, message = open(path).read().partition("\n")
        out.append((int(code), message.strip()))
    return out


def _recorded_codes(folder: str) -> list[int]:
    return [code for code, _ in _recorded(folder)]


class _PreemptionIsNotAFailure(logging.Filter):
    """torchrun's agent logs every worker exit but 0 as `failed (exitcode: N) ...` at ERROR
    (torch.distributed.elastic.multiprocessing.api). 75 is the contract's "saved and stopped": that
    line would make every preemption read as a failure. Other codes keep it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith("failed (exitcode")
                    and record.args and isinstance(record.args, tuple) and record.args[0] == EXIT_PREEMPTED)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The group's exit code (see group_exit_code); the launcher's own errors through cli.run."""
    handled = stop_signals()
    for sig in handled:  # first thing: a signal during the imports below must not kill us either
        signal.signal(sig, _forward)
    return cli.run(lambda: _launch(list(sys.argv[1:] if argv is None else argv), handled))


def _launch(argv: list[str], handled: Sequence[int]) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if argv[:1] == ["--torchrun"]:
        import torch.distributed.run as torchrun

        args = torchrun.get_args_parser().parse_args(argv[1:])
        run = torchrun.run
    else:
        from accelerate.commands.launch import launch_command, launch_command_parser

        args = launch_command_parser().parse_args(argv)
        run = launch_command
    script = args.training_script
    # Every process would fail to start, each with its own python error and the group with 2 or 1.
    if not (args.module or args.no_python) and not os.path.isfile(script):
        raise LaunchError(f"training script {script!r}: no such file (relative to {os.getcwd()}); expected "
                          "a path like tinydist/train.py, or -m with a module name")
    if signal.SIGHUP not in handled:  # nohup: torchrun's agent would otherwise turn SIGHUP into a shutdown
        os.environ.setdefault("TORCHELASTIC_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGQUIT")
    folder = tempfile.mkdtemp(prefix="tinydist-exit.")
    outer = os.environ.get(EXIT_DIR_ENV)
    os.environ[EXIT_DIR_ENV] = folder
    # torchrun's default grace between forwarding SIGTERM and SIGKILL (30 s) can cut a save short.
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "170")
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_PreemptionIsNotAFailure())
    # torchrun logs its own view of a failure after the ranks' last lines: only then is the run's
    # error line repeated below it. One process (accelerate's plain subprocess) prints nothing after.
    fallback, repeat = 0, False
    try:
        run(args)
    except subprocess.CalledProcessError as e:  # one process
        fallback = e.returncode
    except SystemExit as e:  # one process with --quiet: accelerate exits 1 itself
        fallback = e.code if isinstance(e.code, int) else 1
    except ChildFailedError as e:  # several: torchrun
        fallback, repeat = e.get_first_failure()[1].exitcode or 1, True
    except SignalException as e:  # torchrun was signalled; its ranks were told and have exited
        fallback, repeat = 128 + int(e.sigval), True
    finally:
        recorded = _recorded(folder)
        shutil.rmtree(folder, ignore_errors=True)
        # cli.run records this process's own code on its way out: never into its children's folder
        if outer is None:
            os.environ.pop(EXIT_DIR_ENV, None)
        else:
            os.environ[EXIT_DIR_ENV] = outer
    code = group_exit_code([c for c, _ in recorded], fallback if fallback >= 0 else 128 - fallback)
    # The run's own one-line error, last, below torchrun's tracebacks: the first rank that gave this code.
    message = next((m for c, m in recorded if c == code and m), "")
    if message and repeat:
        print(message, file=sys.stderr)
    print(f"tinydist.launch: training exited with {code}", file=sys.stderr)
    return code


"""`accelerate launch` that keeps tinydist's exit codes.

    python -m tinydist.launch [accelerate launch flags] tinydist/train.py --config ... [--a.b=v ...]

`accelerate launch` reports every failing run as exit 1, so a launcher could not tell "preempted,
relaunch me" (75) from "bad config, don't" (2) or a crash. This runs Accelerate's own launch
command, unchanged, and returns the training processes' exit code instead.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Optional, Sequence

from tinydist.preempt import EXIT_CONFIG, EXIT_PREEMPTED


def worker_exit_code(codes: Sequence[int]) -> int:
    """One code for a group: ranks stop together, but peers of a failed rank are killed by signal
    (negative codes), so the meaningful code is the first tinydist one, else the first failure."""
    for meaningful in (EXIT_CONFIG, EXIT_PREEMPTED):
        if meaningful in codes:
            return meaningful
    failed = [c for c in codes if c != 0]
    if not failed:
        return 0
    return failed[0] if failed[0] > 0 else 128 - failed[0]  # killed by signal N -> 128 + N, as a shell says


def main(argv: Optional[Sequence[str]] = None) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        launch_command(args)
    except subprocess.CalledProcessError as e:  # single-process launch
        return worker_exit_code([e.returncode])
    except ChildFailedError as e:  # torchrun-style multi-process launch
        return worker_exit_code([failure.exitcode for failure in e.failures.values()])
    return 0


if __name__ == "__main__":
    sys.exit(main())

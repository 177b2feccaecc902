"""Each figure of tinydist as a ratio against a baseline timed in the same run on the same machine.

    python -m tinydist.bench {data,step,checkpoint,resume,gpu,all} [--quick]
    python -m tinydist.bench quality [--quick] [--seeds 0 1] [--epochs 3] [config overrides]

Absolute timings say little across machines; a ratio against a baseline timed in the same run,
interleaved with ours, does. No timing is asserted: each line prints its goal for a human, exit 0.
`--quick` shrinks every size: it checks that the figures run (CI), not what they say.

This module is the command: it dispatches to one module per figure (bench/data.py, step.py,
checkpoint.py, resume.py, gpu.py; quality.py for accuracy), which share bench/common.py.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence
from unittest import mock

import datasets
import torch

from tinydist.bench.checkpoint import bench_checkpoint
from tinydist.bench.common import machine_threads
from tinydist.bench.data import bench_data
from tinydist.bench.gpu import bench_gpu
from tinydist.bench.resume import bench_resume
from tinydist.bench.step import bench_step
from tinydist.data.hostmem import keep_freed_memory

FIGURES: dict[str, Callable[[str, bool, torch.device], None]] = {
    "data": bench_data, "step": bench_step, "checkpoint": bench_checkpoint, "resume": bench_resume,
    "gpu": bench_gpu}


def main(argv: Optional[Sequence[str]] = None) -> int:
    from tinydist.runtime import cli

    return cli.run(lambda: _main(list(sys.argv[1:] if argv is None else argv)))


def _main(argv: list[str]) -> int:
    if argv[:1] == ["quality"]:  # accuracy, not speed: its own flags and config overrides
        from tinydist.bench.quality import quality

        return quality(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m tinydist.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("figures", nargs="+", choices=[*FIGURES, "all"], help="which figures to measure")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the figures run (CI smoke test)")
    opts = parser.parse_args(argv)
    names = list(FIGURES) if "all" in opts.figures else list(dict.fromkeys(opts.figures))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(machine_threads())  # ours and every baseline get every core
    # As train() does; before any worker forks, so the baselines' DataLoader workers inherit it too.
    tuned = keep_freed_memory()
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"bench: machine {platform.node()}, {os.cpu_count()} CPUs ({platform.machine()}), torch {torch.__version__}, "
          f"device {device.type}{gpu}, python {platform.python_version()}, {'quick' if opts.quick else 'default'} "
          f"sizes, glibc keeps freed memory: {tuned}", flush=True)
    with tempfile.TemporaryDirectory(prefix="tinydist-bench-", ignore_cleanup_errors=True) as tmp:
        # `datasets`' own cache in tmp too: the variable reaches the subprocesses, the attribute this
        # process (whose `datasets` read the variable on import).
        hf_cache = os.path.join(tmp, "hf-datasets")
        with mock.patch.dict(os.environ, {"HF_DATASETS_CACHE": hf_cache}), \
                mock.patch.object(datasets.config, "HF_DATASETS_CACHE", Path(hf_cache)):
            for name in names:
                FIGURES[name](tmp, opts.quick, device)
                sys.stdout.flush()  # each line as soon as it is known, even through a pipe
    return 0

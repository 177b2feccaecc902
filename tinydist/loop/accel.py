"""The Accelerator a run uses, and a check that the process count it formed is the one asked for."""

from __future__ import annotations

import datetime
import os
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, is_tensorboard_available

from tinydist.config import Config, ConfigError
from tinydist.loop.tracking import check_wandb_credentials


def make_accelerator(cfg: Optional[Config] = None) -> Accelerator:
    """Accelerate owns devices, processes and precision (launch flags, config files). Without a GPU,
    Accelerate forms a (gloo) process group only when told to use the CPU; otherwise every process
    would silently train alone. The trackers are checked here, before any data is loaded, and only
    what can be known without a network call; tracking.RunLog starts them, best-effort."""
    trackers = list(cfg.log.report_to) if cfg else []
    if "tensorboard" in trackers and not is_tensorboard_available():
        raise ConfigError("log.report_to has `tensorboard` but it is not installed: pip install -e '.[tensorboard]'")
    # Only the main process (RANK 0) talks to W&B: its machine's key is the one that counts, and a
    # worker node without ~/.netrc is normal.
    if "wandb" in trackers and os.environ.get("RANK", "0") == "0":
        check_wandb_credentials()
    # Every collective waits at most train.peer_timeout_s for a peer (torch's default is 10-30 min).
    timeout = datetime.timedelta(seconds=(cfg or Config()).train.peer_timeout_s)
    return Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)])


def requested_processes() -> Optional[int]:
    """The --num_processes that `accelerate launch` (our parent, for one process) was given, if any.
    Without --multi_gpu it starts one process whatever that says, and nothing else would tell."""
    if os.environ.get("WORLD_SIZE"):  # torchrun started us: the world is what was asked for
        return None
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        return None
    if not any("accelerate" in os.path.basename(a) for a in argv[:3]):  # `accelerate launch`, `-m accelerate...`
        return None
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--num_processes=") else (
            argv[i + 1] if arg == "--num_processes" and i + 1 < len(argv) else None)
        if value is not None and value.isdigit():
            return int(value)
    return None



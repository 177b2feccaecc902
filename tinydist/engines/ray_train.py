"""Ray Train as one more launcher: tinydist's own `train` in every Ray Train worker, under Accelerate.

    python -m tinydist.ray --num-workers 4 [--min-workers 2] [--use-gpu] [--max-failures 3]
                           [--address auto|ray://HOST:10001] --config FILE [--section.key=VALUE ...]

Ray Train's TorchTrainer starts the workers and forms the process group (gloo on CPUs, NCCL on
GPUs) and sets RANK/WORLD_SIZE/MASTER_ADDR; tinydist's Accelerator picks them up as it does
torchrun's. The checkpoints are tinydist's own, in `checkpoint.dir`, never Ray checkpoint objects:
a run moves freely between this and any other launcher. Ray's `storage_path` holds only Ray's own
bookkeeping (a temporary folder, removed at the end).

The exit-code contract, mapped onto Ray's failure handling (Ray Train v2, the default since 2.51):
- 75 (stopped after a commit), 69 (transient) and crashes raise in the worker, so Ray restarts the
  worker group (at most --max-failures times, FailureConfig) and `train` resumes from the newest
  commit. When the restarts are used up the driver exits with the last code.
- 0 and 2 are returned, never raised: Ray retries every worker error, and no retry fixes a 2.
- A stop signal to the driver (Kubernetes stops the driver's pod, Ctrl-C) reaches every worker's
  stop flag through a small Ray actor: they save at the next step boundary and the driver exits 75
  without a restart, for the launcher outside to relaunch.
Config, data source, storage and the checkpoint dir's lease are checked in the driver before Ray
starts, so their errors are one line and exit 2 (or 69) with no worker started.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Optional, Sequence

from tinydist.ckpt.lease import claim_storage
from tinydist.config import Config, ConfigError, help_text, load_config
from tinydist.data.sources import open_source
from tinydist.runtime import cli
from tinydist.runtime.exitcodes import (EXIT_CONFIG, EXIT_CRASH, EXIT_OK, EXIT_PREEMPTED, EXIT_TRANSIENT,
                                        HelpRequested, PermanentError, TransientError, one_line)
from tinydist.runtime.launch import group_exit_code
from tinydist.runtime.peers import Peers
from tinydist.runtime.preempt import StopFlag, stop_signals

PROG = "python -m tinydist.ray"
USAGE = (f"{PROG} --num-workers N [--min-workers M] [--use-gpu] [--max-failures K] [--address ADDR] "
         "--config FILE [--section.key=VALUE ...]")
ABOUT = (
    "Runs tinydist's training in N Ray Train workers (TorchTrainer; Accelerate inside each), with the "
    "checkpoints in checkpoint.dir as with every launcher. --num-workers N: processes (one GPU each with "
    "--use-gpu). --min-workers M (< N): Ray Train's elastic scaling: it starts with as few as M workers "
    "when N cannot be placed, and restarts the group larger when resources come back (Ray checks every "
    "60 s); each restart resumes from the newest commit with the same global batch. --max-failures K "
    "(default 3; -1: no bound): worker-group restarts after a 75, a 69, a crash or a lost worker. "
    "--address: an existing Ray cluster (`auto` on one of its nodes, or ray://HOST:10001); without it a "
    "local Ray instance is started on 127.0.0.1 and stopped at the end. Exit codes as `train`'s; a stop "
    "signal to this process makes the workers save and exit 75.")


def restarts(code: int) -> bool:
    """Whether a worker's exit code must make Ray restart the group: 75 and 69 (the contract's
    "relaunch") and crashes (bounded by --max-failures) do; 0 (done) and 2 (no relaunch can fix it) do not."""
    return code not in (EXIT_OK, EXIT_CONFIG)


class WorkerExit(Exception):
    """Raised in a Ray Train worker to make Ray restart the worker group; carries `train`'s exit code
    and its one-line error to the driver (through pickling, hence __reduce__)."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(f"tinydist exited with {code}" + (f": {message}" if message else ""))
        self.code, self.message = code, message

    def __reduce__(self) -> tuple[Any, ...]:
        return (WorkerExit, (self.code, self.message))


class StopChannel:
    """The driver's stop request, where every worker can read it (a Ray actor of this class)."""

    def __init__(self) -> None:
        self.reason: Optional[str] = None

    def request(self, reason: str) -> None:
        self.reason = self.reason or reason

    def read(self) -> Optional[str]:
        return self.reason


def _watch_channel(channel: Any, stop: StopFlag, poll_s: float = 1.0) -> Callable[[], bool]:
    """Poll the driver's stop channel from a daemon thread; the returned call ends the watch and says
    whether the driver asked for the stop."""
    asked, done = threading.Event(), threading.Event()

    def watch() -> None:
        import ray

        while not done.wait(poll_s):
            try:
                reason = ray.get(channel.read.remote(), timeout=30)
            except (ray.exceptions.RayError, TimeoutError):  # the driver is gone: Ray ends this worker anyway
                return
            if reason:
                asked.set()
                stop.request(reason)
                return

    if channel is not None:
        threading.Thread(target=watch, name="tinydist-ray-stop", daemon=True).start()

    def end() -> bool:
        done.set()
        if channel is not None and not asked.is_set():
            # A peer may have stopped this worker (the stop is agreed across ranks) before this worker's
            # own poll saw the request: ask the channel once more, or the driver's stop would count as a
            # failure and Ray would restart the group.
            import ray

            try:
                return bool(ray.get(channel.read.remote(), timeout=30))
            except (ray.exceptions.RayError, TimeoutError):
                return False
        return asked.is_set()

    return end


def worker_loop(config: dict[str, Any]) -> tuple[int, str]:
    """Each Ray Train worker's function: `train` under `cli.run` (its exit code and one-line error),
    then the contract mapped onto Ray: raise to be restarted, return to be done (see `restarts`)."""
    from tinydist.train import train  # the worker's import: the driver never builds a model

    if config.get("cwd") and os.path.isdir(config["cwd"]):  # relative paths of the config, as the driver saw them
        os.chdir(config["cwd"])
    said = {"message": ""}

    def note(code: int, message: str) -> None:
        said["message"] = message

    if os.environ.get("RANK", "0") == "0":
        print(f"tinydist.ray: {os.environ.get('WORLD_SIZE')} worker(s), process group at "
              f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}", flush=True)
    stop = StopFlag(log=lambda line: print(line, flush=True), signals=False)  # Ray runs us in a thread
    end_watch = _watch_channel(config.get("stop"), stop)
    code = cli.run(lambda: train(config["cfg"], stop), on_exit=note)
    asked = end_watch()
    if restarts(code) and not (code == EXIT_PREEMPTED and asked):
        raise WorkerExit(code, said["message"])
    return code, said["message"]


# ---- the driver ---------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{message}; usage: {USAGE}")


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """(Ray's options, the training arguments: --config FILE and --section.key=VALUE overrides)."""
    if any(a in ("-h", "--help") for a in argv):
        raise HelpRequested(help_text(PROG, usage=USAGE, about=ABOUT))
    parser = _Parser(prog=PROG, add_help=False, allow_abbrev=False)
    parser.add_argument("--num-workers", type=int, required=True)
    parser.add_argument("--min-workers", type=int, default=None)
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--max-failures", type=int, default=3)
    parser.add_argument("--address", default=None)
    args, rest = parser.parse_known_args(list(argv))
    if args.num_workers < 1:
        raise ConfigError(f"--num-workers {args.num_workers}: expected at least 1 worker process")
    if args.min_workers is not None and not 1 <= args.min_workers <= args.num_workers:
        raise ConfigError(f"--min-workers {args.min_workers}: expected 1 to --num-workers ({args.num_workers})")
    if args.max_failures < -1:
        raise ConfigError(f"--max-failures {args.max_failures}: expected a count of restarts, or -1 for no bound")
    return args, rest


def preflight(cfg: Config, say: Callable[[str], None]) -> None:
    """What `train` would refuse at setup, checked before any Ray process starts: the data source can
    be opened (both splits), checkpoint.dir and train.output_dir can be written, and no live job holds
    the checkpoint dir's lease (taken and given back at once: the workers' rank 0 takes it for the run)."""
    for split in (cfg.data.train_split, cfg.data.val_split):
        open_source(cfg.data.source, split)
    stop = StopFlag(log=say, signals=False)
    lease = claim_storage(cfg, stop, Peers(1, 0, cfg.train.peer_timeout_s), say)
    if lease is not None:
        lease.release()


def _import_ray(local: bool) -> Any:
    # find_spec of the top level only: that of "ray.train" would import ray before the variables below are set.
    if importlib.util.find_spec("ray") is None:
        raise PermanentError("Ray is not installed: pip install -e '.[ray]'")
    if local:
        # Read by ray at import, and inherited by the raylet and workers: with it the node's address,
        # MASTER_ADDR included, is 127.0.0.1, so a local run never listens beyond loopback.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")  # return values and elastic num_workers are v2's
    # Ray Train's print patch prints every line twice here and ignores print's file=: a library's
    # dis.dis(file=buffer) (datasets' fingerprints) would land on the console.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    import ray

    try:
        import ray.train.torch  # noqa: F401 - ray without its [train] extra lacks what this needs
    except ImportError as e:
        raise PermanentError(f"Ray Train cannot be imported ({one_line(e)}): pip install -e '.[ray]'") from None
    return ray


def failure_code(error: BaseException) -> tuple[int, str]:
    """The exit code (and error line) of a Ray run whose restarts were used up: the workers' own codes,
    combined as tinydist.launch combines ranks'; a worker process that died (no code of its own) or a
    worker group Ray could not start is transient (69)."""
    failures = getattr(error, "worker_failures", None) or {0: error}
    found: list[tuple[int, str]] = []
    for failure in failures.values():
        base = getattr(failure, "_base_exc", failure)  # Ray wraps a worker's exception with its traceback
        if isinstance(base, WorkerExit):
            found.append((base.code, base.message))
        else:
            found.append((EXIT_TRANSIENT, f"error: a Ray worker was lost: {type(base).__name__}: "
                                          f"{one_line(base)[:300]}"))
    code = group_exit_code([c for c, _ in found], EXIT_TRANSIENT)
    return code, next((m for c, m in found if c == code and m), "")


def _run_in_thread(target: Callable[[], Any], on_signal: Callable[[str], None]) -> Any:
    """target() in a thread (so Ray's own SIGINT handler, which aborts the workers without a save, is
    not installed) while this thread turns stop signals into `on_signal` calls; target's result or error."""
    box: dict[str, Any] = {}
    received: list[str] = []

    def run() -> None:
        try:
            box["result"] = target()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread, which raises it
            box["error"] = e

    previous = {s: signal.signal(s, lambda n, f: received.append(signal.Signals(n).name)) for s in stop_signals()}
    try:
        thread = threading.Thread(target=run, name="tinydist-ray-fit", daemon=True)
        thread.start()
        forwarded = 0
        while thread.is_alive():
            thread.join(0.2)
            if len(received) > forwarded:
                forwarded = len(received)
                on_signal(received[0])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if "error" in box:
        raise box["error"]
    return box["result"]


def run_ray(argv: Sequence[str]) -> int:
    """The driver: check, start (or join) Ray, fit, and turn what happened into the contract's code."""
    args, rest = parse_args(argv)
    say = lambda line: print(line, flush=True)  # noqa: E731
    cfg = load_config(rest, prog=PROG)
    local = args.address is None
    ray = _import_ray(local)
    preflight(cfg, say)

    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    if local:
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False,
                 num_cpus=max(os.cpu_count() or 1, args.num_workers), log_to_driver=True)
    else:
        try:
            ray.init(address=args.address, log_to_driver=True)
        except ConnectionError as e:  # the cluster may come back (a head pod restarting): relaunch later
            raise TransientError(f"cannot reach the Ray cluster at --address {args.address} ({one_line(e)[:200]}); "
                                 "expected `auto` on a node of a running cluster, or ray://HEAD:10001") from None
    bookkeeping = tempfile.mkdtemp(prefix="tinydist-ray-")
    try:
        channel = ray.remote(num_cpus=0)(StopChannel).remote()
        workers: Any = args.num_workers if args.min_workers in (None, args.num_workers) else \
            (args.min_workers, args.num_workers)
        trainer = TorchTrainer(
            worker_loop,
            train_loop_config={"cfg": cfg, "stop": channel, "cwd": os.getcwd()},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=args.use_gpu),
            torch_config=TorchConfig(timeout_s=int(cfg.train.peer_timeout_s)),
            run_config=RunConfig(name=f"tinydist-{int(time.time())}", storage_path=bookkeeping,
                                 failure_config=FailureConfig(max_failures=args.max_failures)))

        def on_signal(name: str) -> None:
            say(f"tinydist.ray: {name} received: the workers save at the next step boundary and stop (exit 75)")
            channel.request.remote(f"{name} to the Ray driver")

        try:
            returned = _run_in_thread(trainer.fit, on_signal).return_value
            code, message = returned if isinstance(returned, tuple) else (EXIT_CRASH, f"error: rank 0 returned {returned!r}")
        except TrainingFailedError as e:
            code, message = failure_code(e)
    finally:
        ray.shutdown()
        shutil.rmtree(bookkeeping, ignore_errors=True)
    if code != EXIT_OK:
        if message:
            print(message, file=sys.stderr)
        print(f"tinydist.ray: training exited with {code}", file=sys.stderr)
    return code


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli.run(lambda: run_ray(list(sys.argv[1:] if argv is None else argv)))


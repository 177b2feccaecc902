"""What every figure of `python -m tinydist.bench` shares: the checkout's recipes, clocks that wait for
the device, runs interleaved with their baseline, the verdict part of a line, quiet set-up."""

from __future__ import annotations

import contextlib
import gc
import io
import os
import sys
import time
from typing import Any, Callable, Iterator, Sequence

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout
SMOKE_RECIPE = os.path.join(REPO_ROOT, "configs", "smoke.yaml")
MAIN_RECIPE = os.path.join(REPO_ROOT, "configs", "tiny_imagenet_resnet18.yaml")


def machine_threads() -> int:
    """The compute threads a bench gives ours and every baseline alike: every core, or OMP_NUM_THREADS
    where it is set (the user's cap, as it caps training; a test runner's share of the cores: two pytest
    workers of two threads each on two cores spin against each other, measured 4-10x slower)."""
    cap = os.environ.get("OMP_NUM_THREADS", "")
    return int(cap) if cap.isdigit() and int(cap) > 0 else os.cpu_count() or 1


def say(line: str) -> None:
    """A figure line, flushed at once: a run cut short (or piped) keeps what it measured."""
    print(line, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":  # CUDA work is asynchronous: stop the clock only once it is done
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def verdict(quick: bool, name: str, value: str, goal: str) -> str:
    """A figure line's `-> ratio 4.8x (goal >= 5)` part; at --quick sizes the ratio means nothing, so it
    is not printed as if it did."""
    if quick:
        return f"-> {name} not shown (quick sizes: ratios mean nothing)"
    return f"-> {name} {value} (goal {goal})"


def interleaved(fns: Sequence[Callable[[], Any]], repeats: int, budget_s: float = 120.0) -> list[list[Any]]:
    """Each fn's results over up to `repeats` rounds, run in turn and in alternating order, so drift in
    the machine's load, and whatever one run leaves behind for the next, hit every fn alike. Rounds that
    would end past `budget_s` are skipped: a loaded machine gets fewer repeats, not an endless wait."""
    results: list[list[Any]] = [[] for _ in fns]
    t0 = time.perf_counter()
    for r in range(repeats):
        if r and (time.perf_counter() - t0) * (r + 1) / r > budget_s:
            break
        for i in (range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))):
            results[i].append(fns[i]())
    return results


@contextlib.contextmanager
def quiet() -> Iterator[io.StringIO]:
    """Swallow prints and progress bars; show their end only if something fails."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            yield out
    except Exception:
        sys.stderr.write(out.getvalue()[-5000:])
        raise


def free_device_memory(device: torch.device) -> None:
    """What one figure left on the device, returned before the next allocates (GPU figures run in turn)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def create_momentum(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """A step on zero gradients: momentum buffers as a saved state holds, weights and BN stats untouched."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment, with the checkout first on PYTHONPATH: `python -m tinydist.train` children run
    the code being measured, installed or not."""
    path = os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))
    return {**os.environ, **extra, "PYTHONPATH": path}


def digits_args(tmp: str, image_size: int, micro: int, global_batch: int) -> list[str]:
    """The smoke recipe (imagenet stem, offline digits) at the given sizes, every file under tmp."""
    recipe = ["--config", SMOKE_RECIPE] if os.path.isfile(SMOKE_RECIPE) else []
    return recipe + ["--data.source=digits", f"--data.cache_dir={tmp}/cache", f"--data.image_size={image_size}",
                     "--data.max_val_samples=64", "--model.stem=imagenet", f"--train.micro_batch_size={micro}",
                     f"--train.global_batch_size={global_batch}", "--checkpoint.every_steps=0", "--log.report_to=[]"]

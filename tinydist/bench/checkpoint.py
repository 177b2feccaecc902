"""`bench checkpoint` and `bench gpu`'s checkpoint part: what one `Checkpointer.save` adds to the wall time
of training steps running beside it (steps with a save minus the same steps without, the save's background
writes and fsync included), against `torch.save` of the same model + SGD momentum.

The steps are a fixed load (forward, backward, `snapshot_barrier()` where the loop calls it, SGD update on
one resident batch): the figure is the save's cost to whatever computes beside it, not the loop's speed
(`bench step` and `bench gpu`'s loop lines measure that, through train_step)."""

from __future__ import annotations

import math
import os
import shutil
import statistics
import tempfile
import time
from typing import Optional

import torch
import torch.nn.functional as F

from tinydist import config as config_lib
from tinydist.bench.common import (create_momentum, free_device_memory, interleaved, machine_threads, say, sync, timed,
                                   verdict)
from tinydist.ckpt.checkpointer import Checkpointer
from tinydist.ckpt.local import LocalTier
from tinydist.model.build import build_model
from tinydist.model.optim import build_optimizer


class SaveCost:
    """resnet18 (cifar stem) + SGD momentum on `device`, training steps on one fixed batch, and the two ways
    of saving it; `returns` holds how long each `save()` held the caller."""

    def __init__(self, folder: str, device: torch.device, batch: int, side: int, num_classes: int,
                 max_shard_size: str, channels_last: bool = False, bf16: bool = False) -> None:
        torch.manual_seed(0)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.device, self.bf16 = device, bf16
        model = build_model(config_lib.ModelConfig(stem="cifar"), num_classes)
        self.model = model.to(device, memory_format=memory_format).train()
        self.optimizer = build_optimizer(config_lib.OptimConfig(name="sgd", momentum=0.9), self.model)
        create_momentum(self.model, self.optimizer)
        momentum = [v for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        self.nbytes = sum(t.numel() * t.element_size() for t in [*self.model.state_dict().values(), *momentum])
        os.makedirs(folder, exist_ok=True)
        self.checkpointer = Checkpointer(os.path.join(folder, "checkpoints"), keep_last=2,
                                         max_shard_size=max_shard_size, log=lambda _: None)
        self.baseline_path, self.names = os.path.join(folder, "baseline.pt"), iter(range(1, 10**6))
        self.barrier = self.checkpointer.snapshot_barrier  # what holds the update (the local tier's, below)
        self.images = torch.randn(batch, 3, side, side, device=device).contiguous(memory_format=memory_format)
        self.labels = torch.randint(0, num_classes, (batch,), device=device)
        self.returns: list[float] = []

    def step(self) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(self.images)
        F.cross_entropy(logits.float(), self.labels).backward()
        self.barrier()  # where the loop calls it: a save still copying holds the update
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def timed_step(self) -> float:
        t0 = time.perf_counter()
        self.step()
        sync(self.device)
        return time.perf_counter() - t0

    def save(self) -> None:
        t0 = time.perf_counter()
        self.checkpointer.save(next(self.names), self.model, self.optimizer, {"bench": True}, blocking=False)
        self.returns.append(time.perf_counter() - t0)

    def full_write(self) -> float:
        """One save until committed: every file and the marker written and fsynced."""
        sync(self.device)
        return timed(lambda: (self.save(), self.checkpointer.wait()))

    def committed_beside_steps(self, max_steps: int = 1000) -> float:
        """One save with steps running beside it, until it commits: the time its background work takes when
        the loop competes with it for the host. On a GPU that is mostly the interpreter lock: a loop that
        only queues kernels keeps it, and the writer gets it back once per switch interval (5 ms), so the
        same save commits later than it does alone (`full_write`)."""
        sync(self.device)
        t0 = time.perf_counter()
        self.save()
        for _ in range(max_steps):
            self.step()
            if not self.checkpointer.writing():
                break
        elapsed = time.perf_counter() - t0
        self.checkpointer.wait()
        return elapsed

    def steps_to_hide_a_save(self, one_step: float) -> tuple[int, float]:
        """(steps, seconds): enough steps for one save's background work to finish inside them, sized by
        how long it takes beside steps, not alone; a save that did not fit would be charged for the wait."""
        beside = self.committed_beside_steps()
        return max(3, math.ceil(1.5 * beside / one_step)), beside

    def torch_save(self) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}, self.baseline_path)
        elapsed = time.perf_counter() - t0
        os.remove(self.baseline_path)
        return elapsed

    def loop(self, steps: int, with_save: bool) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        if with_save:
            self.save()
        for _ in range(steps):
            self.step()
        self.checkpointer.wait()  # committed (fsynced) before the clock stops: nothing left unpaid
        sync(self.device)
        return time.perf_counter() - t0

    def measure(self, steps: int, repeats: int, budget_s: float) -> tuple[float, float, int]:
        """(median extra loop time of a save, median torch.save time, rounds run)."""
        with_save, without, saved = interleaved(
            [lambda: self.loop(steps, True), lambda: self.loop(steps, False), self.torch_save], repeats, budget_s)
        return statistics.median(w - o for w, o in zip(with_save, without)), statistics.median(saved), len(saved)

    def close(self) -> None:
        self.checkpointer.close()


def bench_checkpoint(tmp: str, quick: bool, device: torch.device) -> None:
    """What one save adds to the training loop's wall time vs torch.save of the same state."""
    cost = SaveCost(tmp, device, *((8, 16) if quick else (32, 32)), num_classes=200, max_shard_size="10MB")
    repeats = 1 if quick else 5
    # A core for the saver, as on a GPU host (where the GPU computes and the cores are free): with every
    # core computing, any background work on a CPU-only box is work the loop does not do.
    compute_threads = max(1, machine_threads() - 1) if device.type == "cpu" else torch.get_num_threads()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(compute_threads)
    try:
        cost.step(), cost.torch_save(), cost.full_write()  # warm-up: lazy imports, allocator, page cache, buffers
        one_step = statistics.median(timed(cost.step) for _ in range(3))
        steps, beside_s = cost.steps_to_hide_a_save(one_step)
        extra, base, rounds = cost.measure(steps, repeats, budget_s=120.0)
    finally:
        torch.set_num_threads(previous_threads)
        cost.close()
    ratio = verdict(quick, "ratio", f"{100 * extra / base:.1f}%", "<= 10%")
    print(f"checkpoint: extra loop time per save {extra:.3f} s vs torch.save {base:.3f} s "
          f"{ratio} [{steps} training steps ({one_step:.3f} s each, {compute_threads} "
          f"compute thread(s)) with one save minus the same steps without, the save's writes and fsync included "
          f"(it commits {beside_s:.2f} s after save() beside the steps); resnet18 cifar stem, 200 classes, "
          f"model + SGD momentum = {cost.nbytes / 1e6:.1f} MB on {device.type}; "
          f"median of {rounds}]")
    bench_local_every_step(tmp, quick, device)


def bench_local_every_step(tmp: str, quick: bool, device: torch.device) -> None:
    """The local tier's promise priced: the loop with a local-tier save after every step (the previous one
    committed before each update, as train does) vs the same steps with no save at all."""
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else tmp
    cost = SaveCost(os.path.join(tmp, "every-step"), device, *((8, 16) if quick else (32, 32)), num_classes=200,
                    max_shard_size="10MB")
    local = LocalTier(tempfile.mkdtemp(prefix="tinydist-bench-local-", dir=shm), "bench", 1, writer=True,
                      max_shard_size="10MB", log=lambda _: None)
    cost.barrier = local.snapshot_barrier
    steps, repeats = (3, 1) if quick else (10, 3)
    names = iter(range(1, 10**6))

    def loop(saving: bool) -> float:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            cost.step()
            if saving:
                local.save(next(names), {"model": cost.model, "optimizer": cost.optimizer}, {"bench": True})
        local.snapshot_barrier()  # the last save committed before the clock stops: nothing left unpaid
        sync(device)
        return time.perf_counter() - t0

    compute_threads = max(1, machine_threads() - 1) if device.type == "cpu" else torch.get_num_threads()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(compute_threads)
    try:
        loop(True), loop(False)  # warm-up: host buffers, page cache, the tier's folder
        with_saves, without = interleaved([lambda: loop(True), lambda: loop(False)], repeats, budget_s=240.0)
    finally:
        torch.set_num_threads(previous_threads)
        local.close()
        shutil.rmtree(local.root, ignore_errors=True)
        cost.close()
    saved, bare = statistics.median(with_saves), statistics.median(without)
    if local.failed:
        raise RuntimeError(f"bench checkpoint: the local tier in {local.root} failed: {local.failed}")
    overhead = verdict(quick, "overhead", f"+{100 * (saved / bare - 1):.1f}%", "<= 5%")
    print(f"checkpoint every step: {steps} steps with a local-tier save after each {saved:.2f} s vs no saves "
          f"{bare:.2f} s {overhead} [local tier in {shm}: each save committed (written, sha256, marker) before the "
          f"next update, {bare / steps:.3f} s per step, {compute_threads} compute thread(s); model + SGD momentum "
          f"= {cost.nbytes / 1e6:.1f} MB per save on {device.type}; median of {len(with_saves)}]")


def bench_checkpoint_stall(tmp: str, device: torch.device, micro_batch: int, side: int, num_classes: int,
                           repeats: int, where: str, max_shard_size: Optional[str] = None) -> None:
    """`gpu checkpoint`: the same at the main recipe's shapes (channels_last, bf16 autocast); also how long
    save() itself holds the host (on a GPU it only queues copies into pinned host buffers on a side stream)."""
    cost = SaveCost(os.path.join(tmp, "gpu-checkpoint"), device, micro_batch, side, num_classes,
                    max_shard_size or config_lib.DEFAULT_MAX_SHARD_SIZE, channels_last=True, bf16=True)
    try:
        for _ in range(3):  # warm-up: kernels, allocator, lazy imports, page cache, pinned host buffers
            cost.timed_step()
        cost.torch_save(), cost.full_write()
        one_step = statistics.median(cost.timed_step() for _ in range(3))
        write_s = cost.full_write()
        steps, beside_s = cost.steps_to_hide_a_save(one_step)
        cost.returns.clear()
        extra, base, rounds = cost.measure(steps, repeats, budget_s=math.inf)
        host_buffers = list(getattr(cost.checkpointer, "_host_buffers", {}).values())
        pinned = bool(host_buffers) and all(b.is_pinned() for b in host_buffers)
        returned_ms = statistics.median(cost.returns) * 1000
    finally:
        cost.close()
    nbytes = cost.nbytes
    del cost, host_buffers
    free_device_memory(device)
    say(f"gpu checkpoint: extra loop time per save {extra:.4f} s vs torch.save {base:.3f} s -> ratio "
        f"{100 * extra / base:.1f}% (goal <= 10%) [{where}; {steps} training steps of micro {micro_batch} at "
        f"{side}px, bf16 autocast ({one_step * 1000:.0f} ms each) with one save minus the same steps without, the "
        f"save's writes and fsync included; save() itself returns in {returned_ms:.1f} ms "
        f"(host buffers pinned: {pinned}); a whole save until committed {write_s:.3f} s alone, "
        f"{beside_s:.3f} s beside the steps; resnet18 cifar stem, "
        f"{num_classes} classes, model + SGD momentum = {nbytes / 1e6:.1f} MB on {device.type}, channels_last; "
        f"median of {rounds}]")

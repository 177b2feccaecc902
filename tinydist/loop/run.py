"""A run's state and the phases around its steps: what `train` sets up, restores, saves and validates.

`Run` is everything one optimizer step reads and advances (`tinydist.train.train_step`). `build_run`
makes it from the config the one way training does, so `python -m tinydist.bench quality` trains the
recipe itself (CutMix/MixUp, EMA, PreciseBN, the BN rule, the schedule) rather than a copy of it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from accelerate import Accelerator
from torch import nn

from tinydist import config as config_lib
from tinydist.ckpt.backoff import retry_storage
from tinydist.ckpt.checkpointer import Checkpointer
from tinydist.ckpt.lease import Lease
from tinydist.ckpt.layout import DamagedCheckpointError
from tinydist.ckpt.local import LocalTier, read_run_id, run_identity
from tinydist.ckpt.promote import Promoter
from tinydist.ckpt.restore import restore as restore_checkpoint, state_check
from tinydist.ckpt.state import TrainState
from tinydist.ckpt.storage import Storage
from tinydist.ckpt.tiers import Tiers, local_restore_point
from tinydist.config import Config, ConfigError
from tinydist.data.cache import ImageCache, load_train_val
from tinydist.data.mix import mix_enabled
from tinydist.data.prefetch import Prefetcher, Ready
from tinydist.data.sampler import GlobalSampler
from tinydist.model.build import BNStatistics, build_model
from tinydist.model.ema import ModelEma
from tinydist.model.optim import apply_hyperparameters, build_optimizer
from tinydist.runtime.exitcodes import EXIT_PREEMPTED, TransientError
from tinydist.runtime.peers import Peers
from tinydist.runtime.preempt import StopFlag


def _silent(_: str) -> None:
    pass


@dataclass
class LossWindow:
    """The training loss since the last log step, summed on the device: read (one host sync) only when
    logged, never per step."""
    loss_sum: torch.Tensor
    steps: int = 0
    started: float = field(default_factory=time.perf_counter)

    def read(self, accelerator: Accelerator, accumulation: int, global_batch: int) -> tuple[float, float]:
        """(mean micro-batch loss over every rank, images/s) since the window started; starts the next one."""
        loss_mean = accelerator.reduce(self.loss_sum, "mean").item() / (self.steps * accumulation)
        rate = self.steps * global_batch / (time.perf_counter() - self.started)
        self.loss_sum.zero_()
        self.started, self.steps = time.perf_counter(), 0
        return loss_mean, rate


@dataclass
class Run:
    """What one optimizer step reads and advances; built by `build_run`, moved to a checkpoint's step by
    `restore`, fed by `start_loop` (train.train_step runs it)."""
    cfg: Config
    accelerator: Accelerator
    train_data: ImageCache
    val_data: ImageCache
    sampler: GlobalSampler
    model: nn.Module  # what the forward calls: prepared by Accelerate (DDP on several processes), maybe compiled
    bare_model: nn.Module  # torchvision keys, no wrapper: what checkpoints, evaluation and the EMA read
    optimizer: Any  # Accelerate's wrapper; `.optimizer` is torch's, the one checkpoints hold
    bn_statistics: BNStatistics  # the BN rule (model/build.py)
    ema: Optional[ModelEma]
    total_steps: int  # the schedule's length
    last_step: int  # where this run stops: total_steps, or train.max_steps
    warmup_steps: int
    window: LossWindow
    step: int = 0  # optimizer steps done
    resumed: dict[str, Any] = field(default_factory=dict)  # restore: from which tier, how many steps it redoes
    prefetch: Optional[Prefetcher] = None  # from start_loop() to close()

    @property
    def mixing(self) -> bool:
        return mix_enabled(self.cfg.mix)

    @property
    def num_classes(self) -> int:
        return len(self.train_data.classes)

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def start_loop(self) -> None:
        """Steps begin at `self.step`: training mode, a fresh loss window, micro-batches from that step on."""
        self.model.train()
        self.window.started, self.window.steps = time.perf_counter(), 0
        self.prefetch = Prefetcher.from_config(self.cfg, self.train_data, self.sampler, self.step, self.last_step,
                                               self.device)

    def next_micro_batch(self) -> Ready:
        if self.prefetch is None:
            raise RuntimeError("Run.start_loop() must run before the first step")
        return self.prefetch.next()  # gathered, copied and its crops drawn while the last one computed

    def close(self) -> None:
        if self.prefetch is not None:
            self.prefetch.close()


def load_data(cfg: Config, accelerator: Accelerator, stop: StopFlag,
              say: Callable[[str], None]) -> Optional[tuple[ImageCache, ImageCache]]:
    """The (train, val) caches, decoded once per node, then memory-mapped by every rank; None if a stop
    signal ended the decode (said why: exit 75, nothing was trained, nothing is lost)."""
    try:
        return load_train_val(cfg.data, accelerator.local_main_process_first, log=say)
    except RuntimeError as e:
        if not stop.requested:
            raise
        # A signal to the whole process group (a relaunch loop, srun) also ends the cache build's
        # workers, which datasets reports as an error.
        say(f"{stop.signal_name} during the decode-cache build ({type(e).__name__}); stopped before "
            f"training, nothing to save: exit {EXIT_PREEMPTED}")
        return None


def build_run(cfg: Config, accelerator: Accelerator, train_data: ImageCache, val_data: ImageCache,
              say: Callable[[str], None] = _silent) -> Run:
    """Sampler, schedule, model and optimizer: a pure function of the config and seed (the learning rate,
    of the step), placed by Accelerate. Step 0; `restore` moves it to a checkpoint's."""
    world, rank = accelerator.num_processes, accelerator.process_index
    sampler = GlobalSampler.from_config(cfg, len(train_data), world, rank)
    total_steps = math.ceil(cfg.train.epochs * sampler.steps_per_epoch)
    last_step = min(total_steps, cfg.train.max_steps or total_steps)
    warmup_steps = round(cfg.optim.warmup_epochs * sampler.steps_per_epoch)
    say(f"data: {len(train_data)} train / {len(val_data)} val images, {len(train_data.classes)} classes; global "
        f"batch {cfg.train.global_batch_size} = {cfg.train.micro_batch_size} x {world} processes x "
        f"{sampler.accumulation} accumulation; {sampler.steps_per_epoch:.1f} steps per epoch, {total_steps} "
        "steps in all")

    identity_start = config_lib.zero_init_residual(cfg.model, total_steps)
    if identity_start and cfg.model.zero_init_residual is None:
        say(f"model: residual blocks start as the identity ({total_steps} steps >= "
            f"{config_lib.ZERO_INIT_FROM_STEPS}; model.zero_init_residual=false keeps torchvision's init)")
    torch.manual_seed(cfg.train.seed)
    model = build_model(dataclasses.replace(cfg.model, zero_init_residual=identity_start), len(train_data.classes))
    memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    bare_model = model
    optimizer = build_optimizer(cfg.optim, model)
    if accelerator.mixed_precision == "fp16":
        raise ConfigError("mixed precision fp16 is not supported: its loss scaler skips steps, so a resumed run "
                          "would not retrace the original; use bf16 (`--mixed_precision bf16`), which needs no "
                          "scaler, or no mixed precision")
    model, optimizer = accelerator.prepare(model, optimizer)
    bn_statistics = BNStatistics(bare_model)
    ema = ModelEma(bare_model, cfg.ema, total_steps) if cfg.ema.enabled else None
    if cfg.model.compile:
        model = torch.compile(model)
    return Run(cfg, accelerator, train_data, val_data, sampler, model, bare_model, optimizer, bn_statistics, ema,
               total_steps, last_step, warmup_steps, LossWindow(torch.zeros((), device=accelerator.device)))


def open_checkpoints(run: Run, lease: Optional[Lease], peers: Peers, say: Callable[[str], None]) -> Tiers:
    """The run's checkpoint dir, with what earlier jobs left half-written removed once we hold its lease;
    with `checkpoint.local_dir`, this machine's local tier and (rank 0) the copier to the durable tier."""
    cfg = run.cfg
    best_metric = None if cfg.checkpoint.best_metric == "none" else cfg.checkpoint.best_metric
    checkpointer = Checkpointer(config_lib.checkpoint_dir(cfg), keep_last=cfg.checkpoint.keep_last,
                                max_shard_size=cfg.checkpoint.max_shard_size, rank=run.rank, world_size=run.world,
                                log=say, max_outage_s=cfg.checkpoint.max_outage_s, retry_s=cfg.checkpoint.retry_s,
                                lease=lease, peers=peers, commit_timeout_s=cfg.train.peer_timeout_s,
                                best_metric=best_metric)
    if lease is not None:  # we alone write here now
        checkpointer.cleanup(everything_uncommitted=True)
    local_dir, run_id = cfg.checkpoint.local_dir, None
    if local_dir and run.rank == 0:
        run_id = run_identity(checkpointer.storage, fresh=cfg.checkpoint.resume == "never")
    run.accelerator.wait_for_everyone()
    if not local_dir:
        return Tiers(checkpointer, log=say)
    run_id = run_id or read_run_id(checkpointer.storage)
    main = run.accelerator.is_main_process
    local = LocalTier(local_dir, run_id, cfg.checkpoint.local_every_steps,
                      writer=run.accelerator.is_local_main_process, max_shard_size=cfg.checkpoint.max_shard_size,
                      log=say, warn=say if main else lambda line: print(f"[rank {run.rank}] {line}", flush=True))
    local.clean_start()
    promoter = None
    if run.rank == 0:
        promoter = Promoter(local.checkpointer, checkpointer, world_size=run.world, lease=lease, log=say,
                            max_outage_s=cfg.checkpoint.max_outage_s, retry_s=cfg.checkpoint.retry_s)
        local.checkpointer.on_commit = promoter.committed
    return Tiers(checkpointer, local, promoter, log=say)


def restore(run: Run, tiers: Tiers, peers: Peers, say: Callable[[str], None]) -> Optional[TrainState]:
    """Resume from the newest committed checkpoint (`checkpoint.resume`; with `auto`, across both tiers):
    its state and config checked first, then the tensor sets loaded; `run.step` becomes its step and
    `run.resumed` says from which tier and how many finished steps it redoes. Its TrainState, or None
    for a fresh run."""
    cfg, accelerator, checkpointer = run.cfg, run.accelerator, tiers.durable
    sets = dict(model=run.bare_model, optimizer=run.optimizer.optimizer, ema=run.ema and run.ema.module)
    restored, local_path = None, None
    if cfg.checkpoint.resume == "auto" and tiers.local is not None:
        local_path = local_restore_point(tiers, peers, state_check(cfg, len(run.train_data)), say)
    if local_path is not None:
        try:
            restored = restore_checkpoint(cfg, checkpointer, **sets, dataset_size=len(run.train_data), path=local_path)
        except DamagedCheckpointError as e:  # found only by reading every byte: gone, so no relaunch meets it again
            say(f"local tier: {e}; removed, resuming from the durable tier")
            tiers.local.checkpointer.storage.remove(local_path.rpartition("/")[2], recursive=True)
        if peers.max([int(restored is None)])[0]:  # some machine could not read its copy: all take the durable tier
            if restored is not None and checkpointer.latest() is None:
                raise TransientError(f"a machine could not read its local checkpoint (this one read {local_path}) "
                                     "and the durable tier has none; a relaunch reads them again")
            restored = local_path = None
    if restored is None:
        restored = restore_checkpoint(cfg, checkpointer, **sets, dataset_size=len(run.train_data))
    if restored is None:
        return None
    path, step, changes = restored.path, restored.step, restored.changes
    apply_hyperparameters(cfg.optim, run.bare_model, run.optimizer.optimizer)  # the config in effect from here on
    if run.ema is not None and "ema" not in restored.sets:
        run.ema.module.load_state_dict(run.bare_model.state_dict())
        say(f"ema.enabled: {path} kept no average; it starts from the weights at step {step}")
    agreed = accelerator.reduce(torch.tensor([float(step)], device=run.device), "sum").item()
    if agreed != step * run.world:  # a damaged file seen by some ranks only: do not train apart
        raise TransientError(f"the processes resumed from different checkpoints (this one: {path}); "
                             "a relaunch reads them again")
    finished = tiers.local.finished_step() if tiers.local is not None else None
    lost = finished - step if finished is not None and finished >= step else None
    run.resumed = {"tier": "local" if local_path else "durable", "lost_steps": lost}
    say(f"resumed from {path} at step {step} (saved by {restored.record['world_size']} process(es) on "
        f"{restored.state.device})" + (f"; from the {run.resumed['tier']} tier, "
                                       f"{'steps lost: unknown' if lost is None else f'{lost} step(s) lost'}"
                                       if tiers.local is not None else ""))
    if changes:
        say(f"config changed since that checkpoint, in effect from step {step}: " + "; ".join(changes))
    checkpointer.last_commit = run.step = step  # every commit was checked finite
    if tiers.local is not None:
        tiers.local.checkpointer.last_commit = step if local_path else None
    return restored.state


def write_config(cfg: Config, main_process: bool, say: Callable[[str], None]) -> None:
    """{train.output_dir}/config.yaml: the config in effect, as the run's outputs record it."""
    if not main_process:
        return
    output = Storage(cfg.train.output_dir)
    retry_storage(lambda: output.write("config.yaml", config_lib.to_yaml(cfg).encode()),
                  f"writing {output.show('config.yaml')}", max_outage_s=cfg.checkpoint.max_outage_s,
                  retry_s=cfg.checkpoint.retry_s, log=say)


def sync_buffers(run: Run) -> None:
    """BN statistics are updated in each rank's forward and only broadcast by DDP at the next one: every
    rank holds rank 0's after this, before they are evaluated or each rank writes its shards."""
    if run.world > 1:
        for buffer in run.bare_model.buffers():
            torch.distributed.broadcast(buffer, src=0)

"""Train resnet18 on Tiny ImageNet: one readable loop.

    accelerate launch [accelerate flags] tinydist/train.py --config configs/tiny_imagenet_resnet18.yaml [--a.b=v ...]
    python -m tinydist.train --config configs/smoke.yaml

Devices, process count, precision and nodes come from Accelerate. The trajectory is fixed by the
config alone: a step consumes the same global batch whatever the world size (sampler.py), and a
run killed at any moment resumes from its newest committed checkpoint as if it never stopped.
Exit codes (tinydist/exitcodes.py, decided in `main` alone): 0 done; 75 stopped after a committed
checkpoint (relaunch now); 69 transient: storage, network, hub or a peer unavailable, the checkpoint
dir leased by a live job (relaunch with backoff); 2 bad config, data or checkpoint (don't); else a crash.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from typing import Callable, Optional, Sequence

if __package__ in (None, ""):  # `accelerate launch tinydist/train.py` runs this file as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F

from tinydist.runtime import cli
from tinydist import config as config_lib
from tinydist.loop.accel import make_accelerator, requested_processes
from tinydist.data.augment import augment
from tinydist.loop.cadence import SaveClock
from tinydist.ckpt.checkpointer import Checkpointer
from tinydist.ckpt.layout import tensor_sets
from tinydist.config import Config, ConfigError, load_config
from tinydist.loop.console import Console
from tinydist.data.cache import load_train_val
from tinydist.model.ema import ModelEma
from tinydist.loop.evaluate import evaluate
from tinydist.runtime.exitcodes import EXIT_CRASH, EXIT_OK, EXIT_PREEMPTED, TransientError
from tinydist.runtime.divergence import DivergedError, DivergenceGuard, finite_or_none
from tinydist.export.writer import export_if_changed, exported_weights
from tinydist.data.hostmem import keep_freed_memory
from tinydist.export.labels import class_names
from tinydist.runtime.launch import EXIT_DIR_ENV
from tinydist.ckpt.lease import Lease, claim_storage
from tinydist.data.mix import apply_mix, mix_enabled, soft_cross_entropy
from tinydist.model.build import BNStatistics, build_model, check_first_step
from tinydist.runtime.notice import watch_in_background
from tinydist.model.optim import apply_hyperparameters, build_optimizer, lr_at, set_lr
from tinydist.runtime.peers import Peers, is_peer_failure
from tinydist.model.precise_bn import recompute_bn_statistics
from tinydist.data.prefetch import Prefetcher
from tinydist.runtime.preempt import StopFlag
from tinydist.export.report import curves_png
from tinydist.ckpt.restore import check_resume_state, config_changes, load_resume_point
from tinydist.ckpt.backoff import retry_storage
from tinydist.data.sampler import GlobalSampler
from tinydist.ckpt.storage import Storage, StorageFullError
from tinydist.loop.tracking import RunLog
from tinydist.loop.triggers import Triggers


def train(cfg: Config, stop: Optional[StopFlag] = None) -> int:
    """The run; its exit code. `stop` (default: one of its own, restored on return) is the flag that
    signals set: `main` passes one that stays installed until the exit code is recorded, so a signal
    on the way out (torchrun's agent SIGTERMs the survivors of a lost rank) cannot kill us first."""
    keep_freed_memory()  # see hostmem.py: per-batch page faults otherwise dominate CPU-side work
    accelerator = make_accelerator(cfg)
    console = Console(accelerator.is_main_process, total=0, start=0)
    say = console.say
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    say(f"tinydist: {world} process(es), device {device.type}, precision {accelerator.mixed_precision}")
    asked = requested_processes()
    if asked and asked > world:
        say(f"warning: accelerate was asked for --num_processes {asked} but {world} process(es) formed: add "
            "--multi_gpu (also on a CPU-only machine), or use launch/one_node.sh with NUM_GPUS")
    own_stop = stop is None
    stop = stop or StopFlag(log=say)
    stop.log = say
    peers = Peers(world, rank, cfg.train.peer_timeout_s)
    # Each machine can be preempted on its own: every node's first process watches its own VM's notice;
    # the stop flag is agreed over all ranks at the next step boundary.
    stop_watching = watch_in_background(cfg.preemption.notice if accelerator.is_local_main_process else "off",
                                        stop.request, metadata_url=cfg.preemption.metadata_url,
                                        poll_s=cfg.preemption.poll_s, log=say)
    lease: Optional[Lease] = None
    checkpointer: Optional[Checkpointer] = None
    runlog: Optional[RunLog] = None
    prefetch: Optional[Prefetcher] = None
    exit_code = EXIT_CRASH  # what the teardown reports if anything below raises
    try:
        # Data: decoded once per node, then memory-mapped by every rank.
        try:
            train_data, val_data = load_train_val(cfg.data, accelerator.local_main_process_first, log=say)
        except RuntimeError as e:
            if not stop.requested:
                raise
            # A signal to the whole process group (a relaunch loop, srun) also ends the cache build's
            # workers, which datasets reports as an error. Nothing was trained: nothing is lost.
            say(f"{stop.signal_name} during the decode-cache build ({type(e).__name__}); stopped before "
                f"training, nothing to save: exit {EXIT_PREEMPTED}")
            exit_code = EXIT_PREEMPTED
            return exit_code
        num_classes = len(train_data.classes)
        sampler = GlobalSampler(len(train_data), cfg.train.global_batch_size, cfg.train.micro_batch_size, world,
                                rank, cfg.train.seed)
        accumulation = sampler.accumulation
        total_steps = math.ceil(cfg.train.epochs * sampler.steps_per_epoch)
        last_step = min(total_steps, cfg.train.max_steps or total_steps)
        warmup_steps = round(cfg.optim.warmup_epochs * sampler.steps_per_epoch)
        triggers = Triggers(cfg, sampler.epoch_at, last_step)
        say(f"data: {len(train_data)} train / {len(val_data)} val images, {num_classes} classes; global batch "
            f"{cfg.train.global_batch_size} = {cfg.train.micro_batch_size} x {world} processes x "
            f"{accumulation} accumulation; {sampler.steps_per_epoch:.1f} steps per epoch, {total_steps} "
            "steps in all")

        # Model and optimizer: a pure function of the config and seed; the learning rate, of the step.
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model, num_classes)
        memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
        model = model.to(memory_format=memory_format)
        bare_model = model  # torchvision keys, no DDP/compile wrapper: what checkpoints and eval use
        optimizer = build_optimizer(cfg.optim, model)
        if accelerator.mixed_precision == "fp16":
            raise ConfigError("mixed precision fp16 is not supported: its loss scaler skips steps, so a resumed run "
                              "would not retrace the original; use bf16 (`--mixed_precision bf16`), which needs no "
                              "scaler, or no mixed precision")
        model, optimizer = accelerator.prepare(model, optimizer)
        bn_statistics = BNStatistics(bare_model)
        ema = ModelEma(bare_model, cfg.ema) if cfg.ema.enabled else None
        if cfg.model.compile:
            model = torch.compile(model)

        # Resume: one job per checkpoint dir; tensors from safetensors shards, everything else from JSON.
        lease = claim_storage(cfg, stop, peers, say)
        checkpointer = Checkpointer(config_lib.checkpoint_dir(cfg), keep_last=cfg.checkpoint.keep_last,
                                    max_shard_size=cfg.checkpoint.max_shard_size, rank=rank, world_size=world,
                                    log=say, max_outage_s=cfg.checkpoint.max_outage_s, retry_s=cfg.checkpoint.retry_s,
                                    lease=lease, peers=peers, commit_timeout_s=cfg.train.peer_timeout_s,
                                    best_metric=None if cfg.checkpoint.best_metric == "none" else cfg.checkpoint.best_metric)
        if lease is not None:  # we alone write here now: what earlier jobs left half-written can go
            checkpointer.cleanup(everything_uncommitted=True)
        accelerator.wait_for_everyone()
        step, meta = 0, {}
        guard = DivergenceGuard(step)
        resumed = load_resume_point(cfg, checkpointer, bare_model, optimizer.optimizer, ema and ema.module)
        if resumed is not None:
            path, meta = resumed
            changes = config_changes(path, meta.get("config") or {}, cfg)  # refuses what a resume cannot change
            step = check_resume_state(path, meta, cfg, len(train_data))
            apply_hyperparameters(cfg.optim, bare_model, optimizer.optimizer)  # the config in effect from here on
            if ema is not None and "ema" not in tensor_sets(meta):
                ema.module.load_state_dict(bare_model.state_dict())
                say(f"ema.enabled: {path} kept no average; it starts from the weights at step {step}")
            agreed = accelerator.reduce(torch.tensor([float(step)], device=device), "sum").item()
            if agreed != step * world:  # a damaged file seen by some ranks only: do not train apart
                raise TransientError(f"the processes resumed from different checkpoints (this one: {path}); "
                                     "a relaunch reads them again")
            say(f"resumed from {path} at step {step} (saved by {meta['world_size']} process(es) on "
                f"{meta.get('device')})")
            if changes:
                say(f"config changed since that checkpoint, in effect from step {step}: " + "; ".join(changes))
            checkpointer.last_commit = guard.checked_step = step  # every commit was checked finite
        # The last step's metrics: what the export records when there is no step left to run.
        metrics: dict[str, float] = meta.get("metrics") or {}
        if step >= last_step:  # a rerun of a finished run, or of one whose export was cut short
            say(f"the run is finished (step {step} of {last_step}); completing the export only")
            exit_code = finish(cfg, checkpointer, bare_model, ema, step, metrics, train_data.classes,
                               accelerator.is_main_process, say)
            accelerator.wait_for_everyone()
            return exit_code
        clock = SaveClock(cfg.checkpoint.every_minutes, cfg.checkpoint.mtbf_minutes, say)
        clock.start(checkpointer.estimate_blocked_s(bare_model, optimizer.optimizer) if clock.auto else 0.0)
        runlog = RunLog(accelerator, cfg, meta.get("wandb_run_id"), step if resumed else None, len(train_data))
        if accelerator.is_main_process:
            output = Storage(cfg.train.output_dir)
            retry_storage(lambda: output.write("config.yaml", config_lib.to_yaml(cfg).encode()),
                          f"writing {output.show('config.yaml')}", max_outage_s=cfg.checkpoint.max_outage_s,
                          retry_s=cfg.checkpoint.retry_s, log=say)
        if resumed is not None:
            runlog.event("resumed", step, world_size=world, device=device.type)

        def sync_buffers() -> None:
            # BN statistics are updated in each rank's forward and only broadcast by DDP at the next one:
            # make every rank hold rank 0's before they are evaluated or each rank writes its shards.
            if world > 1:
                for buffer in bare_model.buffers():
                    torch.distributed.broadcast(buffer, src=0)

        def save(blocking: bool, metrics: dict[str, float]) -> None:
            sync_buffers()
            started = time.perf_counter()
            checkpointer.save(step, bare_model, optimizer.optimizer, {
                "epoch": sampler.epoch_at(step), "samples": step * cfg.train.global_batch_size,
                "global_batch_size": cfg.train.global_batch_size, "device": device.type,
                "config": config_lib.to_dict(cfg), "wandb_run_id": runlog.run_id, "metrics": finite_or_none(metrics),
            }, blocking=blocking, ema=ema and ema.module)
            clock.saved(time.perf_counter() - started)

        def validate() -> dict[str, float]:
            """The raw weights (and their average), each with BN statistics for its own weights."""
            sync_buffers()
            reduce_sum = lambda t: accelerator.reduce(t, "sum")  # noqa: E731
            metrics: dict[str, float] = {}
            for prefix, module in (("val", bare_model), ("val_ema", ema and ema.module)):
                if module is None:
                    continue
                if module is not bare_model:
                    ema.take_buffers(bare_model)
                if cfg.eval.precise_bn_images:
                    recompute_bn_statistics(module, train_data, cfg.eval.precise_bn_images, cfg.train.seed, device,
                                            world, rank, reduce_sum, cfg.model.channels_last, accelerator.autocast)
                metrics.update(evaluate(module, val_data, cfg.train.eval_batch_size, device, world, rank, reduce_sum,
                                        cfg.model.channels_last, accelerator.autocast, cfg.eval.flip_tta, prefix))
            runlog.log(metrics, step)
            say(f"step {step} epoch {sampler.epoch_at(step):.2f}: " + "; ".join(
                f"{p} top-1 {metrics[p + '/top1']:.4f} top-5 {metrics[p + '/top5']:.4f} loss {metrics[p + '/loss']:.4f}"
                + (f" (flip TTA top-1 {metrics[p + '/top1_flip']:.4f})" if cfg.eval.flip_tta else "")
                for p in ("val", "val_ema") if p + "/top1" in metrics))
            return metrics

        # The loop: one optimizer step per iteration, `accumulation` micro-batches each; gradients are
        # all-reduced once, on the last micro-batch (no_sync on the others).
        model.train()
        console.start_progress(total=last_step, start=step)  # a live bar in a terminal, a line per 30 s in a log
        loss_sum = torch.zeros((), device=device)
        window_start, window_steps, exit_code = time.perf_counter(), 0, EXIT_OK
        mixing = mix_enabled(cfg.mix)
        prefetch = Prefetcher(train_data, sampler, step, last_step, device, cfg.train.seed, cfg.data.crop_scale,
                              cfg.data.hflip, cfg.mix if mixing else None)
        while step < last_step:
            lr, momentum = lr_at(cfg.optim, step, total_steps, warmup_steps)
            set_lr(optimizer.optimizer, lr, momentum)
            for micro_step in range(accumulation):
                micro = prefetch.next()  # gathered, copied and its crops drawn while the last one computed
                inputs = augment(micro.images, micro.theta, cfg.model.channels_last, cfg.data.image_size)
                counts = micro.index % sampler.micro_batches_per_step == 0  # BN statistics: see model.py
                syncing = micro_step == accumulation - 1
                with contextlib.nullcontext() if syncing else accelerator.no_sync(model):
                    if not counts:
                        bn_statistics.keep()
                    if mixing:
                        inputs, targets = apply_mix(inputs, micro.labels, micro.mix, num_classes,
                                                    cfg.optim.label_smoothing)
                        logits = model(inputs)
                        loss = soft_cross_entropy(logits, targets)
                    else:
                        logits = model(inputs)
                        loss = F.cross_entropy(logits, micro.labels, label_smoothing=cfg.optim.label_smoothing)
                    if step == 0 and micro.index == rank and not mixing:  # first forward of a fresh run
                        check_first_step(logits, loss.item(), num_classes)
                    accelerator.backward(loss / accumulation)
                    if not counts:  # after the backward, which checks the buffers it saw are unchanged
                        bn_statistics.restore()
                loss_sum += loss.detach()
            checkpointer.snapshot_barrier()  # a save may still be copying what this step changes
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(step)
            step += 1
            window_steps += 1

            stopping, faulted, clock_due = stop.agreed(peers, checkpointer.fault is not None, clock.due())
            if faulted:  # saves failed for checkpoint.max_outage_s (relaunch later), or found NaN weights
                fault = checkpointer.fault
                if isinstance(fault, DivergedError):
                    raise guard.error(str(fault), fault.step or step, checkpointer.last_commit)
                raise fault or TransientError("a peer's checkpoint storage has been failing too long")
            shown: dict[str, str] = {}
            if triggers.should_log(step, stopping):
                loss_mean = accelerator.reduce(loss_sum, "mean").item() / (window_steps * accumulation)
                guard.check_loss(loss_mean, step, checkpointer.last_commit)  # read here anyway: no extra sync
                rate = window_steps * cfg.train.global_batch_size / (time.perf_counter() - window_start)
                runlog.log({"train/loss": loss_mean, "train/lr": lr, "train/images_per_s": rate}, step)
                shown = {"loss": f"{loss_mean:.4f}", "lr": f"{lr:.4g}", "img/s": f"{rate:.0f}"}
                loss_sum.zero_()
                window_start, window_steps = time.perf_counter(), 0
            console.progress(step, sampler.epoch_at(step), **shown)
            metrics = validate() if triggers.should_eval(step) else {}
            if triggers.should_save(step, stopping, clock_due):
                try:
                    save(blocking=stopping or step == last_step, metrics=metrics)
                except StorageFullError as e:
                    if stopping:  # nothing saved to stop after: the launcher must back off, not hurry
                        raise TransientError(f"stopping after {stop.signal_name}, but the checkpoint could not be "
                                             f"saved ({e}); a relaunch resumes from the last commit") from e
                    say("warning: no final checkpoint (the disk is full, see above); exporting the model anyway")
                runlog.flush()
            if stopping:
                runlog.event("preempted", step, signal=stop.signal_name)
                say(f"stopped at step {step} after {stop.signal_name}; checkpoint committed, exit {EXIT_PREEMPTED}")
                exit_code = EXIT_PREEMPTED
                break
        console.close()
        prefetch.close()

        try:
            checkpointer.wait()
        except DivergedError as e:  # the last save found what the last log step could not yet see
            raise guard.error(str(e), e.step or step, checkpointer.last_commit) from None
        runlog.flush()  # the curves the export draws are whole
        if exit_code == EXIT_OK:
            exit_code = finish(cfg, checkpointer, bare_model, ema, step, metrics, train_data.classes,
                               accelerator.is_main_process, say)
        accelerator.wait_for_everyone()  # no rank leaves (and gets its peers killed) before the commit
        runlog.finish(preempted=exit_code == EXIT_PREEMPTED)  # last: it ends the process group too
        runlog = None
        return exit_code
    finally:  # whatever escapes: handlers back, the save finished or abandoned, trackers and lease closed
        stop_watching()
        if prefetch is not None:
            prefetch.close()
        if own_stop:
            stop.restore()
        console.close()
        if checkpointer is not None:  # a lost peer's part file never comes: do not wait for it
            escaping = sys.exc_info()[1]
            checkpointer.close(abandon=escaping is not None and is_peer_failure(escaping))
        if runlog is not None:
            try:
                runlog.finish(preempted=False)
            except Exception as e:  # noqa: BLE001 - the original error is the one to report
                say(f"could not close the trackers cleanly: {type(e).__name__}: {e}")
        if lease is not None:
            lease.release()


def finish(cfg: Config, checkpointer: Checkpointer, model: torch.nn.Module, ema: Optional[ModelEma], step: int,
           metrics: dict[str, float], classes: list[str], main_process: bool, say: Callable[[str], None]) -> int:
    """The run's last phase, idempotent: export the model (main process) unless the export in place is
    already exactly this one. Rerun on a finished run, it completes a missing or partial export."""
    if main_process:
        module, provenance = exported_weights(cfg, checkpointer, model, ema, step, metrics)
        model_url = f"{cfg.train.output_dir.rstrip('/')}/model"
        names, curves = class_names(cfg.data, classes), curves_png(cfg.train.output_dir)
        wrote = retry_storage(lambda: export_if_changed(module, model_url, cfg.checkpoint.max_shard_size, cfg=cfg,
                                                        classes=classes, class_names=names, provenance=provenance,
                                                        curves_png=curves),
                              f"exporting the model to {model_url}", max_outage_s=cfg.checkpoint.max_outage_s,
                              retry_s=cfg.checkpoint.retry_s, log=say)
        say(f"done: step {step}; model in {model_url} ({provenance['weights']} weights of the "
            f"{provenance['selected']} checkpoint, step {provenance['step']})"
            + ("" if wrote else "; it was already complete and current, left as it was"))
    return EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    # The stop flag stays installed until the exit code is recorded: a signal on the way out (torchrun's
    # agent SIGTERMs the survivors of a lost rank) must not kill us first.
    stop = StopFlag(log=lambda line: print(line, flush=True))

    def accelerate_note(code: int, message: str) -> None:
        stop.restore()
        if code not in (EXIT_OK, EXIT_PREEMPTED) and not os.environ.get(EXIT_DIR_ENV) \
                and os.environ.get("ACCELERATE_MIXED_PRECISION") is not None:
            print(f"note: `accelerate launch` reports exit {code} as 1 and prints its own traceback below this; "
                  "`tinydist-launch` (the same flags) keeps the code and ends with the error", file=sys.stderr)

    return cli.run(lambda: train(load_config(sys.argv[1:] if argv is None else argv), stop), on_exit=accelerate_note)


if __name__ == "__main__":
    sys.exit(main())

"""Train resnet18 on Tiny ImageNet: one readable loop.

    accelerate launch [accelerate flags] tinydist/train.py --config configs/tiny_imagenet_resnet18.yaml [--a.b=v ...]
    python -m tinydist.train --config configs/smoke.yaml

Devices, process count, precision and nodes come from Accelerate. The trajectory is fixed by the
config alone: a step consumes the same global batch whatever the world size (data/sampler.py), and a
run killed at any moment resumes from its newest committed checkpoint as if it never stopped.
Exit codes: the contract in runtime/exitcodes.py, decided by runtime/cli.py for `main` as for every entry.

Here: `train` (setup -> restore -> loop -> finish) and `train_step` (one optimizer step, the unit that
train and `python -m tinydist.bench` run). The run's state is in loop/run.py; the phases between steps
in loop/validation.py, loop/saving.py and loop/finish.py.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from concurrent.futures import Future
from typing import Callable, Optional, Sequence

if __package__ in (None, ""):  # `accelerate launch tinydist/train.py` runs this file as a script
    # The repository root in place of this file's folder: there, tinydist/ray.py and evaluate.py would be
    # found as the top-level `ray` and `evaluate` by any library that looks for those.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch
import torch.nn.functional as F

from tinydist.ckpt.lease import Lease, claim_storage, confirm_claim, folders_to_create, remove_empty_folders
from tinydist.ckpt.tiers import Tiers
from tinydist.config import Config, load_config
from tinydist.data.augment import augment
from tinydist.data.hostmem import keep_freed_memory
from tinydist.data.mix import apply_mix, soft_cross_entropy
from tinydist.data.prefetch import Ready
from tinydist.export.report import curves_png_in_background
from tinydist.loop.accel import make_accelerator, requested_processes
from tinydist.loop.cadence import SaveClock
from tinydist.loop.console import Console
from tinydist.loop.finish import finish
from tinydist.loop.run import Run, build_run, load_data, open_checkpoints, restore, write_config
from tinydist.loop.saving import save_after_step
from tinydist.loop.timing import Phases
from tinydist.loop.tracking import RunLog
from tinydist.loop.triggers import Triggers
from tinydist.loop.validation import validate
from tinydist.model.build import check_first_step
from tinydist.model.optim import lr_at, set_lr
from tinydist.runtime import cli
from tinydist.runtime.divergence import DivergedError, DivergenceGuard
from tinydist.runtime.exitcodes import EXIT_OK, EXIT_PREEMPTED, TransientError
from tinydist.runtime.launch import EXIT_DIR_ENV
from tinydist.runtime.notice import watch_in_background
from tinydist.runtime.peers import Peers, is_peer_failure
from tinydist.runtime.preempt import StopFlag


def train(cfg: Config, stop: Optional[StopFlag] = None) -> int:
    """The run; its exit code. `stop` (default: one of its own, restored on return) is the flag that
    signals set: `main` passes one that stays installed until the exit code is recorded, so a signal
    on the way out (torchrun's agent SIGTERMs the survivors of a lost rank) cannot kill us first."""
    phases = Phases()  # where the wall time goes: the final line says it (loop/timing.py)
    keep_freed_memory()  # see data/hostmem.py: per-batch page faults otherwise dominate CPU-side work
    accelerator = make_accelerator(cfg)
    console = Console(accelerator.is_main_process, total=0, start=0)
    say = console.say
    world, device = accelerator.num_processes, accelerator.device
    say(f"tinydist: {world} process(es), device {device.type}, precision {accelerator.mixed_precision}")
    asked = requested_processes()
    if asked and asked > world:
        say(f"warning: accelerate was asked for --num_processes {asked} but {world} process(es) formed: add "
            "--multi_gpu (also on a CPU-only machine), or use launch/one_node.sh with NUM_GPUS")
    own_stop = stop is None
    stop = stop or StopFlag(log=say)
    stop.log = say
    peers = Peers(world, accelerator.process_index, cfg.train.peer_timeout_s)
    # Each machine can be preempted on its own: every node's first process watches its own VM's notice;
    # the stop flag is agreed over all ranks at the next step boundary.
    stop_watching = watch_in_background(cfg.preemption.notice if accelerator.is_local_main_process else "off",
                                        stop.request, metadata_url=cfg.preemption.metadata_url,
                                        poll_s=cfg.preemption.poll_s, log=say)
    lease: Optional[Lease] = None
    created: list[str] = []
    tiers: Optional[Tiers] = None
    runlog: Optional[RunLog] = None
    run: Optional[Run] = None
    try:
        # Setup: the storage probe and the lease (one job per checkpoint dir; a second job is refused before
        # the data's decode), the data and the model, loaded and built while the lease's settle window passes.
        # A run that ends before it trains takes back the folders the probe made (see the `finally`).
        created = folders_to_create(cfg) if accelerator.is_main_process else []
        lease = claim_storage(cfg, stop, peers, say, confirm=False)
        with phases.timed("data"):
            data = load_data(cfg, accelerator, stop, say)
        if data is None:
            return EXIT_PREEMPTED
        run = build_run(cfg, accelerator, *data, say=say)
        confirm_claim(lease, stop, peers)  # before any checkpoint is read or written
        tiers = open_checkpoints(run, lease, peers, say)  # checkpoint.dir, and this machine's local tier
        checkpointer = tiers.durable

        # Restore: the newest committed checkpoint, if any. One at the last step is a finished run (or
        # one whose export was cut short): straight to finish, no trackers, no write to the checkpoints.
        state = restore(run, tiers, peers, say)
        resumed = state is not None
        metrics: dict[str, float] = dict(state.metrics) if resumed else {}  # what the export records if no step is left
        guard = DivergenceGuard(run.step)
        if run.step >= run.last_step:
            say(f"the run is finished (step {run.step} of {run.last_step}); completing the export only")
            phases.until_now("start-up")
            exit_code = finish(cfg, checkpointer, run.bare_model, run.ema, run.step, metrics,
                               run.train_data.classes, accelerator.is_main_process, say, phases)
            accelerator.wait_for_everyone()
            tiers.finished()
            return exit_code
        clock = SaveClock.from_config(cfg, say)
        clock.start(checkpointer.estimate_blocked_s(run.bare_model, run.optimizer.optimizer) if clock.auto else 0.0)
        runlog = RunLog(accelerator, cfg, state.wandb_run_id if resumed else None, run.step if resumed else None,
                        len(run.train_data))
        write_config(cfg, accelerator.is_main_process, say)
        if resumed:
            runlog.event("resumed", run.step, world_size=world, device=device.type, **run.resumed)
            if run.resumed.get("lost_steps") is not None:  # known with a local tier: the dashboards show it too
                runlog.log({"resume/lost_steps": run.resumed["lost_steps"]}, run.step)

        # The loop: steps, then what the triggers ask for; the stop flag and the divergence guard.
        triggers = Triggers.for_run(run, say)
        console.start_progress(total=run.last_step, start=run.step)  # a live bar in a terminal, a log line per 30 s
        run.start_loop()
        phases.until_now("start-up")
        exit_code = EXIT_OK
        curves: Optional[Future] = None  # the export's picture, drawn while the last save writes
        while run.step < run.last_step:
            began, saving = time.perf_counter(), tiers.writing()  # a save that ends during the step slowed it too
            lr = train_step(run, before_update=tiers.snapshot_barrier)  # a save may still be copying
            phases.save_drag.step(time.perf_counter() - began, saving=saving or tiers.writing())
            tiers.progress(run.step)
            stopping, faulted, clock_due, local_lost = stop.agreed(peers, tiers.fault is not None, clock.due(),
                                                                   tiers.local_failed)
            if faulted:  # saves failed for checkpoint.max_outage_s (relaunch later), or found NaN weights
                fault = tiers.fault
                if isinstance(fault, DivergedError):
                    raise guard.error(str(fault), fault.step or run.step, tiers.last_commit)
                raise fault or TransientError("a peer's checkpoint storage has been failing too long")
            shown: dict[str, str] = {}
            if triggers.should_log(run.step, stopping):
                loss, rate = run.window.read(accelerator, run.sampler.accumulation, cfg.train.global_batch_size)
                guard.check_loss(loss, run.step, tiers.last_commit)  # read here anyway: no extra sync
                runlog.log({"train/loss": loss, "train/lr": lr, "train/images_per_s": rate}, run.step)
                shown = {"loss": f"{loss:.4f}", "lr": f"{lr:.4g}", "img/s": f"{rate:.0f}"}
            console.progress(run.step, run.sampler.epoch_at(run.step), **shown)
            metrics = {}
            if triggers.should_eval(run.step):
                with phases.timed("validation"):
                    metrics = validate(run, runlog, say)
            durable_due = tiers.lose_local(local_lost) or triggers.should_save(run.step, stopping, clock_due)
            if run.step == run.last_step and not stopping and accelerator.is_main_process:
                runlog.flush()  # the metrics file is whole: the export's picture is drawn while the last save writes
                curves = curves_png_in_background(cfg.train.output_dir)
            with phases.timed("saves"):
                save_after_step(run, tiers, clock, runlog, metrics, durable_due=durable_due, stopping=stopping,
                                signal_name=stop.signal_name, say=say)
            if stopping:
                runlog.event("preempted", run.step, signal=stop.signal_name)
                say(f"stopped at step {run.step} after {stop.signal_name}; checkpoint committed, exit {EXIT_PREEMPTED}")
                exit_code = EXIT_PREEMPTED
                break
        console.close()
        run.close()

        # Finish: the last save committed, then the export (idempotent); trackers closed after the last barrier.
        try:
            with phases.timed("saves"):
                tiers.wait()
        except DivergedError as e:  # the last save found what the last log step could not yet see
            raise guard.error(str(e), e.step or run.step, tiers.last_commit) from None
        runlog.flush()  # the curves the export draws are whole
        if exit_code == EXIT_OK:
            exit_code = finish(cfg, checkpointer, run.bare_model, run.ema, run.step, metrics, run.train_data.classes,
                               accelerator.is_main_process, say, phases, curves)
            runlog.log(phases.as_metrics(), run.step)  # for bench quality; after the export's curves
        accelerator.wait_for_everyone()  # no rank leaves (and gets its peers killed) before the commit
        if exit_code == EXIT_OK:
            tiers.finished()
        runlog.finish(preempted=exit_code == EXIT_PREEMPTED)  # last: it ends the process group too
        runlog = None
        return exit_code
    finally:  # whatever escapes: handlers back, the save finished or abandoned, trackers and lease closed
        stop_watching()
        if run is not None:
            run.close()
        if own_stop:
            stop.restore()
        console.close()
        if tiers is not None:  # a lost peer's part file never comes: do not wait for it
            escaping = sys.exc_info()[1]
            tiers.close(abandon=escaping is not None and is_peer_failure(escaping))
        if runlog is not None:
            try:
                runlog.finish(preempted=False)
            except Exception as e:  # noqa: BLE001 - the original error is the one to report
                say(f"could not close the trackers cleanly: {type(e).__name__}: {e}")
        if lease is not None:
            lease.release()
        if tiers is None:  # nothing was trained or read: the folders the probe made go too, if still empty
            remove_empty_folders(created)


def _no_op() -> None:
    pass


def train_step(run: Run, before_update: Callable[[], None] = _no_op) -> float:
    """One optimizer step of `run` (docs/design.md, "One optimizer step"); the learning rate it used.

    `accumulation` micro-batches, gradients all-reduced once, on the last (no_sync on the others), each
    loss divided by the accumulation count; BN statistics from the step's first global micro-batch only;
    CutMix/MixUp when the config mixes; then the schedule's rate, the update and the EMA. `before_update`
    runs just before the weights change (train: the snapshot barrier of a save still copying them).
    No host sync but step 0's first-loss check: the loss stays summed on the device (`run.window`)."""
    cfg, accelerator, accumulation = run.cfg, run.accelerator, run.sampler.accumulation
    lr, momentum = lr_at(cfg.optim, run.step, run.total_steps, run.warmup_steps)
    set_lr(run.optimizer.optimizer, lr, momentum)
    for micro_step in range(accumulation):
        micro = run.next_micro_batch()
        inputs = augment(micro.images, micro.theta, cfg.model.channels_last, cfg.data.image_size)
        counts = micro.index % run.sampler.micro_batches_per_step == 0  # the BN rule: see model/build.py
        syncing = micro_step == accumulation - 1
        with contextlib.nullcontext() if syncing else accelerator.no_sync(run.model):
            if not counts:
                run.bn_statistics.keep()
            logits, loss = _forward(run, inputs, micro)
            if run.step == 0 and micro.index == run.rank and not run.mixing:  # first forward of a fresh run
                check_first_step(logits, loss.item(), run.num_classes)
            accelerator.backward(loss / accumulation)
            if not counts:  # after the backward, which checks the buffers it saw are unchanged
                run.bn_statistics.restore()
        run.window.loss_sum += loss.detach()
    before_update()
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update(run.step)
    run.step += 1
    run.window.steps += 1
    return lr


def _forward(run: Run, inputs: torch.Tensor, micro: Ready) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, loss) of one micro-batch: mixed with soft targets when the config mixes, else hard labels."""
    smoothing = run.cfg.optim.label_smoothing
    if run.mixing:
        inputs, targets = apply_mix(inputs, micro.labels, micro.mix, run.num_classes, smoothing)
        logits = run.model(inputs)
        return logits, soft_cross_entropy(logits, targets)
    logits = run.model(inputs)
    return logits, F.cross_entropy(logits, micro.labels, label_smoothing=smoothing)


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

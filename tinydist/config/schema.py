"""The run configuration's schema: typed dataclasses, one comment above every field (that comment is
its `--help`), the allowed choices, and small pure functions of a config. No torch here."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from tinydist.runtime.exitcodes import PermanentError

# The one source of this default (checkpoints, the export and the config all use it).
DEFAULT_MAX_SHARD_SIZE = "10MB"


class ConfigError(PermanentError, ValueError):
    """A bad configuration: the message is one line, fit to show the user as is."""


HELP_FLAGS = ("--help", "-h")


@dataclass
class DataConfig:
    # Where the images come from: a hub id, a local folder (hub parquet layout, `save_to_disk`
    # output, or the original tiny-imagenet-200 folder), or `digits` (offline sample, see data.py).
    source: str = "zh-plus/tiny-imagenet"
    # Side of the square images the decoded cache holds and the model sees (Tiny ImageNet is 64).
    image_size: int = 64
    # Split to train on.
    train_split: str = "train"
    # Split to validate on; the hub copy calls it `valid`, a README-less local copy may say `validation`.
    val_split: str = "valid"
    # Where decoded uint8 caches are kept; shared by all runs and ranks of a node.
    cache_dir: str = "~/.cache/tinydist"
    # Use only this many training images (a fixed, class-balanced-by-chance subset); null = all.
    max_train_samples: Optional[int] = None
    # Use only this many validation images; null = all.
    max_val_samples: Optional[int] = None
    # Processes that decode the cache; null = one per CPU core (at most 16).
    num_proc: Optional[int] = None
    # RandomResizedCrop's range of crop area, as fractions of the image (torchvision: 0.08 to 1).
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    # Random horizontal flips in training (off for data where mirroring changes the class).
    hflip: bool = True
    # The training cache keeps up to this many times image_size pixels per side (never more than the
    # source has); each random crop is then resized to image_size once, antialiased, as torchvision's
    # RandomResizedCrop does from the original. 1 = cache at image_size, crops resampled from it.
    train_detail: int = 2


@dataclass
class ModelConfig:
    # `cifar`: 3x3 stride-1 conv, no max-pool (right for 64x64); `imagenet`: torchvision's 7x7/2 + pool.
    stem: str = "cifar"
    # Width of the seed report's extra Linear(512, n) + ReLU before the classifier; 0 = none.
    extra_fc: int = 0
    # Start each residual block's last BN scale at 0, so every block begins as the identity (Goyal et
    # al. 2017; He et al. 2019, "Bag of Tricks"): torchvision's `zero_init_residual`. null = from the
    # run's length: on for schedules of 150 optimizer steps or more (ZERO_INIT_FROM_STEPS; +1.05 points at 563
    # steps, -7.5 at 71: the blocks need steps to grow out of the identity; README, recipe table).
    zero_init_residual: Optional[bool] = None
    # Keep activations in NHWC; faster with tensor cores, harmless elsewhere.
    channels_last: bool = True
    # Wrap the model in torch.compile (on any device; the first steps pay for the compilation).
    compile: bool = False


@dataclass
class OptimConfig:
    # `sgd` (momentum, optional nesterov) or `adamw`.
    name: str = "sgd"
    # Peak learning rate for a global batch of `train.global_batch_size`.
    lr: float = 0.2
    # SGD momentum (AdamW uses it as beta1).
    momentum: float = 0.9
    # Nesterov momentum for SGD.
    nesterov: bool = True
    # Decoupled weight decay for AdamW, L2 for SGD; never applied to BN weights or biases.
    weight_decay: float = 5e-4
    # `cosine` (linear warmup then cosine to zero) or `onecycle` (torch's OneCycleLR).
    schedule: str = "cosine"
    # Warmup length in epochs (for onecycle: the rising phase).
    warmup_epochs: float = 2.0
    # Label smoothing of the cross-entropy loss.
    label_smoothing: float = 0.1


@dataclass
class MixConfig:
    # MixUp: images and targets blended with weight ~ Beta(alpha, alpha); 0 = off (timm recipes: 0.1-0.8).
    mixup_alpha: float = 0.0
    # CutMix: a box of area ~ Beta(alpha, alpha) pasted from another image, targets by area; 0 = off (1.0 usual).
    cutmix_alpha: float = 0.0
    # Probability that a micro-batch is mixed at all.
    prob: float = 1.0
    # With both on: probability that a mixed micro-batch uses CutMix rather than MixUp.
    switch_prob: float = 0.5


@dataclass
class EmaConfig:
    # Keep an exponential moving average of the weights: validated as val_ema/*, saved, exportable.
    enabled: bool = False
    # Decay per optimizer step once warmed up (timm's ModelEmaV3); null = set from `half_life`. A number
    # wins over half_life (recipes and resumed runs that name a decay keep it).
    decay: Optional[float] = None
    # Half-life of the average as a fraction of the run's optimizer steps (train.epochs, not max_steps):
    # decay = 0.5 ** (1 / (half_life x total_steps)), so the window scales with the run; used when decay is null.
    # 0.2 measured best of 0.03-0.35 on 3-epoch photo runs (README, Recipe tools).
    half_life: float = 0.2
    # Warm-up: the decay at step t is min(decay, 1 - (1 + t) ** -warmup_power), so early weights fade
    # fast; 0 = no warm-up. timm: 2/3 for long runs, 3/4 for short ones.
    warmup_power: float = 0.75
    # Average after every this many optimizer steps, the decay compounded over them (and always after the
    # schedule's last step); null = from the half-life: 1/20 of it, 1 to 10 steps (ema-pytorch's update_every,
    # Composer's update_interval). The update reads and writes every parameter twice: ~2.5% of a step on 2 CPU cores.
    update_every: Optional[int] = None


@dataclass
class EvalConfig:
    # Before each validation and the export, recompute BN statistics over this many fixed training images
    # (PreciseBN): running averages lag the weights at high learning rates, and the EMA's weights have none
    # of their own. 0 = keep the running ones. 1024: on photos 512 scored as 2048 at a quarter of the cost, on
    # digits 512 cost the final EMA a point (README, Recipe tools).
    precise_bn_images: int = 1024
    # Also score the mirrored images and average the logits, logged as val/top1_flip (and val_ema/top1_flip).
    flip_tta: bool = False
    # Validate at every this many epoch ends (besides the last step and train.eval_every_steps); 0 = at none:
    # each validation costs PreciseBN plus a pass over the val images, a share of a short run's wall time.
    every_epochs: int = 1
    # Most of the run's compute its validations may take, estimated from image counts (a training image ~3
    # forward passes; a validation: PreciseBN's images + the val images, x2 with flip TTA, per set of weights):
    # epoch-end validations are spaced out evenly to stay within it; the last step's always runs. 0 = no limit.
    # 0.05: ~2.5% of the wall time on a 2-core CPU, where a validation image costs ~1/5 of a training one: a
    # third of the 8% a run may spend beyond its bare steps (README, Benchmarks); 0.1 fitted three validations
    # into a 3-epoch photo run once the smoke recipe had no EMA to score.
    max_share: float = 0.05
    # Which weights a validation scores, in one pass over the images (each batch loaded once): `both` (raw
    # and EMA when ema.enabled), `ema` (the average only: one forward per batch) or `raw`.
    weights: str = "both"


@dataclass
class ExportConfig:
    # Which weights `{train.output_dir}/model` gets: `last` (the end of training) or `best` (the committed
    # checkpoint with the best `checkpoint.best_metric`).
    select: str = "last"
    # `raw` weights or their `ema` (needs ema.enabled).
    weights: str = "raw"


@dataclass
class TrainConfig:
    # Length of the schedule in epochs.
    epochs: float = 100.0
    # Stop after this many optimizer steps (the schedule still spans `epochs`); null = no cap.
    max_steps: Optional[int] = None
    # Images per optimizer step, whatever the number of processes: this fixes the trajectory.
    global_batch_size: int = 512
    # Images per forward pass on one process; accumulation = global / (micro x processes).
    micro_batch_size: int = 128
    # Seed of weights, data order and augmentation.
    seed: int = 0
    # Metrics, resolved config and the final model go here (local path or fsspec URL).
    output_dir: str = "runs/tiny_imagenet_resnet18"
    # Validate every this many steps as well as at each epoch end; null = epoch ends only.
    eval_every_steps: Optional[int] = None
    # Images per forward pass during validation, per process.
    eval_batch_size: int = 256
    # Longest wait for another process (a collective, a barrier, its part of a checkpoint). A peer that
    # died or hung longer ends the run with the transient exit code 69, so the launcher relaunches.
    peer_timeout_s: float = 300.0


@dataclass
class CheckpointConfig:
    # Where checkpoints go (local path or fsspec URL); null = `{train.output_dir}/checkpoints`.
    dir: Optional[str] = None
    # Save every this many optimizer steps (and at each epoch end and on preemption); 0 = only those.
    every_steps: int = 1000
    # Also save every this many minutes by the clock (whichever of this and every_steps comes first):
    # a number, `off`, or `auto`: Young/Daly's sqrt(2 x save cost x mtbf_minutes), the cost measured.
    every_minutes: str = "off"
    # Expected minutes between preemptions, for every_minutes=auto (spot VMs: often 30 to 120).
    mtbf_minutes: float = 60.0
    # Committed checkpoints to keep; older ones are deleted after a newer one is committed.
    keep_last: int = 2
    # Also keep the committed checkpoint with the best value of this validation metric (higher is
    # better), e.g. `val/top1` or `val_ema/top1`; `none` = keep only the last ones.
    best_metric: str = "val/top1"
    # Largest safetensors shard, e.g. `10MB`.
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE
    # `auto`: newest committed checkpoint in `dir` if any; `never`: start fresh; or a checkpoint path.
    resume: str = "auto"
    # Storage faults are retried (training goes on); stop with the transient exit code (69) only when no
    # checkpoint has been committed for this many seconds since the first failure.
    max_outage_s: float = 1800.0
    # First wait before retrying a failed save, doubled after each failure up to 60 s.
    retry_s: float = 2.0
    # One job per `dir`: a lease whose holder has not beaten for this many seconds is taken over
    # (a holder on the same machine whose process is gone: at once). 0 = no lease (not recommended).
    lease_ttl_s: float = 30.0
    # A local tier besides `dir`: a folder on this machine (`/dev/shm/tinydist` or a local NVMe path; size
    # it for about two checkpoints) that gets a checkpoint every `local_every_steps`, so a crash that
    # kills the process but not the machine loses at most one step; null = off. Not an object store,
    # not on the same storage as `dir`: it does not survive the machine, which `dir` covers.
    local_dir: Optional[str] = None
    # Local-tier save every this many optimizer steps (when `local_dir` is set); the durable tier then
    # receives copies of local checkpoints, by `every_steps` / `every_minutes` as without it.
    local_every_steps: int = 1


@dataclass
class LogConfig:
    # Trackers: any of `wandb`, `tensorboard`; empty = none.
    report_to: list[str] = field(default_factory=list)
    # W&B project / TensorBoard run group.
    project: str = "tinydist"
    # Display name of the run; null = the output dir's name.
    run_name: Optional[str] = None
    # Log training metrics every this many optimizer steps.
    every_steps: int = 10
    # Longest a tracker may hold up training, at its start and its end: W&B that cannot start online within
    # this logs offline under the same run id (`wandb sync` later); its final upload stops after this (the
    # rest stays on disk for `wandb sync`). wandb's WANDB_INIT_TIMEOUT / WANDB_FINISH_TIMEOUT apply when shorter.
    tracker_timeout_s: float = 20.0


@dataclass
class PreemptionConfig:
    # Watch the cloud's preemption notice, which comes before (or instead of) SIGTERM: `auto` (detect the
    # cloud in the background; nothing elsewhere), `aws` (spot instance-action, IMDSv2), `gcp`
    # (instance/preempted), `azure` (Preempt scheduled event) or `off`. A notice stops the run like SIGTERM.
    notice: str = "auto"
    # Base URL of the metadata service instead of the provider's own (tests, proxies); null = the provider's.
    metadata_url: Optional[str] = None
    # Seconds between two polls of the metadata service (AWS gives ~2 minutes of notice).
    poll_s: float = 5.0


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    preemption: PreemptionConfig = field(default_factory=PreemptionConfig)


# Values that a type check cannot catch, checked once after merging: key -> allowed values.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.stem": ("cifar", "imagenet"),
    "optim.name": ("sgd", "adamw"),
    "optim.schedule": ("cosine", "onecycle"),
    "preemption.notice": ("off", "auto", "aws", "gcp", "azure"),
    "export.select": ("last", "best"),
    "export.weights": ("raw", "ema"),
    "eval.weights": ("both", "ema", "raw"),
}
TRACKERS = ("wandb", "tensorboard")
POSITIVE = ("data.image_size", "data.train_detail", "train.global_batch_size", "train.micro_batch_size",
            "train.eval_batch_size", "log.every_steps", "checkpoint.keep_last")


def accumulation_steps(global_batch: int, micro_batch: int, world_size: int) -> int:
    """global / (micro x world), or a one-line error saying which micro batch sizes would work.
    Here, not in sampler.py, so that checking a config needs no torch or numpy."""
    if global_batch % (micro_batch * world_size):
        fits = [m for m in range(1, global_batch // world_size + 1) if global_batch % (m * world_size) == 0]
        # With no fitting size, an empty list after a colon would read as a truncated message.
        hint = (f"micro batch sizes that keep it on {world_size} processes: {', '.join(map(str, fits[-8:]))}" if fits
                else f"no micro batch size fits {world_size} processes: it must be a multiple of the process count")
        raise ConfigError(
            f"train.global_batch_size {global_batch} is not a multiple of train.micro_batch_size {micro_batch} "
            f"x {world_size} processes; {hint}")
    return global_batch // (micro_batch * world_size)


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the config, e.g. `train.max_steps`."""
    keys = []
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            keys += all_keys(hint, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def checkpoint_dir(cfg: Config) -> str:
    return cfg.checkpoint.dir or f"{cfg.train.output_dir.rstrip('/')}/checkpoints"


# Where model.zero_init_residual=null turns on. Measured (bench quality, 3 seeds, raw top-1, on minus off):
# digits 71 steps -7.47, 142 -0.67 (2 of 299 images), 284 +0.45; photos-all 12k 188 +4.90, 375 +1.80, 563 +1.05.
ZERO_INIT_FROM_STEPS = 150


def zero_init_residual(cfg: ModelConfig, total_steps: int) -> bool:
    """Whether the residual blocks start as the identity: `model.zero_init_residual` when set, else from
    the schedule's length (a pure function of the config and the data, like the EMA's decay)."""
    if cfg.zero_init_residual is not None:
        return cfg.zero_init_residual
    return total_steps >= ZERO_INIT_FROM_STEPS


def ema_decay(cfg: EmaConfig, total_steps: int) -> float:
    """The EMA's decay once warmed up: `decay` when set, else the one whose half-life is `half_life` of
    the run's `total_steps` (a pure function of the config and the schedule's length)."""
    if cfg.decay is not None:
        return cfg.decay
    return 0.5 ** (1.0 / (cfg.half_life * max(total_steps, 1)))


def ema_update_every(cfg: EmaConfig, decay: float) -> int:
    """Optimizer steps between two EMA updates: `update_every` when set, else 1/20 of the half-life of
    `decay` (each update then moves the average by at most ~3.4%), from 1 to 10 steps."""
    if cfg.update_every is not None:
        return cfg.update_every
    half_life_steps = math.log(0.5) / math.log(decay) if 0 < decay < 1 else 0.0
    return max(1, min(10, int(half_life_steps // 20)))


def get(cfg: Config, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value

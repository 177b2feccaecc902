"""Typed run configuration: dataclasses, YAML recipes, dotted command-line overrides.

    python -m tinydist.train --config configs/smoke.yaml --train.max_steps=20 --optim.lr 0.1
    python -m tinydist.config --help    # every key: section, type, default and the comment above its field

OmegaConf's structured configs do the parsing, merging and type checks; this module only turns
its multi-line exceptions into one line that names the key and suggests the nearest valid one.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import io
import json
import os
import sys
import textwrap
import tokenize
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

# Pure helpers (no torch): loading and checking a config must not import the training stack.
from tinydist.cadence import parse_every_minutes
from tinydist.exitcodes import HelpRequested, PermanentError  # noqa: F401 - HelpRequested: raised here, caught by cli
from tinydist.storage import parse_size

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
    # Decay per optimizer step once warmed up (timm's ModelEmaV3; 0.9998 ~ a 5000-step window).
    decay: float = 0.9998
    # Warm-up: the decay at step t is min(decay, 1 - (1 + t) ** -warmup_power), so early weights fade
    # fast; 0 = no warm-up. timm: 2/3 for long runs, 3/4 for short ones.
    warmup_power: float = 0.75


@dataclass
class EvalConfig:
    # Before each validation and the export, recompute BN statistics over this many fixed training images
    # (PreciseBN): running averages lag the weights at high learning rates. 0 = keep the running ones.
    precise_bn_images: int = 4096
    # Also score the mirrored images and average the logits, logged as val/top1_flip (and val_ema/top1_flip).
    flip_tta: bool = False


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


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    if not close:  # a bare field name given without its section, e.g. `lr`
        close = [k for k in all_keys() if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]][:1]
    return f"; did you mean `{close[0]}`?" if close else f"; valid keys: {', '.join(all_keys())}"


def _one_line(err: OmegaConfBaseException, origin: str) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    msg = str(err).splitlines()[0]
    if type(err).__name__ in ("ConfigKeyError", "ConfigAttributeError") and key:
        return ConfigError(f"{origin}: unknown config key `{key}`{_suggest(key)}")
    if key:
        expected = _expected_type(key)
        return ConfigError(f"{origin}: bad value for `{key}`: {msg}" + (f" (expected {expected})" if expected else ""))
    return ConfigError(f"{origin}: {msg}")


def _expected_type(key: str) -> str:
    hint: Any = Config
    for part in key.split("."):
        hints = typing.get_type_hints(hint) if dataclasses.is_dataclass(hint) else {}
        if part not in hints:
            return ""
        hint = hints[part]
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _argv_to_dotlist(argv: Sequence[str]) -> tuple[Optional[str], list[str]]:
    """Accept `--a.b=v`, `--a.b v` and `--config FILE` / `--config=FILE`."""
    config_file, dotlist = None, []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument `{arg}`: overrides look like --train.max_steps=20")
        body = arg[2:]
        if "=" in body:
            key, value = body.split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, value = body, args[i + 1]
            i += 1
        else:
            raise ConfigError(f"`{arg}` has no value: write {arg}=VALUE")
        if key == "config":
            config_file = value
        else:
            dotlist.append(f"{key}={value}")
        i += 1
    return config_file, dotlist


def load_config(argv: Sequence[str] = (), base: Optional[dict[str, Any]] = None,
                prog: str = "python -m tinydist.train") -> Config:
    """Defaults <- `base` (e.g. a checkpoint's config) <- `--config FILE` (YAML) <- dotted overrides,
    checked and returned as dataclasses. `--help` / `-h` anywhere in `argv` raises `HelpRequested`
    with `help_text(prog)`, whatever else is there."""
    if any(arg in HELP_FLAGS for arg in argv):
        raise HelpRequested(help_text(prog))
    config_file, dotlist = _argv_to_dotlist(argv)
    merged = OmegaConf.structured(Config)
    if base is not None:
        merged = _merge(merged, OmegaConf.create(base), "saved config")
    if config_file is not None:
        try:
            with open(config_file) as f:
                recipe = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config file `{config_file}`: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file `{config_file}` is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(recipe, dict):
            raise ConfigError(f"config file `{config_file}` must hold a mapping of sections, got {type(recipe).__name__}")
        merged = _merge(merged, OmegaConf.create(recipe), config_file)
    for item in dotlist:
        merged = _merge(merged, OmegaConf.from_dotlist([item]), f"override `--{item}`")
    try:
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise _one_line(e, "config") from None
    validate(cfg)
    return cfg


def _merge(base: Any, update: Any, origin: str) -> Any:
    try:
        return OmegaConf.merge(base, update)
    except OmegaConfBaseException as e:
        raise _one_line(e, origin) from None


def get(cfg: Config, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def validate(cfg: Config) -> None:
    for key in ("checkpoint.every_minutes", "preemption.notice"):  # YAML reads a bare `off` as false
        section, name = key.split(".")
        if str(get(cfg, key)).strip().lower() == "false":
            setattr(getattr(cfg, section), name, "off")
    for key, allowed in CHOICES.items():
        if get(cfg, key) not in allowed:
            raise ConfigError(f"bad value for `{key}`: {get(cfg, key)!r}; expected one of {', '.join(allowed)}")
    for key in POSITIVE:
        if get(cfg, key) <= 0:
            raise ConfigError(f"bad value for `{key}`: {get(cfg, key)!r}; expected a positive integer")
    for tracker in cfg.log.report_to:
        if tracker not in TRACKERS:
            raise ConfigError(f"bad value in `log.report_to`: {tracker!r}; expected any of {', '.join(TRACKERS)}")
    accumulation_steps(cfg.train.global_batch_size, cfg.train.micro_batch_size, 1)  # names sizes that would work
    low, high = (cfg.data.crop_scale + [0.0, 0.0])[:2]
    if len(cfg.data.crop_scale) != 2 or not 0 < low <= high <= 1:
        raise ConfigError(f"bad value for `data.crop_scale`: {cfg.data.crop_scale}; expected [low, high] with 0 < low <= high <= 1")
    try:
        parse_size(cfg.checkpoint.max_shard_size)
    except ValueError as e:
        raise ConfigError(f"bad value for `checkpoint.max_shard_size`: {e}") from None
    if cfg.checkpoint.resume not in ("auto", "never") and not cfg.checkpoint.resume.strip():
        raise ConfigError("bad value for `checkpoint.resume`: expected auto, never or a checkpoint path")
    if cfg.model.extra_fc < 0:
        raise ConfigError(f"bad value for `model.extra_fc`: {cfg.model.extra_fc}; expected 0 (none) or a width")
    try:
        parse_every_minutes(cfg.checkpoint.every_minutes)
    except ValueError:
        raise ConfigError(f"bad value for `checkpoint.every_minutes`: {cfg.checkpoint.every_minutes!r}; expected "
                          "a positive number of minutes, `off` or `auto`") from None
    if not cfg.checkpoint.mtbf_minutes > 0:
        raise ConfigError(f"bad value for `checkpoint.mtbf_minutes`: {cfg.checkpoint.mtbf_minutes!r}; expected minutes > 0")
    if not cfg.preemption.poll_s > 0:
        raise ConfigError(f"bad value for `preemption.poll_s`: {cfg.preemption.poll_s!r}; expected seconds > 0")
    if not cfg.log.tracker_timeout_s > 0:
        raise ConfigError(f"bad value for `log.tracker_timeout_s`: {cfg.log.tracker_timeout_s!r}; expected seconds > 0")
    if not cfg.train.peer_timeout_s > 0:
        raise ConfigError(f"bad value for `train.peer_timeout_s`: {cfg.train.peer_timeout_s!r}; expected seconds > 0")
    for key in ("checkpoint.max_outage_s", "checkpoint.retry_s", "checkpoint.lease_ttl_s"):
        if not get(cfg, key) >= 0:
            raise ConfigError(f"bad value for `{key}`: {get(cfg, key)!r}; expected a number of seconds >= 0")
    if cfg.optim.lr <= 0 or cfg.train.epochs <= 0:
        raise ConfigError("`optim.lr` and `train.epochs` must be positive")
    for key in ("mix.mixup_alpha", "mix.cutmix_alpha", "eval.precise_bn_images"):
        if not get(cfg, key) >= 0:
            raise ConfigError(f"bad value for `{key}`: {get(cfg, key)!r}; expected a number >= 0 (0 = off)")
    for key in ("mix.prob", "mix.switch_prob"):
        if not 0 <= get(cfg, key) <= 1:
            raise ConfigError(f"bad value for `{key}`: {get(cfg, key)!r}; expected a probability in [0, 1]")
    if not 0 < cfg.ema.decay < 1 or not cfg.ema.warmup_power >= 0:
        raise ConfigError(f"bad value for `ema.decay` / `ema.warmup_power`: {cfg.ema.decay!r} / "
                          f"{cfg.ema.warmup_power!r}; expected 0 < decay < 1 and warmup_power >= 0")
    if cfg.export.weights == "ema" and not cfg.ema.enabled:
        raise ConfigError("export.weights=ema but ema.enabled=false; set --ema.enabled=true or --export.weights=raw")
    if cfg.export.select == "best" and cfg.checkpoint.best_metric == "none":
        raise ConfigError("export.select=best but checkpoint.best_metric=none; name a metric "
                          "(e.g. --checkpoint.best_metric=val/top1) or use --export.select=last")
    if cfg.checkpoint.best_metric.startswith("val_ema/") and not cfg.ema.enabled:
        raise ConfigError(f"checkpoint.best_metric={cfg.checkpoint.best_metric} but ema.enabled=false; "
                          "use val/top1 or --ema.enabled=true")


# ---------------------------------------------------------------------------------------------
# `--help`: every key with its type, default and the comment above its field (read from this source)


@functools.lru_cache(maxsize=None)
def field_comments(cls: type) -> dict[str, str]:
    """{field: the comment lines directly above it, joined} of dataclass `cls`, read from its source;
    {} when the source cannot be read (e.g. only .pyc files installed)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
        tree = ast.parse(source)
        lines = source.splitlines()
        own_line = {}  # row -> text of a comment that is alone on its line
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT and not lines[tok.start[0] - 1][:tok.start[1]].strip():
                own_line[tok.start[0]] = tok.string.lstrip("#").strip()
    except (OSError, TypeError, SyntaxError, tokenize.TokenError):
        return {}
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef)), None)
    comments: dict[str, str] = {}
    for item in node.body if node else []:
        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            row, parts = item.lineno - 1, []
            while row in own_line:
                parts.insert(0, own_line[row])
                row -= 1
            comments[item.target.id] = " ".join(p for p in parts if p)
    return comments


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union:
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names + (["null"] if type(None) in args else []))
    if typing.get_origin(hint) is list:
        return f"list of {_type_name(args[0])}" if args else "list"
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


def _show(value: Any) -> str:
    """A default as it would be written on the command line or in a recipe."""
    if isinstance(value, str):
        return value if value and value.strip() == value else json.dumps(value)
    return json.dumps(value)


def _recipes_line() -> str:
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith((".yaml", ".yml")))
    except OSError:
        names = []
    if not names:
        return "Recipes (YAML, one mapping per section) live in configs/ of the tinydist repository."
    where = os.path.relpath(folder) if folder.startswith(os.getcwd() + os.sep) else folder
    shown = [f"{n} (offline, no download)" if n == "smoke.yaml" else n for n in names]
    return f"Recipes (YAML, one mapping per section) live in {where}/: {', '.join(shown)}."


def help_text(prog: str, usage: str = "", about: str = "") -> str:
    """What `--help` prints: usage, where recipes live, then every key by section (in the order of
    `Config`), each with its type, default and the comment above its field. `usage`, if given,
    replaces the first usage line (an entry point with options of its own); `about` comes first
    after the usage lines."""
    width = 100

    def wrap(text: str, indent: str = "") -> list[str]:
        return textwrap.wrap(text, width, initial_indent=indent, subsequent_indent=indent,
                             break_long_words=False, break_on_hyphens=False)

    out = [f"usage: {usage or f'{prog} --config FILE [--section.key=VALUE ...]'}",
           f"       {prog} --config FILE [--section.key VALUE ...]", ""]
    if about:
        out += wrap(about) + [""]
    for paragraph in (
            "A run is one typed config: the defaults below <- the YAML recipe given with --config <- the "
            "--section.key overrides, left to right (a later one wins). Values are YAML: "
            "--train.max_steps=null, --log.report_to=[tensorboard,wandb].",
            _recipes_line(),
            "Print the resolved config without running: python -m tinydist.config --config FILE "
            "[--section.key=VALUE ...]",
            "Exit codes: 0 done, 2 bad config/data/checkpoint (do not relaunch), 69 transient, 75 stopped "
            "after a checkpoint; see README.md \"Exit codes\"."):
        out += wrap(paragraph)
    defaults = Config()
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        comments = field_comments(cls)
        out += ["", f"[{section.name}]"]
        for name, hint in typing.get_type_hints(cls).items():
            key = f"{section.name}.{name}"
            out.append(f"  {key}: {_type_name(hint)} = {_show(get(defaults, key))}")
            text = comments.get(name, "")
            allowed = CHOICES.get(key) or (TRACKERS if key == "log.report_to" else ())
            if any(f"`{a}`" not in text for a in allowed):  # the comment does not name them all
                text += f" {'Any' if key == 'log.report_to' else 'One'} of: {', '.join(allowed)}."
            out += wrap(text.strip(), " " * 6)
    return "\n".join(out) + "\n"


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def checkpoint_dir(cfg: Config) -> str:
    return cfg.checkpoint.dir or f"{cfg.train.output_dir.rstrip('/')}/checkpoints"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print the resolved config: python -m tinydist.config --config X --a.b=v"""
    from tinydist import cli

    def show() -> int:
        print(to_yaml(load_config(sys.argv[1:] if argv is None else argv, prog="python -m tinydist.config")), end="")
        return 0

    return cli.run(show)


if __name__ == "__main__":
    sys.exit(main())

"""Loading a config: defaults <- `--config FILE` (YAML) <- dotted overrides, then `validate`.

OmegaConf's structured configs do the parsing, merging and type checks; this module only turns
its multi-line exceptions into one line that names the key and suggests the nearest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Optional, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

# Pure helpers (no torch): loading and checking a config must not import the training stack.
from tinydist.config.units import parse_size
from tinydist.config.help import help_text
from tinydist.config.schema import (CHOICES, HELP_FLAGS, POSITIVE, TRACKERS, Config, ConfigError, accumulation_steps,
                                    all_keys, get)
from tinydist.config.units import parse_every_minutes
from tinydist.runtime.exitcodes import HelpRequested

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
    return _in_words(hint)


_WORDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}


def _in_words(hint: Any) -> str:
    """A field's type as a user writes its values (`true or false, or null`), not as Python spells it."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union and len(args) == 1:
        return f"{_in_words(args[0])}, or null"
    if typing.get_origin(hint) is list and len(args) == 1:
        return f"a list such as [a, b], each {_in_words(args[0])}"
    if hint in _WORDS:
        return _WORDS[hint]
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
    local = cfg.checkpoint.local_dir
    if local is not None and (not local.strip() or ("://" in local and not local.startswith("file://"))):
        raise ConfigError(f"bad value for `checkpoint.local_dir`: {local!r}; expected a folder on this machine such "
                          "as /dev/shm/tinydist or a local NVMe path (the durable tier, checkpoint.dir, takes URLs)")
    if cfg.checkpoint.local_every_steps < 1:
        raise ConfigError(f"bad value for `checkpoint.local_every_steps`: {cfg.checkpoint.local_every_steps!r}; "
                          "expected a number of steps >= 1")
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
    if cfg.ema.decay is not None and not 0 < cfg.ema.decay < 1 or not cfg.ema.warmup_power >= 0:
        raise ConfigError(f"bad value for `ema.decay` / `ema.warmup_power`: {cfg.ema.decay!r} / "
                          f"{cfg.ema.warmup_power!r}; expected 0 < decay < 1 (or null: from ema.half_life) and "
                          "warmup_power >= 0")
    if cfg.ema.update_every is not None and not (isinstance(cfg.ema.update_every, int) and cfg.ema.update_every >= 1):
        raise ConfigError(f"bad value for `ema.update_every`: {cfg.ema.update_every!r}; expected a whole number of "
                          "optimizer steps >= 1, or null (from ema.half_life)")
    if not 0 < cfg.ema.half_life <= 1:
        raise ConfigError(f"bad value for `ema.half_life`: {cfg.ema.half_life!r}; expected a fraction of the run's "
                          "steps in (0, 1], e.g. 0.1 (ema.decay, when set, wins over it)")
    if cfg.eval.every_epochs < 0:
        raise ConfigError(f"bad value for `eval.every_epochs`: {cfg.eval.every_epochs!r}; expected a number of epochs "
                          ">= 0 (0 = validate at the last step and train.eval_every_steps only)")
    if not 0 <= cfg.eval.max_share <= 1:
        raise ConfigError(f"bad value for `eval.max_share`: {cfg.eval.max_share!r}; expected a fraction of the run's "
                          "compute in [0, 1], e.g. 0.1 (0 = validate at every eval.every_epochs-th epoch end)")
    if cfg.eval.weights == "ema" and not cfg.ema.enabled:
        raise ConfigError("eval.weights=ema but ema.enabled=false; set --ema.enabled=true or --eval.weights=both")
    scored = {"both": ("val/", "val_ema/"), "ema": ("val_ema/",), "raw": ("val/",)}[cfg.eval.weights]
    if cfg.eval.weights not in ("both", cfg.export.weights):  # the export's weights get their BN statistics there
        raise ConfigError(f"export.weights={cfg.export.weights} but eval.weights={cfg.eval.weights}: the exported "
                          f"weights must be validated; set --eval.weights={cfg.export.weights} or both")
    best = cfg.checkpoint.best_metric
    if best.startswith(("val/", "val_ema/")) and not best.startswith(scored):
        raise ConfigError(f"checkpoint.best_metric={best} is not validated with "
                          f"eval.weights={cfg.eval.weights}; name a {' or '.join(p + 'top1' for p in scored)} metric "
                          "or set --eval.weights=both")
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print the resolved config: python -m tinydist.config --config X --a.b=v"""
    import sys

    from tinydist.config.schema import to_yaml
    from tinydist.runtime import cli

    def show() -> int:
        print(to_yaml(load_config(sys.argv[1:] if argv is None else argv, prog="python -m tinydist.config")), end="")
        return 0

    return cli.run(show)

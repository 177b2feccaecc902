"""Typed run configuration: dataclasses (schema.py), YAML recipes and dotted overrides (load.py),
`--help` from the fields' comments (help.py).

    python -m tinydist.train --config configs/smoke.yaml --train.max_steps=20 --optim.lr 0.1
    python -m tinydist.config --help    # every key: section, type, default and the comment above its field

What the rest of tinydist reads of a config is imported from here: the package is its interface.
"""

from tinydist.config.help import help_text
from tinydist.config.load import load_config, main, validate
from tinydist.config.schema import (CHOICES, DEFAULT_MAX_SHARD_SIZE, HELP_FLAGS, TRACKERS, CheckpointConfig, Config,
                                    ConfigError, DataConfig, EmaConfig, EvalConfig, ExportConfig, LogConfig,
                                    MixConfig, ModelConfig, OptimConfig, PreemptionConfig, TrainConfig,
                                    ZERO_INIT_FROM_STEPS, accumulation_steps, all_keys, checkpoint_dir, ema_decay,
                                    ema_update_every, get, to_dict, to_yaml, zero_init_residual)
from tinydist.runtime.exitcodes import HelpRequested

__all__ = ["CHOICES", "DEFAULT_MAX_SHARD_SIZE", "HELP_FLAGS", "TRACKERS", "CheckpointConfig", "Config", "ConfigError",
           "DataConfig", "EmaConfig", "EvalConfig", "ExportConfig", "HelpRequested", "LogConfig", "MixConfig",
           "ModelConfig", "OptimConfig", "PreemptionConfig", "TrainConfig", "ZERO_INIT_FROM_STEPS",
           "accumulation_steps", "all_keys", "checkpoint_dir", "ema_decay", "ema_update_every", "get", "help_text",
           "load_config", "main", "to_dict", "to_yaml", "validate", "zero_init_residual"]

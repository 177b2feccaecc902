"""tinydist.config: recipes, both override forms, typed values, one-line errors with suggestions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tinydist.config import (Config, ConfigError, accumulation_steps, all_keys, checkpoint_dir, get, load_config, to_dict,
                             to_yaml)
from tinydist.data.sampler import GlobalSampler

REPO = Path(__file__).resolve().parents[3]
SMOKE = str(REPO / "configs" / "smoke.yaml")
RECIPES = sorted(p for p in (REPO / "configs").glob("*.yaml"))  # not configs/accelerate/: those are accelerate's

PUBLIC_KEYS = """
data.source data.image_size data.train_split data.val_split data.cache_dir data.max_train_samples
data.max_val_samples model.stem model.extra_fc optim.name optim.lr optim.momentum optim.weight_decay
optim.schedule optim.warmup_epochs optim.label_smoothing train.epochs train.max_steps
train.global_batch_size train.micro_batch_size train.seed train.output_dir train.eval_every_steps
checkpoint.dir checkpoint.every_steps checkpoint.keep_last checkpoint.max_shard_size checkpoint.resume
log.report_to log.project log.run_name log.every_steps
""".split()


def error(argv: list[str]) -> str:
    """The ConfigError message of `argv`, checked to be one line."""
    with pytest.raises(ConfigError) as e:
        load_config(argv)
    message = str(e.value)
    assert message and "\n" not in message
    return message


# ---- recipes and keys -------------------------------------------------------------------------------------


def test_there_are_recipes():
    names = {p.name for p in RECIPES}
    assert {"smoke.yaml", "tiny_imagenet_resnet18.yaml"} <= names
    assert not any("accelerate" in str(p.relative_to(REPO / "configs")) for p in RECIPES)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_and_applies_its_values(recipe):
    cfg = load_config(["--config", str(recipe)])
    assert isinstance(cfg, Config)
    with open(recipe) as f:
        raw = yaml.safe_load(f)
    for section, values in raw.items():  # every value of the file made it into the typed config
        for key, value in values.items():
            got = get(cfg, f"{section}.{key}")
            assert got == value, f"{recipe.name}: {section}.{key} = {got!r}, file says {value!r}"
    # and the round trip through to_yaml gives the same config back
    assert to_dict(load_config(base=yaml.safe_load(to_yaml(cfg)))) == to_dict(cfg)


def test_public_keys_exist_with_their_types():
    keys = set(all_keys())
    missing = [k for k in PUBLIC_KEYS if k not in keys]
    assert not missing
    cfg = load_config([])
    for key in PUBLIC_KEYS:
        get(cfg, key)
    assert isinstance(cfg.data.image_size, int) and isinstance(cfg.optim.lr, float)
    assert isinstance(cfg.log.report_to, list) and cfg.train.max_steps is None
    assert cfg.data.val_split == "valid"  # the hub copy's name for it


# ---- overrides --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["--config", SMOKE, "--train.max_steps=20"],
    ["--config", SMOKE, "--train.max_steps", "20"],
    [f"--config={SMOKE}", "--train.max_steps", "20"],
    ["--train.max_steps=20", "--config", SMOKE],  # the file is the base whatever the order
])
def test_both_override_forms(argv):
    cfg = load_config(argv)
    assert cfg.train.max_steps == 20 and isinstance(cfg.train.max_steps, int)
    assert cfg.data.source == "digits" and cfg.train.micro_batch_size == 32  # the rest is the recipe's


def test_overrides_are_typed_and_later_ones_win():
    cfg = load_config(["--config", SMOKE, "--optim.lr", "0.125", "--model.channels_last=true", "--train.seed=3",
                       "--train.seed", "-4", "--checkpoint.dir=s3://bucket/run", "--data.max_train_samples=null"])
    assert cfg.optim.lr == 0.125 and cfg.model.channels_last is True and cfg.train.seed == -4
    assert cfg.data.max_train_samples is None and checkpoint_dir(cfg) == "s3://bucket/run"
    assert checkpoint_dir(load_config(["--train.output_dir=runs/x/"])) == "runs/x/checkpoints"


@pytest.mark.parametrize("argv", [["--log.report_to=[wandb,tensorboard]"], ["--log.report_to", "[wandb,tensorboard]"]])
def test_list_override(argv):
    assert load_config(["--config", SMOKE, *argv]).log.report_to == ["wandb", "tensorboard"]
    assert load_config(["--log.report_to=[]"]).log.report_to == []


def test_base_config_sits_under_the_file_and_overrides():
    base = {"train": {"seed": 7, "max_steps": 3}, "optim": {"lr": 0.01}}
    cfg = load_config(["--config", SMOKE, "--train.max_steps=9"], base=base)
    assert cfg.train.seed == 7  # from base: smoke.yaml says nothing about the seed
    assert cfg.optim.lr == 0.05  # the file beats base
    assert cfg.train.max_steps == 9  # the override beats both


# ---- one-line errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, key, suggestion", [
    (["--config", SMOKE, "--train.max_step=5"], "train.max_step", "train.max_steps"),
    (["--train.max_step", "5"], "train.max_step", "train.max_steps"),
    (["--optim.lrr=0.1"], "optim.lrr", "optim.lr"),
    (["--lr=0.1"], "lr", "optim.lr"),  # a bare field name: its section is suggested
    (["--model.stem_type=cifar"], "model.stem_type", "model.stem"),
])
def test_unknown_key_names_it_and_suggests_the_nearest(argv, key, suggestion):
    message = error(argv)
    assert f"unknown config key `{key}`" in message
    assert message.endswith(f"did you mean `{suggestion}`?")


def test_unknown_key_in_a_recipe_names_the_file(tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("train:\n  max_step: 5\n")
    message = error(["--config", str(recipe)])
    assert str(recipe) in message and "`train.max_step`" in message and "`train.max_steps`" in message


@pytest.mark.parametrize("argv, key, expected", [
    (["--train.max_steps=abc"], "train.max_steps", "a whole number, or null"),
    (["--optim.lr", "fast"], "optim.lr", "a number"),
    (["--model.channels_last=maybe"], "model.channels_last", "true or false"),
    (["--model.zero_init_residual=maybe"], "model.zero_init_residual", "true or false, or null"),
    (["--train.global_batch_size=1.5"], "train.global_batch_size", "a whole number"),
    (["--data.crop_scale=x"], "data.crop_scale", "a list such as [a, b], each a number"),
])
def test_wrong_type_is_one_line_in_the_words_of_a_value(argv, key, expected):
    message = error(argv)
    assert f"bad value for `{key}`" in message and message.endswith(f"(expected {expected})"), message
    assert "Optional" not in message and "typing" not in message


def test_wrong_type_in_a_recipe(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("optim:\n  lr: [0.1]\n")
    message = error(["--config", str(recipe)])
    assert str(recipe) in message and "`optim.lr`" in message


@pytest.mark.parametrize("argv, fragment", [
    (["--model.stem=resnet"], "`model.stem`: 'resnet'; expected one of cifar, imagenet"),
    (["--optim.name=adam"], "`optim.name`: 'adam'; expected one of sgd, adamw"),
    (["--optim.schedule=linear"], "`optim.schedule`"),
    (["--log.report_to=[mlflow]"], "'mlflow'; expected any of wandb, tensorboard"),
    (["--data.image_size=0"], "`data.image_size`"),
    (["--data.crop_scale=[0.5,0.2]"], "`data.crop_scale`"),
    (["--model.extra_fc=-1"], "`model.extra_fc`"),
    (["--optim.lr=0"], "`optim.lr`"),
    (["--eval.max_share=5"], "`eval.max_share`: 5.0; expected a fraction of the run's compute in [0, 1]"),
])
def test_values_a_type_cannot_check(argv, fragment):
    assert fragment in error(argv)


# ---- batch arithmetic: global batch = micro batch x processes x accumulation ---------------------------------
# The one unit test of it; tests/test_train.py has the one end-to-end test of the message a user reads
# (2 processes through the launcher).


@pytest.mark.parametrize("global_batch, micro_batch, world_size, expected", [
    (512, 64, 1, 8), (512, 64, 8, 1), (64, 32, 2, 1), (16, 8, 1, 2), (16, 8, 2, 1), (512, 512, 1, 1),
    (64, 24, 1, "fits"), (16, 16, 2, "fits"), (16, 12, 1, "fits"), (512, 48, 2, "fits"), (512, 128, 8, "fits"),
    (96, 7, 1, "fits"), (100, 10, 3, "nothing fits"), (4, 1, 8, "nothing fits"),
])
def test_batch_arithmetic(global_batch, micro_batch, world_size, expected):
    """accumulation = global / (micro x processes), or one line naming both sizes and the process count
    that lists the largest micro batch sizes that would fit (each of them really fits), or says that none
    can. The config check (one process) and GlobalSampler (any count) apply the same rule."""
    if isinstance(expected, int):
        assert accumulation_steps(global_batch, micro_batch, world_size) == expected
        assert GlobalSampler(1000, global_batch, micro_batch, world_size).accumulation == expected
        return
    with pytest.raises(ConfigError) as e:
        accumulation_steps(global_batch, micro_batch, world_size)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"train.global_batch_size {global_batch} is not a multiple of "
                              f"train.micro_batch_size {micro_batch} x {world_size} processes; "), message
    with pytest.raises(ConfigError):
        GlobalSampler(1000, global_batch, micro_batch, world_size)
    if expected == "nothing fits":  # an empty list after a colon would read as a truncated message
        assert global_batch % world_size
        assert message.endswith(f"no micro batch size fits {world_size} processes: it must be a multiple of the "
                                "process count"), message
        return
    head, listed = message.rsplit(": ", 1)
    assert head.endswith(f"micro batch sizes that keep it on {world_size} processes"), message
    sizes = [int(x) for x in listed.split(", ")]
    fitting = [m for m in range(1, global_batch + 1) if global_batch % (m * world_size) == 0]
    assert sizes == fitting[-len(sizes):] and 0 < len(sizes) <= 8, message  # the largest ones, ascending
    for m in sizes:
        assert accumulation_steps(global_batch, m, world_size) * m * world_size == global_batch
    assert micro_batch not in sizes and max(sizes) == global_batch // world_size
    if world_size == 1:  # a recipe is checked on load, for one process (the count is only known at launch)
        argv = [f"--train.global_batch_size={global_batch}", f"--train.micro_batch_size={micro_batch}"]
        assert error(argv) == message


def test_choices_accept_every_allowed_value():
    assert load_config(["--model.stem=imagenet"]).model.stem == "imagenet"
    assert load_config(["--model.stem", "cifar"]).model.stem == "cifar"
    assert load_config(["--optim.name=adamw", "--optim.schedule=onecycle"]).optim.name == "adamw"


@pytest.mark.parametrize("argv, fragment", [
    (["train.max_steps=3"], "unexpected argument `train.max_steps=3`"),
    (["--train.max_steps"], "`--train.max_steps` has no value"),
    (["--train.max_steps", "--optim.lr=1"], "`--train.max_steps` has no value"),
    (["--config", "/no/such/recipe.yaml"], "cannot read config file `/no/such/recipe.yaml`"),
])
def test_malformed_command_lines(argv, fragment):
    assert fragment in error(argv)


def test_invalid_yaml_and_non_mapping(tmp_path):
    (tmp_path / "broken.yaml").write_text("train: [1, 2\n")
    assert "is not valid YAML" in error(["--config", str(tmp_path / "broken.yaml")])
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    assert "must hold a mapping" in error(["--config", str(tmp_path / "list.yaml")])


def test_cli_prints_the_resolved_config_or_one_error_line():
    ok = subprocess.run([sys.executable, "-m", "tinydist.config", "--config", SMOKE, "--train.max_steps", "20"],
                        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert yaml.safe_load(ok.stdout)["train"]["max_steps"] == 20
    bad = subprocess.run([sys.executable, "-m", "tinydist.config", "--train.max_step=20"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and "did you mean `train.max_steps`" in bad.stderr

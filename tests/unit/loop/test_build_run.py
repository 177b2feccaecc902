"""A run's model as `build_run` makes it: `model.zero_init_residual: null` resolved from the schedule's length."""

import pytest

from tinydist import config as config_lib
from tinydist.bench.common import SMOKE_RECIPE
from tinydist.data.cache import load_train_val
from tinydist.loop.accel import make_accelerator
from tinydist.loop.run import build_run


@pytest.fixture(scope="module")
def digits(cache_dir):
    cfg = config_lib.load_config(["--config", SMOKE_RECIPE, f"--data.cache_dir={cache_dir}"])
    return cfg, load_train_val(cfg.data, log=lambda _: None)


def _residual_scales(digits, *overrides: str) -> tuple[int, list[float], list[str]]:
    base, data = digits
    cfg = config_lib.load_config(["--config", SMOKE_RECIPE, f"--data.cache_dir={base.data.cache_dir}", *overrides])
    said: list[str] = []
    run = build_run(cfg, make_accelerator(cfg), *data, say=said.append)
    scales = [m.bn2.weight.abs().max().item() for m in run.bare_model.modules() if hasattr(m, "bn2")]
    assert len(scales) == 8  # resnet18's basic blocks
    return run.total_steps, scales, said


def test_a_run_long_enough_starts_its_blocks_as_the_identity_and_says_so(digits):
    threshold = config_lib.ZERO_INIT_FROM_STEPS
    steps_per_epoch = _residual_scales(digits, "--train.epochs=1")[0]
    short_epochs = (threshold - 1) // steps_per_epoch  # the longest whole-epoch schedule below the threshold
    steps, scales, said = _residual_scales(digits, f"--train.epochs={short_epochs}")
    assert steps < threshold and all(s == 1.0 for s in scales), (steps, scales)
    assert not any("identity" in line for line in said)

    steps, scales, said = _residual_scales(digits, f"--train.epochs={short_epochs + 1}")
    assert steps >= threshold and all(s == 0.0 for s in scales), (steps, scales)
    assert [line for line in said if "identity" in line] == [
        f"model: residual blocks start as the identity ({steps} steps >= {threshold}; "
        "model.zero_init_residual=false keeps torchvision's init)"]

    # Set in the config, it wins over the length.
    assert all(s == 1.0 for s in _residual_scales(digits, f"--train.epochs={short_epochs + 1}",
                                                  "--model.zero_init_residual=false")[1])
    assert all(s == 0.0 for s in _residual_scales(digits, "--train.epochs=1", "--model.zero_init_residual=true")[1])

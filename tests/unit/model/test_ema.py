"""tinydist.model.ema: timm-style decay with warm-up, one foreach update, buffers taken from the model."""

from __future__ import annotations

import pytest
import torch

from tinydist.config import EmaConfig, ModelConfig
from tinydist.model.ema import ModelEma
from tinydist.model.build import build_model


def small_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(stem="imagenet", channels_last=False), 10)


def test_decay_warms_up_from_zero_to_the_cap() -> None:
    ema = ModelEma(small_model(), EmaConfig(enabled=True, decay=0.999, warmup_power=0.75))
    decays = [ema.decay_at(step) for step in (0, 1, 10, 100, 10**6)]
    assert decays[0] == 0.0  # the first update makes the average the weights themselves
    assert decays == sorted(decays) and decays[-1] == 0.999
    assert decays[2] == pytest.approx(1 - 11 ** -0.75)
    flat = ModelEma(small_model(), EmaConfig(enabled=True, decay=0.99, warmup_power=0.0))
    assert flat.decay_at(0) == flat.decay_at(10**6) == 0.99


def test_update_is_the_exponential_average_of_the_parameters_only() -> None:
    model = small_model()
    ema = ModelEma(model, EmaConfig(enabled=True, decay=0.9, warmup_power=0.0))
    history = []
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * (step + 1))
            model.bn1.running_mean.add_(1.0)  # buffers are not averaged (see ema.py)
        history.append({k: v.clone() for k, v in model.named_parameters()})
        ema.update(step)
    start = {k: v for k, v in small_model().named_parameters()}
    for name, averaged in ema.module.named_parameters():
        expected = start[name].detach().clone()
        for snapshot in history:
            expected = expected + 0.1 * (snapshot[name] - expected)
        torch.testing.assert_close(averaged, expected, rtol=1e-6, atol=1e-7)
        assert not averaged.requires_grad
    assert torch.equal(ema.module.bn1.running_mean, torch.zeros(64))
    ema.take_buffers(model)
    assert torch.equal(ema.module.bn1.running_mean, model.bn1.running_mean)


def test_first_update_with_warmup_copies_the_weights_and_leaves_the_model_alone() -> None:
    model = small_model()
    ema = ModelEma(model, EmaConfig(enabled=True))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ema.update(0)
    for (name, mine), theirs in zip(ema.module.named_parameters(), model.parameters()):
        assert torch.equal(mine, theirs), name
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert ema.module.state_dict().keys() == model.state_dict().keys()  # torchvision keys: exportable as is


def test_half_life_sets_the_decay_from_the_run_s_length_and_keeps_the_warm_up() -> None:
    from tinydist.config import ema_decay, load_config

    cfg = EmaConfig(enabled=True, half_life=0.1, warmup_power=0.75)
    for total in (100, 1000, 250_000):
        decay = ema_decay(cfg, total)
        assert decay ** (0.1 * total) == pytest.approx(0.5)  # the average halves its weight over 10% of the run
        ema = ModelEma(small_model(), cfg, total_steps=total)
        assert ema.decay == decay and ema.decay_at(0) == 0.0  # warm-up as before
        assert ema.decay_at(10**9) == decay  # then the cap
        assert ema.decay_at(5) == pytest.approx(min(decay, 1 - 6 ** -0.75))
    assert ema_decay(cfg, 1000) < ema_decay(cfg, 2000)  # a longer run averages over more steps
    # A decay that is set wins over half_life: recipes and resumed runs that name one keep it.
    assert ema_decay(EmaConfig(decay=0.9998, half_life=0.1), 1000) == 0.9998
    assert load_config([]).ema.decay is None and load_config([]).ema.half_life == 0.2


@pytest.mark.parametrize("override, says", [("--ema.half_life=0", "ema.half_life"), ("--ema.half_life=1.5", "ema.half_life"),
                                            ("--ema.decay=1.0", "ema.decay")])
def test_bad_half_life_or_decay_is_one_line(override: str, says: str) -> None:
    from tinydist.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(["--ema.enabled=true", override])
    assert says in str(e.value) and "\n" not in str(e.value)


def test_update_every_comes_from_the_half_life_unless_set() -> None:
    from tinydist.config import ema_decay, ema_update_every

    def every(total: int, **kw) -> int:
        cfg = EmaConfig(enabled=True, **kw)
        return ema_update_every(cfg, ema_decay(cfg, total))

    # half-lives of 0.2 x 94 (photos10, 3 epochs), 235 (smoke), 563 (12k photos), 19,500 steps (main recipe)
    assert [every(t) for t in (94, 235, 563, 19_500)] == [1, 2, 5, 10]
    assert every(10, decay=0.9998) == 10 and every(10, decay=0.9) == 1  # a named decay: its own half-life
    assert every(563, update_every=3) == 3 and every(19_500, update_every=1) == 1  # set: as set


def test_averaging_every_k_steps_is_the_per_step_average_where_the_weights_hold_still() -> None:
    """With the weights changed only where a stretch of k steps begins, the per-step average and the one
    updated once per stretch (decays compounded) agree; in between the average does not move; the
    schedule's last step updates it though it ends no stretch (10 steps, k = 4: after steps 3, 7, 9)."""
    model = small_model()
    per_step = ModelEma(model, EmaConfig(enabled=True, half_life=0.3, update_every=1), total_steps=10)
    every_4 = ModelEma(model, EmaConfig(enabled=True, half_life=0.3, update_every=4), total_steps=10)
    assert per_step.decay == every_4.decay and every_4.every == 4
    moved = []
    for step in range(10):
        if step % 4 == 0:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * (step + 1))
        before = [p.clone() for p in every_4.module.parameters()]
        per_step.update(step)
        every_4.update(step)
        if any(not torch.equal(a, b) for a, b in zip(before, every_4.module.parameters())):
            moved.append(step)
        if step in (3, 7, 9):
            for a, b in zip(per_step.module.parameters(), every_4.module.parameters()):
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert moved == [3, 7, 9]


@pytest.mark.parametrize("value", ["0", "-2", "1.5"])
def test_bad_update_every_is_one_line(value: str) -> None:
    from tinydist.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(["--ema.enabled=true", f"--ema.update_every={value}"])
    assert "ema.update_every" in str(e.value) and value in str(e.value) and "\n" not in str(e.value)

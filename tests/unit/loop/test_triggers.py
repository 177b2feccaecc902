"""tinydist.loop.triggers: when the loop logs, validates and saves."""

from __future__ import annotations

from tinydist.config import Config
from tinydist.data.sampler import GlobalSampler
from tinydist.loop.triggers import Triggers


def test_each_trigger_fires_exactly_where_the_config_says() -> None:
    cfg = Config()
    cfg.log.every_steps, cfg.train.eval_every_steps, cfg.checkpoint.every_steps = 4, 10, 6
    sampler = GlobalSampler(num_samples=100, global_batch=16, micro_batch=8)  # epochs end at steps 7, 13, 19...
    triggers = Triggers(cfg, sampler.epoch_at, last_step=20)
    steps = range(1, 21)
    assert [s for s in steps if triggers.epoch_ended(s)] == [7, 13, 19]
    assert [s for s in steps if triggers.should_log(s, stopping=False)] == [4, 8, 12, 16, 20]
    assert [s for s in steps if triggers.should_eval(s)] == [7, 10, 13, 19, 20]
    assert [s for s in steps if triggers.should_save(s, stopping=False, clock_due=False)] == [6, 7, 12, 13, 18, 19, 20]
    assert triggers.should_log(5, stopping=True) and triggers.should_save(5, stopping=True, clock_due=False)
    assert triggers.should_save(5, stopping=False, clock_due=True) and not triggers.should_eval(5)


def test_an_epoch_that_ends_exactly_on_a_step_is_seen_once() -> None:
    cfg = Config()
    cfg.train.eval_every_steps, cfg.checkpoint.every_steps = None, 0
    sampler = GlobalSampler(num_samples=1000, global_batch=40, micro_batch=8)  # 25 steps per epoch exactly
    triggers = Triggers(cfg, sampler.epoch_at, last_step=80)
    assert [s for s in range(1, 81) if triggers.should_eval(s)] == [25, 50, 75, 80]
    assert [s for s in range(1, 81) if triggers.should_save(s, False, False)] == [25, 50, 75, 80]


def test_eval_every_epochs_thins_the_epoch_end_validations() -> None:
    cfg = Config()
    cfg.train.eval_every_steps, cfg.checkpoint.every_steps, cfg.eval.every_epochs = None, 0, 2
    sampler = GlobalSampler(num_samples=1000, global_batch=40, micro_batch=8)  # 25 steps per epoch exactly
    triggers = Triggers(cfg, sampler.epoch_at, last_step=130)
    assert [s for s in range(1, 131) if triggers.should_eval(s)] == [50, 100, 130]
    assert [s for s in range(1, 131) if triggers.should_save(s, False, False)] == [25, 50, 75, 100, 125, 130]
    cfg.eval.every_epochs = 0
    assert [s for s in range(1, 131) if triggers.should_eval(s)] == [130]

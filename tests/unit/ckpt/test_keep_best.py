"""Keep-best: besides the last `keep_last` commits, the one with the best validation metric stays,
EMA tensors ride in their own sharded set, and the learning rate needs no saved state."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from tinydist.ckpt.checkpointer import Checkpointer
from tinydist.config import EmaConfig, ModelConfig, OptimConfig
from tinydist.model.ema import ModelEma
from tinydist.model.build import build_model
from tinydist.model.optim import build_optimizer, lr_at, set_lr


def tiny() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = build_model(ModelConfig(stem="imagenet", channels_last=False), 10)
    optimizer = build_optimizer(OptimConfig(), model)
    model.train()
    x, y = torch.randn(4, 3, 16, 16), torch.arange(4)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    return model, optimizer


def test_the_best_checkpoint_outlives_keep_last(tmp_path) -> None:
    model, optimizer = tiny()
    ck = Checkpointer(str(tmp_path), keep_last=2, log=lambda _: None, best_metric="val/top1")
    scores = {1: 0.2, 2: 0.7, 3: 0.5, 4: None, 5: 0.6}  # step 4 saved without a validation
    for step, top1 in scores.items():
        ck.save(step, model, optimizer, {"metrics": {} if top1 is None else {"val/top1": top1}}, blocking=True)
    assert ck.committed() == [f"{tmp_path}/step-00000002", f"{tmp_path}/step-00000004", f"{tmp_path}/step-00000005"]
    assert ck.best() == f"{tmp_path}/step-00000002"
    ck.save(6, model, optimizer, {"metrics": {"val/top1": 0.9}}, blocking=True)
    assert ck.committed() == [f"{tmp_path}/step-00000005", f"{tmp_path}/step-00000006"]  # 6 is last and best
    assert ck.best() == f"{tmp_path}/step-00000006"
    # A new checkpointer (a resumed run) finds the best from state.json alone.
    assert Checkpointer(str(tmp_path), keep_last=1, log=lambda _: None, best_metric="val/top1").best() == \
        f"{tmp_path}/step-00000006"
    plain = Checkpointer(str(tmp_path), keep_last=1, log=lambda _: None)
    plain.save(7, model, optimizer, {"metrics": {"val/top1": 0.1}}, blocking=True)
    assert plain.committed() == [f"{tmp_path}/step-00000007"] and plain.best() is None


def test_ema_is_its_own_sharded_set_and_round_trips(tmp_path) -> None:
    model, optimizer = tiny()
    ema = ModelEma(model, EmaConfig(enabled=True, decay=0.5, warmup_power=0.0))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(0)
    ck = Checkpointer(str(tmp_path), keep_last=2, log=lambda _: None)
    ck.save(1, model, optimizer, {}, blocking=True, ema=ema.module)
    folder = tmp_path / "step-00000001"
    index = json.loads((folder / "ema.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(model.state_dict())
    assert "ema.safetensors.index.json" in json.loads((folder / "state.json").read_text())["files"]

    fresh_model, fresh_opt = tiny()
    fresh_ema = ModelEma(fresh_model, EmaConfig(enabled=True))
    path, state = ck.load_latest(fresh_model, fresh_opt, fresh_ema.module)
    assert path.endswith("step-00000001") and state["step"] == 1
    for (name, got), want in zip(fresh_ema.module.state_dict().items(), ema.module.state_dict().values()):
        assert torch.equal(got, want), name
    assert not torch.equal(fresh_ema.module.fc.weight, fresh_model.fc.weight)  # the average, not the weights
    # A checkpoint without an average leaves the given module as it was.
    ck.save(2, model, optimizer, {}, blocking=True)
    untouched = ModelEma(fresh_model, EmaConfig(enabled=True))
    before = untouched.module.fc.weight.clone()
    ck.load(f"{tmp_path}/step-00000002", fresh_model, fresh_opt, untouched.module)
    assert torch.equal(untouched.module.fc.weight, before)


@pytest.mark.parametrize("schedule, name", [("cosine", "sgd"), ("onecycle", "sgd"), ("onecycle", "adamw")])
def test_the_learning_rate_is_a_pure_function_of_the_step(schedule: str, name: str) -> None:
    """lr_at(step) equals what torch's stateful schedulers give after `step` calls of .step()."""
    cfg = OptimConfig(name=name, schedule=schedule, lr=0.3)
    total, warmup = 50, 7
    p = torch.nn.Parameter(torch.zeros(1))
    opt = (torch.optim.SGD([p], lr=cfg.lr, momentum=0.9) if name == "sgd"
           else torch.optim.AdamW([p], lr=cfg.lr, betas=(0.9, 0.999)))
    if schedule == "onecycle":
        reference = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total,
                                                        pct_start=warmup / total)
    else:
        reference = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (
            1 + math.cos(math.pi * min((s - warmup) / (total - warmup), 1.0))))
    mine = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0, momentum=0.9) if name == "sgd" else \
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scheduler.step() without optimizer.step()
        for step in range(total):
            set_lr(mine, *lr_at(cfg, step, total, warmup))
            want, got = opt.param_groups[0], mine.param_groups[0]
            assert got["lr"] == pytest.approx(want["lr"], rel=1e-12, abs=1e-15), step
            if schedule == "onecycle":
                key = "momentum" if name == "sgd" else "betas"
                assert got[key] == pytest.approx(want[key], rel=1e-12), step
            reference.step()


def test_export_select_best_takes_the_best_checkpoints_weights(tmp_path) -> None:
    from tinydist.config import Config
    from tinydist.export.writer import exported_weights

    model, optimizer = tiny()
    ck = Checkpointer(str(tmp_path), keep_last=1, log=lambda _: None, best_metric="val/top1")
    ck.save(1, model, optimizer, {"metrics": {"val/top1": 0.9}}, blocking=True)
    best = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.fc.weight.add_(1.0)
    ck.save(2, model, optimizer, {"metrics": {"val/top1": 0.5}}, blocking=True)
    cfg = Config()
    cfg.export.select = "best"
    module, provenance = exported_weights(cfg, ck, model, None, 2, {"val/top1": 0.5})
    assert module is not model and provenance["selected"] == "best" and provenance["step"] == 1
    assert provenance["metrics"] == {"val/top1": 0.9} and provenance["best"]["step"] == 1
    assert all(torch.equal(module.state_dict()[k], v) for k, v in best.items())
    assert not torch.equal(model.fc.weight, best["fc.weight"])  # the live model is left alone
    cfg.export.select = "last"
    module, provenance = exported_weights(cfg, ck, model, None, 2, {"val/top1": 0.5})
    assert module is model and provenance["selected"] == "last" and provenance["step"] == 2

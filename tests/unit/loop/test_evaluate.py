"""tinydist.loop.evaluate: plain metrics, flip TTA as its own metric, a prefix for the EMA; Evaluator as configured."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from tinydist.config import load_config
from tinydist.data.augment import eval_transform
from tinydist.loop.evaluate import Evaluator, evaluate


class Split:
    def __init__(self, n: int = 40, side: int = 8, classes: int = 3) -> None:
        rng = np.random.default_rng(0)
        self.pixels = rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)
        self.labels = rng.integers(0, classes, n).astype(np.int64)
        self.classes = [f"c{i}" for i in range(classes)]

    def __len__(self) -> int:
        return len(self.labels)

    def gather(self, rows: np.ndarray) -> np.ndarray:
        return self.pixels[rows]


def test_flip_tta_scores_the_averaged_logits_beside_the_plain_ones() -> None:
    split = Split()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))  # not mirror-symmetric
    metrics = evaluate(model, split, 16, torch.device("cpu"), channels_last=False, flip=True, prefix="val_ema")
    assert set(metrics) == {f"val_ema/{k}" for k in ("loss", "top1", "top5", "top1_flip", "top5_flip")}
    with torch.no_grad():
        x = eval_transform(torch.from_numpy(split.pixels), channels_last=False)
        y = torch.from_numpy(split.labels)
        plain, mirrored = model(x), model(x.flip(3))
    assert metrics["val_ema/top1"] == (plain.argmax(1) == y).sum().item() / len(y)
    assert metrics["val_ema/top1_flip"] == ((plain + mirrored).argmax(1) == y).sum().item() / len(y)
    assert metrics["val_ema/top1_flip"] != metrics["val_ema/top1"]  # the mirror really was scored
    assert abs(metrics["val_ema/loss"] - F.cross_entropy(plain, y).item()) < 1e-5
    assert "val/top1_flip" not in evaluate(model, split, 16, torch.device("cpu"), channels_last=False)


def test_from_config_is_the_run_s_evaluation() -> None:
    cfg = load_config(["--train.eval_batch_size=16", "--model.channels_last=false", "--eval.flip_tta=true"])
    evaluator = Evaluator.from_config(cfg)
    assert evaluator == Evaluator(batch_size=16, channels_last=False, flip=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    cpu = torch.device("cpu")
    assert evaluator.score(model, Split(), cpu, prefix="val_ema") == evaluate(
        model, Split(), 16, cpu, channels_last=False, flip=True, prefix="val_ema")


def test_one_pass_over_two_models_gives_what_two_separate_passes_give() -> None:
    """validate's single pass (raw and EMA weights on the same batches) changes no metric."""
    split = Split(n=37)  # a last batch shorter than the others
    torch.manual_seed(0)
    raw = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    averaged = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    cpu = torch.device("cpu")
    for flip in (False, True):
        together = evaluate(raw, split, 16, cpu, channels_last=False, flip=flip, prefix="val",
                            also={"val_ema": averaged})
        apart = {**evaluate(raw, split, 16, cpu, channels_last=False, flip=flip, prefix="val"),
                 **evaluate(averaged, split, 16, cpu, channels_last=False, flip=flip, prefix="val_ema")}
        assert together == apart  # bit for bit
        assert together["val/top1"] != together["val_ema/top1"] or together["val/loss"] != together["val_ema/loss"]


def test_eval_weights_must_cover_what_is_exported_and_kept_best() -> None:
    import pytest

    from tinydist.config import ConfigError

    assert load_config([]).eval.weights == "both"
    load_config(["--ema.enabled=true", "--eval.weights=ema", "--export.weights=ema", "--checkpoint.best_metric=val_ema/top1"])
    for args, says in ((["--eval.weights=ema"], "ema.enabled=false"),
                       (["--ema.enabled=true", "--eval.weights=ema"], "export.weights=raw"),
                       (["--ema.enabled=true", "--eval.weights=raw", "--checkpoint.best_metric=val_ema/top1"],
                        "best_metric=val_ema/top1"),
                       (["--eval.weights=all"], "eval.weights")):
        with pytest.raises(ConfigError) as e:
            load_config(args)
        assert says in str(e.value) and "\n" not in str(e.value), (args, str(e.value))


class _Formats(torch.nn.Module):
    """Records the memory format of every input it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3 * 8 * 8, 3)
        self.seen: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        return self.linear(x.flatten(1))


def test_on_a_cpu_inference_reads_nhwc_whatever_the_model_trains_in() -> None:
    """oneDNN's NHWC inference path is faster on a CPU even for NCHW weights (augment.inference_channels_last):
    evaluation and PreciseBN feed NHWC there, and score what NCHW inputs score."""
    from tinydist.data.augment import inference_channels_last
    from tinydist.model.precise_bn import recompute_bn_statistics

    assert inference_channels_last(False, torch.device("cpu")) is True
    assert inference_channels_last(False, torch.device("cuda")) is False
    assert inference_channels_last(True, torch.device("cuda")) is True
    torch.manual_seed(0)
    model = _Formats()
    metrics = evaluate(model, Split(), 16, torch.device("cpu"), channels_last=False)
    assert model.seen and all(model.seen)
    with torch.no_grad():
        x = eval_transform(torch.from_numpy(Split().pixels), channels_last=False)
        logits = model.linear(x.flatten(1))
    assert metrics["val/top1"] == (logits.argmax(1) == torch.from_numpy(Split().labels)).sum().item() / len(Split())
    bn = torch.nn.Sequential(torch.nn.BatchNorm2d(3), _Formats())
    assert recompute_bn_statistics(bn, Split(n=512), 512, 0, torch.device("cpu"), channels_last=False) == 2
    assert bn[1].seen and all(bn[1].seen)

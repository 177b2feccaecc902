"""resnet18 for 64x64 inputs, with torchvision's key names so plain torchvision loads the weights (its
residual blocks optionally starting as the identity: `model.zero_init_residual`); the BN
rule (`BNStatistics`: only a step's first micro-batch updates the running statistics), the parameters
kept from weight decay (`no_decay`), and the step-0 guard against a softmax before the loss."""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.models import resnet18

from tinydist.config import ModelConfig
from tinydist.runtime.exitcodes import PermanentError


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The model returns logits: nothing applies softmax before the loss (the seed report's bug).
    `cfg.zero_init_residual` null means torchvision's initialisation here: a run resolves it from its
    length first (`config.zero_init_residual`); loaders overwrite every weight anyway."""
    model = resnet18(num_classes=num_classes, zero_init_residual=bool(cfg.zero_init_residual))
    if cfg.stem == "cifar":
        # At 64x64 the ImageNet stem (7x7/2 conv + pool) throws away 15/16 of the pixels before the
        # first block; a 3x3/1 stem keeps them (about 65% vs 53% top-1: the anchors in README.md's recipe table).
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    if cfg.extra_fc:
        model.fc = nn.Sequential(nn.Linear(512, cfg.extra_fc), nn.ReLU(inplace=True), nn.Linear(cfg.extra_fc, num_classes))
    return model


class BNStatistics:
    """Keep BatchNorm running statistics as they were across a forward pass, or let it update them.

    The loop updates them on the first global micro-batch of each optimizer step only. Under DDP
    the statistics that survive are rank 0's (broadcast at each forward), so "every micro-batch"
    would mean "every micro-batch rank 0 happens to hold" and depend on the process count; "the
    step's first micro-batch" is the same on any number of processes.

    Why a snapshot and restore rather than toggling `track_running_stats`: the module attribute is
    guarded by torch.compile, so toggling it every micro-batch recompiled the model; copying ~10k
    numbers in and out of the buffers happens outside the compiled graph. A training-mode forward
    normalises with the batch's own statistics either way, so the outputs are the same.
    """

    def __init__(self, model: nn.Module) -> None:
        self.buffers = [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                        for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
        self._saved: list[torch.Tensor] = []

    def keep(self) -> None:
        """Before a forward whose statistics must not count."""
        if not self._saved:
            self._saved = [torch.empty_like(b) for b in self.buffers]
        torch._foreach_copy_(self._saved, self.buffers)  # one op, not 60 (each a thread-pool wake-up)

    def restore(self) -> None:
        """After that forward and its backward (autograd checks the buffers it saw are unchanged): the
        running statistics are back to what `keep` saw."""
        with torch.no_grad():
            torch._foreach_copy_(self.buffers, self._saved)


def no_decay(name: str, param: nn.Parameter) -> bool:
    """BN weights and all biases: decaying them only fights normalisation."""
    return param.ndim <= 1


class SoftmaxBeforeLossError(PermanentError, RuntimeError):
    """The model outputs probabilities where the loss expects logits: training would learn nothing."""


def check_first_step(logits: torch.Tensor, loss: float, num_classes: int) -> None:
    """Stop at step 0 if the model looks like it outputs probabilities, not logits.

    Cross-entropy applies log-softmax itself; given probabilities it sees logits squashed into
    [0, 1], the gradients all but vanish and training sits at chance (0.5% on 200 classes) forever.
    At initialisation the loss of a healthy model is close to ln(C).
    """
    rows = logits.detach().float()
    sums_to_one = bool((rows >= 0).all() and torch.allclose(rows.sum(1), torch.ones(len(rows)).to(rows), atol=1e-3))
    expected = math.log(num_classes)
    far = not math.isfinite(loss) or abs(loss - expected) > max(1.5, 0.5 * expected)
    if sums_to_one or far:
        what = "rows of the model's output are non-negative and sum to 1" if sums_to_one else \
            f"the first loss is {loss:.3f}, far from ln({num_classes}) = {expected:.3f}"
        raise SoftmaxBeforeLossError(
            f"step-0 check failed: {what}. The model must return raw logits: CrossEntropyLoss applies "
            "log-softmax itself, so a softmax before it squashes the outputs, kills the gradients and "
            "leaves accuracy at chance. Remove the softmax (apply it only for predictions).")

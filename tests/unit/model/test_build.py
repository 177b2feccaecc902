"""The model's initialisation: residual blocks start as the identity when asked, and nothing else moves."""

import torch
import torchvision

from tinydist import config as config_lib
from tinydist.bench.plain_loop import _model as plain_loop_model
from tinydist.config import ModelConfig
from tinydist.model.build import build_model


def _state(seed: int, **model: object) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model.setdefault("zero_init_residual", True)
    return build_model(ModelConfig(stem="imagenet", channels_last=False, **model), 10).state_dict()


def test_residual_blocks_start_as_the_identity_and_the_rest_is_torchvisions_init():
    ours = _state(3)
    torch.manual_seed(3)
    plain = torchvision.models.resnet18(num_classes=10).state_dict()
    zeroed = sorted(k for k in ours if k.endswith("bn2.weight"))
    assert len(zeroed) == 8  # resnet18: 4 stages x 2 basic blocks
    assert all(ours[k].abs().max().item() == 0 for k in zeroed)
    assert all(plain[k].eq(1).all() for k in zeroed)  # torchvision's own default: 1
    assert ours.keys() == plain.keys()  # plain torchvision still loads the weights
    assert [k for k in ours if not torch.equal(ours[k], plain[k])] == zeroed  # the same draws otherwise
    # Off, or null where no run length resolved it (a loader's model): exactly torchvision's initialisation.
    for unresolved in (False, None):
        off = _state(3, zero_init_residual=unresolved)
        assert all(torch.equal(off[k], plain[k]) for k in plain)


def test_null_turns_the_identity_start_on_from_the_measured_run_length():
    assert ModelConfig().zero_init_residual is None
    threshold = config_lib.ZERO_INIT_FROM_STEPS
    assert 71 < threshold <= 188  # -7.5 points at 71 steps, +4.9 at 188 (README, recipe table)
    assert not config_lib.zero_init_residual(ModelConfig(), threshold - 1)
    assert config_lib.zero_init_residual(ModelConfig(), threshold)
    # A value in the config wins over the length, both ways.
    assert not config_lib.zero_init_residual(ModelConfig(zero_init_residual=False), 100_000)
    assert config_lib.zero_init_residual(ModelConfig(zero_init_residual=True), 1)
    cfg = config_lib.load_config(["--model.zero_init_residual=null"])
    assert cfg.model.zero_init_residual is None


def test_the_identity_start_changes_the_first_forward_only_through_the_blocks():
    torch.manual_seed(0)
    model = build_model(ModelConfig(stem="imagenet", channels_last=False, zero_init_residual=True), 10).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        stem = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        blocks = model.layer1(stem)
    # Each block of layer1 adds nothing to its input yet: relu(x + 0) = x for the non-negative stem output.
    assert torch.equal(blocks, stem)


def test_the_bench_plain_loop_keeps_torchvisions_initialisation():
    cfg = config_lib.load_config(["--model.stem=imagenet", "--model.channels_last=false",
                                  "--model.zero_init_residual=true"])
    assert cfg.model.zero_init_residual  # tinydist's side starts the blocks at the identity
    plain, _ = plain_loop_model(cfg, 10, seed=5)
    torch.manual_seed(5)
    reference = torchvision.models.resnet18(num_classes=10).state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in plain.state_dict().items())

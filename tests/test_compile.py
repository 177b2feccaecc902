"""model.compile on the CPU: matches eager within float rounding, no recompiles after warm-up with
gradient accumulation (the BN-statistics rule used to toggle a guarded module attribute), and a
compiled run resumes bitwise on the same device. Compiling resnet18 takes about a minute here."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from tinydist.config import ModelConfig
from tinydist.model.build import BNStatistics, build_model
from train_helpers import describe, load_model_dir, run_train, tiny_args


def _steps(model, bn, batches, compiled_model=None):
    """SGD steps of 2 micro-batches each; BN statistics from each step's first micro-batch only."""
    forward = model if compiled_model is None else compiled_model
    opt = torch.optim.SGD(model.parameters(), lr=0.01)  # gentle: compare rounding, not chaos
    for images, labels in batches:
        for i, (x, y) in enumerate(zip(images.chunk(2), labels.chunk(2))):
            if i:
                bn.keep()
            loss = F.cross_entropy(forward(x), y) / 2
            loss.backward()
            if i:
                bn.restore()
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.config.error_on_recompile = False
    torch._dynamo.reset()


@pytest.mark.slow  # torch.compile (inductor) builds its kernels in-process: a minute or more on 2 cores
def test_compiled_steps_match_eager_and_never_recompile_after_warm_up():
    import torch._dynamo

    torch.manual_seed(0)
    eager = build_model(ModelConfig(stem="imagenet"), num_classes=10)
    compiled_base = copy.deepcopy(eager)
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(32, 3, 32, 32, generator=generator), torch.randint(0, 10, (32,), generator=generator))
               for _ in range(3)]
    _steps(eager, BNStatistics(eager), batches)

    compiled = torch.compile(compiled_base)
    bn = BNStatistics(compiled_base)
    _steps(compiled_base, bn, batches[:1], compiled)  # warm-up: both kinds of micro-batch seen
    torch._dynamo.config.error_on_recompile = True  # any recompile from here on raises
    _steps(compiled_base, bn, batches[1:], compiled)

    for (name, a), (_, b) in zip(eager.state_dict().items(), compiled_base.state_dict().items()):
        if a.is_floating_point():
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-4), (name, (a - b).abs().max())
        else:
            assert torch.equal(a, b), name


@pytest.mark.slow
def test_compiled_run_resumes_bitwise(tmp_path, cache_dir):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    common = {"model__compile": "true", "checkpoint__every_steps": 2}
    result = run_train(tiny_args(cache_dir, str(whole), train__max_steps=4, **common), timeout=600)
    assert result.returncode == 0, describe(result)
    for steps in (2, 4):  # stop at step 2, then a new process resumes from its checkpoint
        result = run_train(tiny_args(cache_dir, str(parts), train__max_steps=steps, **common), timeout=600)
        assert result.returncode == 0, describe(result)
    assert "resumed from" in result.stdout
    a, b = load_model_dir(str(whole / "model")), load_model_dir(str(parts / "model"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

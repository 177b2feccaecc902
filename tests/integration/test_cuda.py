"""What only a CUDA device can show: bitwise resume on the GPU (fp32 and bf16), the checkpoint's pinned
device-to-host snapshot, and torch.compile on CUDA. Every test skips without a CUDA device.

Runs use the CPU suite's recipe (configs/smoke.yaml: digits at 16x16, global batch 64 = micro 32 x
accumulation 2, so the BN-statistics rule runs too, an epoch every 4 steps) with the main recipe's
model settings: cifar stem, channels_last. Bitwise comparisons need run-to-run determinism on the GPU,
which tinydist does not switch on itself: a small driver does (`torch.use_deterministic_algorithms`,
with `CUBLAS_WORKSPACE_CONFIG=:4096:8` in its environment) and then calls `tinydist.train.main`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
import torch.nn.functional as F

from helpers.train import describe, load_model_dir, read_metrics, run_train, tiny_args, train_env

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.slow]  # GPU training runs in subprocesses

DEVICE = "cuda"
EXIT_PREEMPTED = 75
TIMEOUT_S = 300
GPU_MODEL = {"model__stem": "cifar", "model__channels_last": "true", "log__every_steps": 1}

DRIVER = r'''
import os, signal, sys

import torch

# Before any CUDA work: deterministic kernels (cuDNN, cuBLAS with CUBLAS_WORKSPACE_CONFIG from the environment).
torch.use_deterministic_algorithms(True)
torch.backends.cudnn.benchmark = False
import tinydist.train as train

print(f"driver: deterministic algorithms {torch.are_deterministic_algorithms_enabled()}, "
      f"CUBLAS_WORKSPACE_CONFIG={os.environ.get('CUBLAS_WORKSPACE_CONFIG')}", flush=True)
at = int(os.environ.get("DRIVER_SIGTERM_BEFORE_TRANSFORM", "0"))
if at:
    # The loop's per-micro-batch augmentation, on its own thread (`augment`; `train_transform` before the prefetcher).
    name = "augment" if hasattr(train, "augment") else "train_transform"
    calls = [0]
    original_transform = getattr(train, name)

    def transform(*args, **kwargs):
        calls[0] += 1
        if calls[0] == at:
            print(f"driver: sending SIGTERM before micro-batch transform {at}", flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
        return original_transform(*args, **kwargs)

    setattr(train, name, transform)

sys.exit(train.main(sys.argv[1:]))
'''


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("cuda-driver") / "deterministic_driver.py"
    path.write_text(DRIVER)
    return str(path)


def deterministic_env(**extra: str) -> dict[str, str]:
    return train_env({"CUBLAS_WORKSPACE_CONFIG": ":4096:8", **extra})


def check_banner(result: Any, precision: str, deterministic: bool = True) -> None:
    assert f"device {DEVICE}, precision {precision}" in result.stdout, describe(result)
    if deterministic:
        assert "driver: deterministic algorithms True, CUBLAS_WORKSPACE_CONFIG=:4096:8" in result.stdout, \
            describe(result)


def load_sharded(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    """`{prefix}.safetensors.index.json` + its shards (a checkpoint's model or optimizer) -> tensors."""
    from safetensors.torch import load_file

    with open(folder / f"{prefix}.safetensors.index.json") as f:
        weight_map = json.load(f)["weight_map"]
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        tensors.update(load_file(str(folder / shard)))
    assert set(tensors) == set(weight_map), f"{folder}: {prefix} index and shards disagree"
    return tensors


def assert_bitwise_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(got) == sorted(want), what
    differ = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    assert not differ, f"{what}: {len(differ)} of {len(want)} tensors differ from the reference, e.g. {differ[:5]}"


def train_losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train/loss"]) for r in read_metrics(str(out)) if "train/loss" in r]


def final_checkpoint(out: Path, step: int) -> Path:
    folder = out / "checkpoints" / f"step-{step:08d}"
    assert (folder / "COMMITTED").is_file(), f"{folder} is not committed"
    return folder


def assert_same_run(parts: Path, whole: Path, last_step: int) -> None:
    """The run stopped and resumed (`parts`) is the uninterrupted one (`whole`): exported model and final
    optimizer state bitwise, every step's training loss to the last bit."""
    assert_bitwise_equal(load_model_dir(str(parts / "model")), load_model_dir(str(whole / "model")), "exported model")
    assert_bitwise_equal(load_sharded(final_checkpoint(parts, last_step), "optimizer"),
                         load_sharded(final_checkpoint(whole, last_step), "optimizer"),
                         f"optimizer state at step {last_step}")
    assert train_losses(parts) == train_losses(whole)


# ---- (a) SIGTERM mid-step on the GPU, resumed: bitwise the run that never stopped ----------------------------


def test_sigterm_then_resume_on_the_gpu_is_bitwise_identical(cache_dir: str, tmp_path: Path, driver: str) -> None:
    whole, parts = tmp_path / "whole", tmp_path / "parts"

    def args(out: Path) -> list[str]:
        return tiny_args(cache_dir, str(out), train__max_steps=6, checkpoint__every_steps=2, **GPU_MODEL)

    reference = run_train(args(whole), env=deterministic_env(), script=driver, timeout=TIMEOUT_S)
    assert reference.returncode == 0, describe(reference)
    check_banner(reference, "no")

    # Transforms 5 and 6 are the two micro-batches of the third step: stop between them, half an accumulation in.
    stopped = run_train(args(parts), env=deterministic_env(DRIVER_SIGTERM_BEFORE_TRANSFORM="6"), script=driver,
                        timeout=TIMEOUT_S)
    assert stopped.returncode == EXIT_PREEMPTED, describe(stopped)
    check_banner(stopped, "no")
    assert "driver: sending SIGTERM before micro-batch transform 6" in stopped.stdout, describe(stopped)
    assert "stopped at step 3 after SIGTERM; checkpoint committed" in stopped.stdout, describe(stopped)
    assert not (parts / "model").exists()

    resumed = run_train(args(parts), env=deterministic_env(), script=driver, timeout=TIMEOUT_S)
    assert resumed.returncode == 0, describe(resumed)
    check_banner(resumed, "no")
    assert f"resumed from {parts}/checkpoints/step-00000003 at step 3 (saved by 1 process(es) on {DEVICE})" \
        in resumed.stdout, describe(resumed)

    assert_same_run(parts, whole, 6)
    assert [s for s, _ in train_losses(whole)] == list(range(1, 7))


# ---- (b) the checkpoint's snapshot of a CUDA model: pinned host buffers, ordered before the loop's next changes ---


def test_save_of_a_cuda_model_snapshots_into_pinned_buffers_and_loads_back_bitwise(tmp_path: Path) -> None:
    from tinydist.ckpt.checkpointer import Checkpointer
    from tinydist.config import ModelConfig, OptimConfig
    from tinydist.model.build import build_model
    from tinydist.model.optim import build_optimizer

    device = torch.device(DEVICE)

    def make(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        model = build_model(ModelConfig(stem="cifar"), 200).to(device, memory_format=torch.channels_last)
        return model, build_optimizer(OptimConfig(name="sgd", momentum=0.9), model)

    model, optimizer = make(0)
    x = torch.randn(16, 3, 16, 16, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 200, (16,), device=device)
    F.cross_entropy(model(x), y).backward()  # real momentum, real BN statistics
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    want_model = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    want_momentum = {n: optimizer.state[p]["momentum_buffer"].cpu().clone() for n, p in model.named_parameters()}

    checkpointer = Checkpointer(str(tmp_path / "checkpoints"), keep_last=2, log=lambda _: None)
    checkpointer.save(1, model, optimizer, {"note": "cuda test"}, blocking=False)
    # save() has returned with its copies only queued: the loop goes on at once. The next forward changes the BN
    # buffers straight away (the GPU orders that after their copies); the next optimizer step changes parameters
    # and momentum after `snapshot_barrier()`, as train.py calls it. Neither may reach the checkpoint.
    with torch.no_grad():
        for buffer in model.buffers():
            buffer.add_(1)
        checkpointer.snapshot_barrier()
        for p in model.parameters():
            p.add_(1)
            optimizer.state[p]["momentum_buffer"].mul_(-1)
    host = checkpointer._host_buffers  # the buffers save() copied into (private; nothing public shows them)
    assert host, "save() kept no host buffers"
    unpinned = [k for k, b in host.items() if b.device.type != "cpu" or not b.is_pinned()]
    assert not unpinned, f"{len(unpinned)} of {len(host)} host buffers are not pinned CPU memory, e.g. {unpinned[:3]}"
    checkpointer.wait()

    fresh, fresh_optimizer = make(1)
    state = checkpointer.load(checkpointer.latest(), fresh, fresh_optimizer)
    assert state["step"] == 1 and state["note"] == "cuda test"
    got = fresh.state_dict()
    assert all(v.device.type == DEVICE for v in got.values())
    assert_bitwise_equal({k: v.cpu() for k, v in got.items()}, want_model, "model loaded back")
    momentum = {n: fresh_optimizer.state[p]["momentum_buffer"] for n, p in fresh.named_parameters()}
    assert all(m.device.type == DEVICE for m in momentum.values())
    assert_bitwise_equal({k: v.cpu() for k, v in momentum.items()}, want_momentum, "momentum loaded back")


# ---- (c) torch.compile on CUDA: the same function and gradients as eager; a compiled run finishes and tracks eager ---
# Final weights are no yardstick here: a few steps of this small recipe amplify rounding chaotically (on the CPU,
# eager channels_last vs eager contiguous already differ by 40% in their 4-step updates). The forward and the
# gradients of one batch are, and so is the first loss of a run (same weights, same data).


@pytest.fixture
def full_fp32() -> Iterator[None]:
    """TF32 off for convolutions and matmuls. With it on (cuDNN's default), eager and compiled may pick
    different convolution algorithms, each rounding its inputs to 10 mantissa bits: on an H200 their
    gradients differed by 5% (relative) for the same function, which says nothing about compile."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_compiled_model_on_the_gpu_computes_eager_gradients(full_fp32: None) -> None:
    import copy

    from tinydist.config import ModelConfig
    from tinydist.model.build import build_model

    device = torch.device(DEVICE)
    torch.manual_seed(0)
    # The shapes of the runs below (10 classes, micro 32 at 16 px): their compile can reuse these kernels.
    eager = build_model(ModelConfig(stem="cifar"), 10).to(device, memory_format=torch.channels_last)
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(32, 3, 16, 16, generator=generator).to(device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (32,), generator=generator).to(device)
    losses = []
    for forward in (eager, compiled):
        loss = F.cross_entropy(forward(x), y)
        loss.backward()
        losses.append(loss.item())
    assert math.isclose(losses[0], losses[1], rel_tol=1e-4), losses
    grad_e = torch.cat([p.grad.flatten() for p in eager.parameters()])
    grad_c = torch.cat([p.grad.flatten() for p in twin.parameters()])
    rel = ((grad_c - grad_e).norm() / grad_e.norm()).item()
    assert rel < 1e-2, f"compiled gradients differ from eager by {rel:.3g} (relative, all parameters)"
    for (name, a), b in zip(eager.named_buffers(), twin.buffers()):  # BN running statistics, updated by both
        if a.is_floating_point():
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-5), (name, (a - b).abs().max().item())
        else:
            assert torch.equal(a, b), name


def test_compiled_run_on_the_gpu_finishes_and_tracks_eager(cache_dir: str, tmp_path: Path) -> None:
    losses = {}
    for name, flag in (("eager", "false"), ("compiled", "true")):
        out = tmp_path / name
        # A gentle learning rate: this comparison is about compile, not about how fast rounding grows.
        result = run_train(tiny_args(cache_dir, str(out), train__max_steps=4, model__compile=flag, optim__lr=0.005,
                                     **GPU_MODEL), timeout=600)
        assert result.returncode == 0, describe(result)
        check_banner(result, "no", deterministic=False)
        weights = load_model_dir(str(out / "model"))
        assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point()), name
        losses[name] = train_losses(out)
    eager, compiled = losses["eager"], losses["compiled"]
    assert [s for s, _ in compiled] == [s for s, _ in eager] == [1, 2, 3, 4]
    assert math.isclose(compiled[0][1], eager[0][1], rel_tol=1e-4), (compiled, eager)  # same weights, same data
    assert all(math.isclose(c, e, rel_tol=2e-2) for (_, c), (_, e) in zip(compiled, eager)), (compiled, eager)


# ---- (d) bf16 autocast (Accelerate's mixed precision) resumes bitwise on the same device --------------------------


def test_bf16_run_resumes_bitwise_on_the_gpu(cache_dir: str, tmp_path: Path, driver: str) -> None:
    env = deterministic_env(ACCELERATE_MIXED_PRECISION="bf16")
    whole, parts = tmp_path / "whole", tmp_path / "parts"

    def args(out: Path, steps: int) -> list[str]:
        return tiny_args(cache_dir, str(out), train__max_steps=steps, checkpoint__every_steps=2, **GPU_MODEL)

    reference = run_train(args(whole, 4), env=env, script=driver, timeout=TIMEOUT_S)
    assert reference.returncode == 0, describe(reference)
    check_banner(reference, "bf16")
    for steps in (2, 4):  # stop at step 2, then a new process resumes from its checkpoint
        result = run_train(args(parts, steps), env=env, script=driver, timeout=TIMEOUT_S)
        assert result.returncode == 0, describe(result)
        check_banner(result, "bf16")
    assert f"resumed from {parts}/checkpoints/step-00000002 at step 2 (saved by 1 process(es) on {DEVICE})" \
        in result.stdout, describe(result)

    assert_same_run(parts, whole, 4)
    assert all(math.isfinite(loss) for _, loss in train_losses(whole))

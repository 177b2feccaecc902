"""A run that diverged stops in one line; nothing non-finite is ever committed.

A loss that turns NaN or infinite poisons the weights at the next optimizer step, and every later
checkpoint with them; left alone, keep_last would rotate the good checkpoints out and `resume=auto`
would pick the poisoned ones. Reading the loss every step would cost a host sync per step, so the
checks sit where the loop already syncs or copies:
- the loss, summed on the device, is read at every log step (`log.every_steps`, the last step, a stop);
- every tensor a save writes is checked on the host copy, in the writer thread, before the commit
  (ckpt/checkpointer.py): a non-finite one leaves the checkpoint uncommitted and stops the run.
So every checkpoint that exists was checked; retention deletes only older ones after a newer commit,
and never in favour of an unchecked one. Divergence is a property of the config (too high a learning
rate, bad data): a relaunch would diverge again, so it is a PermanentError (exit 2).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch

from tinydist.runtime.exitcodes import PermanentError


class DivergedError(PermanentError):
    """Training produced a non-finite loss or tensor (at `step`, when known). One line; exit 2."""

    def __init__(self, message: str, step: Optional[int] = None) -> None:
        super().__init__(message)
        self.step = step


def nonfinite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity (host tensors: no device sync)."""
    return [name for name, t in tensors.items() if t.is_floating_point() and not _finite(t)]


def _finite(t: torch.Tensor) -> bool:
    # A NaN or an infinity anywhere makes the sum NaN or infinite: one read of the tensor, no temporary
    # (isfinite().all() writes a mask as large as the tensor: 15x slower, and it runs on every local save).
    # Finite values whose sum overflows are rare; they get the element-wise check.
    total = t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(t).all())


def finite_or_none(values: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics as strict JSON can hold them: NaN and infinities become None (null), never bare `NaN`."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}


class DivergenceGuard:
    """Where the loop last saw finite values, to say where a divergence began."""

    def __init__(self, step: int) -> None:
        self.checked_step = step  # the last step whose weights were seen finite (or gave a finite loss)

    def check_loss(self, loss: float, step: int, last_commit: Optional[int]) -> None:
        """`loss`: the mean over the steps since the last log step, read at step `step` (after the
        optimizer step): a finite one vouches for the weights up to step - 1, which produced it."""
        if math.isfinite(loss):
            self.checked_step = max(self.checked_step, step - 1)
            return
        raise self.error(f"loss is {loss} at step {step}", step, last_commit)

    def error(self, what: str, step: int, last_commit: Optional[int]) -> DivergedError:
        finite = max(self.checked_step, -1 if last_commit is None else last_commit)  # commits were checked
        since = f"first seen between steps {finite} and {step}" if finite < step - 1 else f"first seen at step {step}"
        kept = f"the last checkpoint, step {last_commit}, is finite and kept" if last_commit is not None \
            else "no checkpoint was committed"
        return DivergedError(f"{what} ({since}); {kept}; lower optim.lr, add warmup (optim.warmup_epochs) or "
                             "check the data, then relaunch", step)

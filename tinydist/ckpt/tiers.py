"""A run's checkpoints in two tiers: the durable tier (`checkpoint.dir`: local, shared or a bucket; by
steps or by the clock) and, with `checkpoint.local_dir`, a local tier on each machine every
`checkpoint.local_every_steps` (local.py). docs/design.md, "Two tiers".

While the local tier is on, a durable save is a copy of a committed local checkpoint (promote.py),
never a second snapshot. Saves the run waits for — a stop, the last step — go straight to the durable
tier under the ordinary protocol, every rank writing its shards: a stop must leave a checkpoint that
outlives the machine. Whether the copies are possible is agreed by every rank at each step boundary
(`lose_local`): once any machine's local tier is switched off, every durable save is an ordinary one
again, starting at once.

Restore takes the newest committed checkpoint of this run across both tiers (`local_restore_point`):
each machine reads its own local tier, the ranks agree on the newest step every machine has, and
that wins over the durable tier when it is at least as new. A new machine (empty local tier) makes
them fall back to the durable tier.
"""

from __future__ import annotations

from typing import Callable, Optional

from tinydist.ckpt.checkpointer import Checkpointer, Sets
from tinydist.ckpt.local import LocalTier
from tinydist.ckpt.promote import Promoter
from tinydist.ckpt.record import folder_step
from tinydist.ckpt.state import TrainState
from tinydist.runtime.peers import Peers


class Tiers:
    def __init__(self, durable: Checkpointer, local: Optional[LocalTier] = None,
                 promoter: Optional[Promoter] = None, log: Callable[[str], None] = print) -> None:
        self.durable, self.local, self.promoter, self.log = durable, local, promoter, log
        # Every rank's view, changed only by an agreement: durable saves are copies of local ones.
        self.local_active = local is not None

    @property
    def fault(self) -> Optional[BaseException]:
        """What should stop the run: the durable tier failing too long, the lease lost, a NaN in any save."""
        return (self.durable.fault or (self.promoter and self.promoter.fault)
                or (self.local and self.local.fault) or None)

    @property
    def last_commit(self) -> Optional[int]:
        """The newest step committed or resumed from, in either tier (every commit was checked finite)."""
        steps = [s for s in (self.durable.last_commit, self.local and self.local.checkpointer.last_commit)
                 if s is not None]
        return max(steps) if steps else None

    @property
    def local_failed(self) -> bool:
        """This machine's local tier was switched off (the ranks agree on it: `lose_local`)."""
        return self.local is not None and self.local.failed is not None

    def snapshot_barrier(self) -> None:
        self.durable.snapshot_barrier()
        if self.local is not None:
            self.local.snapshot_barrier()

    def lose_local(self, any_failed: bool) -> bool:
        """After the step boundary's agreement: True the first time some machine's local tier is off, when
        a durable save is due at once (the copies stop; the last one may never have been made)."""
        if not (self.local_active and any_failed):
            return False
        self.local_active = False
        self._stop_copying()
        self.log("the local tier is off on some machine: durable saves are ordinary saves from here on")
        return True

    def local_due(self, step: int) -> bool:
        """The same answer on every rank (a save syncs BN buffers, a collective); ranks that do not write
        the local tier, or whose tier is off, return at once from the save."""
        return self.local_active and step % self.local.every_steps == 0

    def save(self, step: int, sets: Sets, state: TrainState, *, durable: bool, blocking: bool) -> None:
        """Checkpoint `step`: in the local tier (`durable` False), or a durable one — copied from a local
        save while the local tier is on, otherwise (and always when `blocking`) an ordinary save."""
        if durable and (blocking or not self.local_active):
            self._stop_copying()  # a copy still running must not race this commit's cleanup
            self.durable.save(step, sets=sets, state=state, blocking=blocking)
            return
        if durable and self.promoter is not None:
            self.promoter.want(step)
        if self.local is not None:
            self.local.save(step, sets, state)

    def progress(self, step: int) -> None:
        if self.local is not None:
            self.local.progress(step)

    def finished(self) -> None:
        """The run is done and exported: this machine's local checkpoints are of no further use."""
        self._stop_copying()
        if self.local is not None:
            self.local.close()
            self.local.remove()

    def wait(self) -> None:
        self.durable.wait()

    def writing(self) -> bool:
        """A durable save is writing in the background now (the local tier's every-step writes are part of a
        step's cost when it is on, not an extra)."""
        return self.durable.writing()

    def close(self, abandon: bool = False) -> None:
        self._stop_copying()
        if self.local is not None:
            self.local.close()
        self.durable.close(abandon=abandon)

    def _stop_copying(self) -> None:
        if self.promoter is not None:
            self.promoter.cancel()
            self.promoter = None


def local_restore_point(tiers: Tiers, peers: Peers, check: Callable[[str, dict], None],
                        say: Callable[[str], None]) -> Optional[str]:
    """The local checkpoint every rank resumes from, or None for the durable tier. A collective: every
    rank calls it. `check(path, record)` vets a candidate's state against the config before it counts."""
    local = tiers.local
    if local is None:
        return None
    steps = local.committed_steps(check)
    mine = steps[0] if steps else -1
    common = -peers.max([-mine])[0]  # the newest step of the machine that is furthest behind
    everywhere = common >= 0 and -peers.max([-int(common in steps)])[0] == 1
    durable = tiers.durable.latest()
    durable_step = folder_step(durable) if durable else -1
    if not everywhere:
        if mine >= 0:
            say(f"local tier: step {mine} here, but not every machine has a local checkpoint of the same step "
                "(a new machine?); resuming from the durable tier")
        return None
    if common < durable_step:
        say(f"local tier: its newest step {common} is older than the durable tier's {durable}; resuming from that")
        return None
    return local.path(common)

"""A run's history as its metrics.jsonl tells it: the series, the stops (preemptions and resumes, with
what came after them), and the losses too wild to draw to scale. What report.py draws, read here."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from typing import Any, Optional

import fsspec

from tinydist.runtime.exitcodes import PermanentError

LOSS_KEYS = ("train/loss", "val/loss", "val_ema/loss")
# The loss axis spans every loss up to CLIP_FACTOR times a robust reference (the 95th percentile of
# the train loss, or the median val loss if that is higher); a loss above is drawn off the top edge
# and marked there. One wild early eval (BN statistics of a few steps) must not flatten the curves.
CLIP_FACTOR = 10.0


class ReportError(PermanentError):
    """Nothing to draw from, or nothing to draw with: no rerun fixes it (exit 2, one line, via cli.run)."""


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """The records of metrics.jsonl. A line that is not a JSON object (torn by a kill mid-write, or an
    edit) is left out: the curves of the others are still true, and the file is never needed to resume."""
    records = []
    with fsspec.open(f"{run_dir.rstrip('/')}/metrics.jsonl", "r") as f:
        for line in f:
            try:
                record = json.loads(line) if line.strip() else None
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def missing_metrics(run_dir: str) -> ReportError:
    run_dir = run_dir.rstrip("/") or "/"
    fs, path = fsspec.core.url_to_fs(run_dir)
    where = f"{run_dir} does not exist" if not fs.exists(path) else f"{run_dir} holds no metrics.jsonl"
    return ReportError(f"{run_dir}/metrics.jsonl not found: {where}; give a run's train.output_dir "
                       "(the folder training writes metrics.jsonl, checkpoints/ and model/ into)")


def series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(r["epoch"], r[key]) for r in records if key in r]
    return [p[0] for p in points], [p[1] for p in points]


@dataclass
class Stop:
    """Where a run stopped and/or came back: a preempted event, the resumed event that follows it,
    or a resumed event with no preemption before it (a hard kill, or a rerun of a finished run)."""

    preempted: Optional[dict[str, Any]] = None
    resumed: Optional[dict[str, Any]] = None

    @property
    def kind(self) -> str:
        if self.preempted is None:
            return "unpaired resume"
        return "preempted" if self.resumed is None else "preempted+resumed"

    @property
    def epoch(self) -> float:
        return (self.preempted or self.resumed or {}).get("epoch", 0.0)

    @property
    def same_place(self) -> bool:
        return (self.preempted is not None and self.resumed is not None
                and self.preempted.get("step") == self.resumed.get("step"))

    def describe(self) -> str:
        def where(r: dict[str, Any]) -> str:
            return f"step {r.get('step', '?')} (epoch {r.get('epoch', 0.0):.4g})"

        def back(r: dict[str, Any]) -> str:
            lost = r.get("lost_steps")
            tier = f" from the {r['tier']} tier" if r.get("tier") else ""
            return (f"resumed on {r.get('world_size', '?')} proc. ({r.get('device', '?')}){tier}"
                    + (f", {lost} step(s) redone" if isinstance(lost, int) else ""))

        p, r = self.preempted, self.resumed
        if p is None:
            assert r is not None
            return f"{where(r)}: {back(r)}, no preemption logged before it (after a hard kill, or a rerun)"
        stopped = f"preempted ({p['signal']})" if p.get("signal") else "preempted"
        if r is None:
            return f"{where(p)}: {stopped}, not resumed (yet)"
        if self.same_place:
            return f"{where(p)}: {stopped}, {back(r)}"
        return f"{where(p)}: {stopped}; {back(r)} at {where(r)}"


def stops(records: list[dict[str, Any]]) -> list[Stop]:
    """Events in file order; each resumed event answers the last preempted event not yet answered."""
    found: list[Stop] = []
    pending: Optional[Stop] = None
    for record in records:
        if record.get("event") == "preempted":
            pending = Stop(preempted=record)
            found.append(pending)
        elif record.get("event") == "resumed":
            if pending is not None:
                pending.resumed, pending = record, None
            else:
                found.append(Stop(resumed=record))
    return found


def plural(n: int, word: str, many: Optional[str] = None) -> str:
    return f"{n} {word if n == 1 else (many or word + 's')}"


def title_for(name: str, found: list[Stop]) -> str:
    """'runs/demo (2 preemptions, 3 resumes: 1 after a kill or a rerun)': only preempted events count as
    preemptions; a resume that follows none (a hard kill, or a rerun of a finished run) is said apart."""
    preemptions = sum(s.preempted is not None for s in found)
    resumes = sum(s.resumed is not None for s in found)
    unpaired = sum(s.kind == "unpaired resume" for s in found)
    counts = f"{plural(preemptions, 'preemption')}, {plural(resumes, 'resume')}"
    if unpaired:
        counts += f": {unpaired} after a kill or a rerun"
    return f"{name} ({counts})"


def loss_clip(records: list[dict[str, Any]]) -> tuple[Optional[float], list[dict[str, Any]]]:
    """(threshold, losses above it) for the loss axis; (None, []) when nothing needs clipping. The EMA's
    val loss is clipped at the same threshold but does not set it (its early evals average weights from
    the first steps: a reference that would follow them would not clip anything)."""
    train = [r["train/loss"] for r in records if finite_positive(r.get("train/loss"))]
    val = [r["val/loss"] for r in records if finite_positive(r.get("val/loss"))]
    references = []
    if train:
        references.append(_percentile(train, 95))
    if val:
        references.append(statistics.median(val))
    if not references:
        return None, []
    threshold = CLIP_FACTOR * max(references)
    clipped = [{"key": key, "step": r.get("step"), "epoch": r["epoch"], "value": float(r[key])}
               for r in records for key in LOSS_KEYS
               if key in r and isinstance(r[key], (int, float)) and not r[key] <= threshold]  # NaN counts too
    return threshold, clipped


def finite_positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    at = (len(ordered) - 1) * q / 100
    lo = math.floor(at)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (at - lo)


def clip_notes(clipped: list[dict[str, Any]]) -> list[str]:
    """'1 val loss above the axis (1047 at step 24)', one line per key; NaNs said apart."""
    notes = []
    for key in LOSS_KEYS:
        name, names = key.replace("/", " "), key.replace("/", " ").replace("loss", "losses")
        above = [c for c in clipped if c["key"] == key and not math.isnan(c["value"])]
        nans = [c for c in clipped if c["key"] == key and math.isnan(c["value"])]
        if above:
            shown = ", ".join(f"{c['value']:.4g} at step {c['step']}" for c in above[:3])
            more = f", {len(above) - 3} more" if len(above) > 3 else ""
            notes.append(f"{plural(len(above), name, names)} above the axis ({shown}{more})")
        if nans:
            steps = ", ".join(str(c["step"]) for c in nans[:5]) + (", ..." if len(nans) > 5 else "")
            notes.append(f"{plural(len(nans), name, names)} NaN, marked at the top edge (step {steps})")
    return notes

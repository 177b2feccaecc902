"""Render a run's metrics.jsonl as a picture: loss and accuracy curves, preemptions marked.

    python -m tinydist.report runs/smoke [--out runs/smoke/curves.png]

Needs matplotlib (`pip install -e '.[report]'`).
"""

from __future__ import annotations

import argparse
import math
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Optional, Sequence

import fsspec

from tinydist.export.history import (LOSS_KEYS, ReportError, clip_notes, finite_positive, loss_clip, missing_metrics,
                                     plural, read_metrics, series, stops, title_for)
from tinydist.runtime import cli

INSTALL_HINT = "the report needs matplotlib: pip install -e '.[report]'"
# Colour says which metric, style which weights: raw solid with filled markers, the EMA (val_ema/*, on in
# both recipes) dashed with hollow markers. Flip TTA (cyan, dotted: green and purple are event lines) is
# drawn for top-1 only: top-5 sits near 1.0, where two more curves would only hide the others.
# (key, colour, line style, marker, hollow marker)
LOSS_CURVES = (("train/loss", "C0", "-", "", False), ("val/loss", "C1", "-", "o", False),
               ("val_ema/loss", "C1", "--", "o", True))
ACCURACY_CURVES = (("val/top1", "C0", "-", "o", False), ("val/top5", "C1", "-", "s", False),
                   ("val_ema/top1", "C0", "--", "o", True), ("val_ema/top5", "C1", "--", "s", True),
                   ("val/top1_flip", "C9", ":", "^", False), ("val_ema/top1_flip", "C9", ":", "^", True))
# A log axis labels only powers of 10 by default: a loss going from 5 to 0.07 would read "1" and "0.1"
# and nothing else. Labelled ticks at 1-2-5 or every integer multiple, whichever first gives this many.
MIN_LOSS_LABELS = 4
MAX_EVENT_LINES = 8  # events described one per line under the plots; more are summarised
PREEMPTED, RESUMED, UNPAIRED = "tab:red", "tab:green", "tab:purple"
# Red and green dashes that fill each other's gaps: a preemption and its resume at the same step read
# as one red-green line, and each stays visible alone.
PREEMPTED_DASHES, RESUMED_DASHES = (0, (5, 5)), (5, (5, 5))


def log_ticks(low: float, high: float) -> list[float]:
    """Labelled ticks for a log axis from low to high: powers of 10 when they alone give MIN_LOSS_LABELS
    or more, else 1-2-5, else every integer multiple (1..9), else (an axis inside a factor of ~2)
    evenly spaced round values."""
    from matplotlib.ticker import MaxNLocator

    if not (0 < low < high and math.isfinite(high)):
        return []
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
    ticks: list[float] = []
    for subs in ((1,), (1, 2, 5), range(1, 10)):
        ticks = [float(f"{m * 10.0 ** e:.12g}") for e in range(first, last + 1) for m in subs]
        ticks = [t for t in ticks if low <= t <= high]
        if len(ticks) >= MIN_LOSS_LABELS:
            return ticks
    even = [float(f"{t:.12g}") for t in MaxNLocator(nbins=MIN_LOSS_LABELS + 1).tick_values(low, high)]
    even = [t for t in even if low <= t <= high]
    return even if len(even) > len(ticks) else ticks


def _label_log_axis(ax: Any) -> None:
    """Fixes the loss axis's labelled ticks for its final limits (log_ticks); unlabelled minor ticks at
    every integer multiple stay. Call once the limits are set."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    low, high = ax.get_ylim()
    ticks = log_ticks(low, high)
    if not ticks:
        return
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax.yaxis.set_minor_locator(LogLocator(base=10, subs=tuple(range(1, 10)), numticks=100))
    ax.yaxis.set_minor_formatter(NullFormatter())


def build_figure(records: list[dict[str, Any]], name: str) -> tuple[Any, dict[str, Any]]:
    """The picture as a matplotlib Figure (not drawn anywhere yet), and what it says:
    {"title", "preemptions", "resumes", "unpaired_resumes", "stops": [str], "clipped": [...], "notes": [str],
    "loss_ylim"}."""
    from matplotlib.figure import Figure
    from matplotlib.legend_handler import HandlerTuple
    from matplotlib.lines import Line2D
    from matplotlib.textpath import TextPath

    found = stops(records)
    threshold, clipped = loss_clip(records)
    notes = clip_notes(clipped)
    described = [s.describe() for s in found]
    tagged = len(found) <= MAX_EVENT_LINES  # numbered tags above the plots, one footer line each
    footer = [f"{i}: {d}" for i, d in enumerate(described, 1)] if tagged else [
        f"{plural(len(found), 'stop')}, first {described[0]}; last {described[-1]}"]
    footer += notes

    fig = Figure(figsize=(11, 4.2))  # grown below once the legend rows and footer lines are known
    ax_loss, ax_acc = fig.subplots(1, 2)
    curves: dict[str, Any] = {}
    for ax, specs in ((ax_loss, LOSS_CURVES), (ax_acc, ACCURACY_CURVES)):
        for key, colour, dashes, marker, hollow in specs:
            x, y = series(records, key)
            if x:  # a metric the run did not log (EMA or flip TTA off) gets no line and no legend entry
                curves[key], = ax.plot(x, y, color=colour, linestyle=dashes, marker=marker or None, markersize=3.5,
                                       markerfacecolor="white" if hollow else colour, label=key, gid=f"curve-{key}")
    # A little headroom above 1: a top-5 curve at 1.0 is not hidden under the frame.
    ax_loss.set(xlabel="epoch", ylabel="loss", yscale="log")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1.02))
    # Room above each axes for the event tags and clipped-loss values, between the frame and the title.
    ax_loss.set_title("loss", pad=14)
    ax_acc.set_title("validation accuracy", pad=14)
    # One legend row per plot: the accuracy plot's six curves and the loss plot's would not fit in one.
    loss_handles: list[Any] = list(ax_loss.get_lines())
    acc_handles: list[Any] = list(ax_acc.get_lines())
    event_handles: list[Any] = []

    if clipped:
        assert threshold is not None
        kept = [v for k in LOSS_KEYS for v in series(records, k)[1] if finite_positive(v) and v <= threshold]
        top = max(kept) * 1.6 if kept else threshold
        bottom = min(kept) / 1.6 if kept else threshold / 100
        ax_loss.set_ylim(bottom, top)
        edge = ax_loss.get_xaxis_transform()  # x in epochs, y in axes fraction: 1 is the top edge
        # The raw and the EMA val loss of one eval are often clipped together (same colour, same epoch):
        # one triangle, their values side by side after it, the EMA's said.
        after: dict[float, float] = {}  # epoch -> points right of it where the next value goes
        for c in clipped:
            colour = curves[c["key"]].get_color()
            text = f"{'EMA ' if c['key'].startswith('val_ema/') else ''}{c['value']:.4g}"
            if c["epoch"] not in after:
                ax_loss.plot([c["epoch"]], [1.0], "^", color=colour, markersize=7, markeredgecolor="black",
                             transform=edge, clip_on=False, zorder=5, gid="clipped-loss")
            dx = after.setdefault(c["epoch"], 6.0)
            ax_loss.annotate(text, (c["epoch"], 1.0), xycoords=edge, xytext=(dx, 1),
                             textcoords="offset points", ha="left", va="bottom", fontsize=7, color=colour,
                             annotation_clip=False, gid="clipped-loss-value")
            after[c["epoch"]] = dx + TextPath((0, 0), text, size=7).get_extents().width + 5
        loss_handles.append(Line2D([], [], linestyle="none", marker="^", color="gray", markeredgecolor="black",
                                   label="loss above the axis (below)"))
    _label_log_axis(ax_loss)

    # One continuous curve across restarts is the point; the marks show where the restarts were.
    def vline(x: float, colour: str, dashes: Any, gid: str) -> None:
        for ax in (ax_loss, ax_acc):
            ax.axvline(x, color=colour, linestyle=dashes, linewidth=1.5, gid=gid)

    for s in found:
        if s.preempted is not None:
            vline(s.preempted["epoch"], PREEMPTED, PREEMPTED_DASHES, "event-preempted")
        if s.resumed is not None:
            if s.preempted is None:
                vline(s.resumed["epoch"], UNPAIRED, "-.", "event-resumed-unpaired")
            else:
                vline(s.resumed["epoch"], RESUMED, RESUMED_DASHES, "event-resumed")

    def line(colour: str, dashes: Any, label: str = "") -> Any:
        return Line2D([], [], color=colour, linestyle=dashes, linewidth=1.5, label=label)

    apart = [s for s in found if s.kind == "preempted+resumed" and not s.same_place]
    event_labels = []
    if any(s.same_place for s in found):
        event_handles.append((line(PREEMPTED, PREEMPTED_DASHES), line(RESUMED, RESUMED_DASHES)))
        event_labels.append("preempted + resumed (same step)")
    if apart or any(s.kind == "preempted" for s in found):
        event_handles.append(line(PREEMPTED, PREEMPTED_DASHES))
        event_labels.append("preempted")
    if apart:
        event_handles.append(line(RESUMED, RESUMED_DASHES))
        event_labels.append("resumed")
    if any(s.kind == "unpaired resume" for s in found):
        event_handles.append(line(UNPAIRED, "-."))
        event_labels.append("resumed, no preemption before it (a kill or a rerun)")

    if tagged:  # numbered tags just above the frame: never on a curve; the footer says what each is
        for i, s in enumerate(found, 1):
            colour = UNPAIRED if s.preempted is None else PREEMPTED
            for ax in (ax_loss, ax_acc):
                ax.annotate(str(i), (s.epoch, 1.0), xycoords=ax.get_xaxis_transform(), xytext=(0, 2),
                            textcoords="offset points", ha="center", va="bottom", fontsize=7, color=colour,
                            fontweight="bold", annotation_clip=False, gid="event-tag")

    title = title_for(name, found)
    fig.suptitle(title)
    # Inches, bottom up: the footer lines, the legend rows (curves; events), then the plots.
    line_h, row_h, margin = 0.17, 0.26, 0.08
    rows = [r for r in ((loss_handles, [h.get_label() for h in loss_handles]),
                        (acc_handles, [h.get_label() for h in acc_handles]), (event_handles, event_labels)) if r[0]]
    band = margin + line_h * len(footer) + row_h * len(rows)
    fig.set_figheight(4.2 + band)
    height = fig.get_figheight()
    fig.tight_layout(rect=(0, band / height, 1, 1))
    y = band
    for handles, labels in rows:
        y -= row_h
        fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, y / height), ncol=len(handles),
                   fontsize=8, frameon=False, borderaxespad=0, handlelength=3.2,
                   handler_map={tuple: HandlerTuple(ndivide=None)})
    for text in footer:
        fig.text(0.02, y / height, text, fontsize=7.5, va="top", ha="left")
        y -= line_h

    summary = {
        "title": title,
        "preemptions": sum(s.preempted is not None for s in found),
        "resumes": sum(s.resumed is not None for s in found),
        "unpaired_resumes": sum(s.kind == "unpaired resume" for s in found),
        "stops": described,
        "clipped": clipped,
        "notes": notes,
        "loss_ylim": tuple(float(v) for v in ax_loss.get_ylim()),
    }
    return fig, summary


def render(records: list[dict[str, Any]], out: str, name: str) -> dict[str, Any]:
    """Writes the PNG; returns build_figure's summary."""
    fig, summary = build_figure(records, name)
    with fsspec.open(out, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    return summary


def curves_png(run_dir: str) -> Optional[bytes]:
    """The run's curves as PNG bytes, for the exported model's card: drawn afresh from metrics.jsonl when
    matplotlib is installed, else the run's curves.png if one was drawn before, else None. Never raises
    for a missing plotting library or metrics file: the export must not fail for a picture."""
    import io

    run_dir = run_dir.rstrip("/")
    try:
        fig, _ = build_figure(read_metrics(run_dir), run_dir)
        out = io.BytesIO()
        fig.savefig(out, format="png", dpi=110)
        return out.getvalue()
    except (ImportError, FileNotFoundError, ValueError):  # no matplotlib, no metrics, nothing to plot
        pass
    try:
        with fsspec.open(f"{run_dir}/curves.png", "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def curves_png_in_background(run_dir: str) -> Future:
    """`curves_png` on a thread, started now; its Future. train starts it just before the last step's save
    and the export takes the picture from it: drawing (and, in a fresh process, importing matplotlib: ~1 s
    of the export's 1.6 s) overlaps the save instead of following it."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tinydist-curves")
    drawn = pool.submit(curves_png, run_dir)
    pool.shutdown(wait=False)  # takes no more work; the drawing goes on
    return drawn


def _main(argv: Optional[Sequence[str]]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tinydist.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run's train.output_dir (holds metrics.jsonl)")
    parser.add_argument("--out", help="PNG to write (default: RUN_DIR/curves.png)")
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401  (an optional dependency: say how to get it, not a traceback)
    except ImportError as e:  # not installed; or installed but broken (then say why, on the same line)
        missing = isinstance(e, ModuleNotFoundError) and e.name == "matplotlib"
        raise ReportError(INSTALL_HINT if missing else f"{INSTALL_HINT} (import matplotlib: {e})") from e
    try:
        records = read_metrics(args.run_dir)
    except FileNotFoundError as e:
        raise missing_metrics(args.run_dir) from e
    out = args.out or f"{args.run_dir.rstrip('/')}/curves.png"
    render(records, out, args.run_dir)
    print(out)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli.run(lambda: _main(argv))


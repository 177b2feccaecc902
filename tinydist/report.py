"""Render a run's metrics.jsonl as a picture: loss and accuracy curves, preemptions marked.

    python -m tinydist.report runs/smoke [--out runs/smoke/curves.png]

Needs matplotlib (`pip install -e '.[report]'`).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional, Sequence

import fsspec


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    with fsspec.open(f"{run_dir.rstrip('/')}/metrics.jsonl", "r") as f:
        return [json.loads(line) for line in f if line.strip()]


def series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [(r["epoch"], r[key]) for r in records if key in r]
    return [p[0] for p in points], [p[1] for p in points]


def render(records: list[dict[str, Any]], out: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for key, style in (("train/loss", "-"), ("val/loss", "o-")):
        ax_loss.plot(*series(records, key), style, label=key, markersize=3)
    for key, style in (("val/top1", "o-"), ("val/top5", "s-")):
        ax_acc.plot(*series(records, key), style, label=key, markersize=3)
    # One continuous curve across restarts is the point; the marks show where the restarts were.
    for record in records:
        if record.get("event") == "preempted":
            for ax in (ax_loss, ax_acc):
                ax.axvline(record["epoch"], color="tab:red", linestyle="--", linewidth=1)
        elif record.get("event") == "resumed":
            for ax in (ax_loss, ax_acc):
                ax.axvline(record["epoch"], color="tab:green", linestyle=":", linewidth=1.5)
            ax_acc.annotate(f" resumed on {record.get('world_size', '?')} proc. ({record.get('device', '?')})",
                            (record["epoch"], 0.98), rotation=90, va="top", fontsize=7, color="tab:green")
    handles = [plt.Line2D([], [], color="tab:red", linestyle="--", label="preempted"),
               plt.Line2D([], [], color="tab:green", linestyle=":", label="resumed")]
    ax_loss.set(xlabel="epoch", ylabel="loss", yscale="log", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1), title="validation accuracy")
    ax_loss.legend(handles=ax_loss.get_legend_handles_labels()[0] + handles, fontsize=8)
    ax_acc.legend(handles=ax_acc.get_legend_handles_labels()[0] + handles, fontsize=8, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    with fsspec.open(out, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tinydist.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run's train.output_dir (holds metrics.jsonl)")
    parser.add_argument("--out", help="PNG to write (default: RUN_DIR/curves.png)")
    args = parser.parse_args(argv)
    try:
        records = read_metrics(args.run_dir)
    except FileNotFoundError:
        print(f"error: {args.run_dir}/metrics.jsonl not found; expected a run's train.output_dir", file=sys.stderr)
        return 2
    out = args.out or f"{args.run_dir.rstrip('/')}/curves.png"
    stops = sum(r.get("event") == "preempted" for r in records)
    render(records, out, f"{args.run_dir} ({stops} preemption{'s' if stops != 1 else ''})")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

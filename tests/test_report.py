"""The report picture (python -m tinydist.report) and the exported model card's copy of it (curves_png).

metrics.jsonl files are written by hand, in the format tracking.py writes: step/epoch/samples on
every line, train/* and val/* metrics, and `event` lines "preempted" / "resumed".
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import matplotlib  # noqa: F401 - the `report` extra, in `test` too: a missing one fails here, not as a skip
import pytest

from tinydist import report

ROOT = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEPS_PER_EPOCH = 23.5  # the smoke recipe: 235 steps in 10 epochs


def epoch(step: int) -> float:
    return round(step / STEPS_PER_EPOCH, 4)


def smoke_like(events: tuple[tuple[str, int, dict[str, Any]], ...] = (), first_val_loss: float = 2.6
               ) -> list[dict[str, Any]]:
    """A 10-epoch run: train/loss every 10 steps, val/* every epoch, events inserted in step order."""
    records: list[dict[str, Any]] = []
    for step in range(10, 236, 10):
        records.append({"step": step, "epoch": epoch(step), "samples": step * 64,
                        "train/loss": 2.2 * math.exp(-step / 100) + 0.2, "train/lr": 0.1, "train/images_per_s": 900.0})
    for ep in range(1, 11):
        step = round(ep * STEPS_PER_EPOCH)
        val = first_val_loss if ep == 1 else (4.7 if ep == 2 else 0.4 * math.exp(-(ep - 3) / 3) + 0.07)
        records.append({"step": step, "epoch": float(ep), "samples": step * 64, "val/loss": val,
                        "val/top1": min(0.98, 0.1 + 0.15 * ep), "val/top5": min(1.0, 0.5 + 0.2 * ep)})
    records.sort(key=lambda r: r["step"])
    for name, step, details in events:
        at = max(i for i, r in enumerate(records) if r["step"] <= step) + 1
        records.insert(at, {"step": step, "epoch": epoch(step), "samples": step * 64, "event": name, **details})
    return records


PREEMPTED = ("preempted", 84, {"signal": "SIGTERM"})
RESUMED = ("resumed", 84, {"world_size": 2, "device": "cpu"})
RERUN = ("resumed", 235, {"world_size": 1, "device": "cpu"})  # a finished run started again


def write_run(folder: Path, records: list[dict[str, Any]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def lines_by_gid(fig: Any, gid: str) -> list[Any]:
    return [line for ax in fig.axes for line in ax.get_lines() if line.get_gid() == gid]


def legend_texts(fig: Any) -> list[str]:
    return [t.get_text() for legend in fig.legends for t in legend.get_texts()]


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_SIGNATURE), path


def run_report(run_dir: Path, *args: str, prelude: str = "") -> subprocess.CompletedProcess:
    code = f"import sys\n{prelude}\nfrom tinydist import report\nsys.exit(report.main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, str(run_dir), *args], capture_output=True, text=True,
                           cwd=ROOT, timeout=120)


def pixels(fig: Any) -> Any:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].astype(int), canvas.get_renderer()


def column_colours(fig: Any, ax: Any, x: float) -> Any:
    """The pixels of ax's plot area along the vertical line at data x (its middle half, clear of tags)."""
    image, _ = pixels(fig)
    height = image.shape[0]
    px, _ = ax.transData.transform((x, 1.0))
    bbox = ax.get_window_extent()
    rows = slice(int(height - bbox.y1 + bbox.height / 4), int(height - bbox.y0 - bbox.height / 4))
    return image[rows, int(round(px)) - 1:int(round(px)) + 2].reshape(-1, 3)


def near(colours: Any, name: str, tolerance: int = 40) -> bool:
    import numpy as np
    from matplotlib.colors import to_rgb

    target = np.array(to_rgb(name)) * 255
    return bool((np.abs(colours - target).max(axis=1) < tolerance).any())


# --- the command -----------------------------------------------------------------------------------


def test_clean_run_writes_a_png_and_says_zero_preemptions(tmp_path: Path) -> None:
    run = write_run(tmp_path / "clean", smoke_like())
    proc = run_report(run)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{run}/curves.png"
    assert_png(run / "curves.png")

    fig, summary = report.build_figure(report.read_metrics(str(run)), "runs/clean")
    assert summary["title"] == "runs/clean (0 preemptions, 0 resumes)" == fig.get_suptitle()
    assert (summary["preemptions"], summary["resumes"], summary["unpaired_resumes"]) == (0, 0, 0)
    assert summary["clipped"] == [] and summary["notes"] == [] and summary["stops"] == []
    assert not [line for ax in fig.axes for line in ax.get_lines() if (line.get_gid() or "").startswith("event")]
    # Nothing clipped: the loss axis shows every loss.
    low, high = summary["loss_ylim"]
    losses = [r[k] for r in report.read_metrics(str(run)) for k in ("train/loss", "val/loss") if k in r]
    assert low <= min(losses) and high >= max(losses)


def test_out_option_and_missing_metrics(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", smoke_like((PREEMPTED, RESUMED)))
    assert report.main([str(run), "--out", str(tmp_path / "elsewhere.png")]) == 0
    assert_png(tmp_path / "elsewhere.png")
    assert not (run / "curves.png").exists()

    proc = run_report(tmp_path / "nothing-here")
    assert proc.returncode == 2
    assert "metrics.jsonl not found" in proc.stderr and "Traceback" not in proc.stderr


def test_without_matplotlib_one_line_and_exit_2(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", smoke_like())
    proc = run_report(run, prelude="sys.modules['matplotlib'] = None  # as if it were not installed")
    assert proc.returncode == 2
    assert proc.stderr == "error: the report needs matplotlib: pip install -e '.[report]'\n"
    assert proc.stdout == "" and not (run / "curves.png").exists()


# --- preemptions and resumes -----------------------------------------------------------------------


def test_preempted_and_resumed_at_the_same_step_are_both_visible(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", smoke_like((PREEMPTED, RESUMED)))
    assert report.main([str(run)]) == 0
    assert_png(run / "curves.png")

    fig, summary = report.build_figure(report.read_metrics(str(run)), "run")
    assert summary["title"] == "run (1 preemption, 1 resume)"
    assert (summary["preemptions"], summary["resumes"], summary["unpaired_resumes"]) == (1, 1, 0)
    assert summary["stops"] == [f"step 84 (epoch {epoch(84):.4g}): preempted (SIGTERM), resumed on 2 proc. (cpu)"]
    stopped, resumed = lines_by_gid(fig, "event-preempted"), lines_by_gid(fig, "event-resumed")
    assert len(stopped) == len(resumed) == 2  # one of each on both plots
    for a, b in zip(stopped, resumed):
        assert a.axes is b.axes and list(a.get_xdata()) == list(b.get_xdata()) == [epoch(84)] * 2
        assert a.get_color() != b.get_color()
        assert a.get_linestyle() != "-" and b.get_linestyle() != "-"
    # What counts: in the drawn picture, the line at that epoch shows both colours on each plot.
    for ax in fig.axes:
        colours = column_colours(fig, ax, epoch(84))
        assert near(colours, report.PREEMPTED) and near(colours, report.RESUMED), ax.get_title()
    assert "preempted + resumed (same step)" in legend_texts(fig)


def test_a_rerun_of_a_finished_run_is_a_resume_not_a_preemption(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", smoke_like((RERUN,)))
    assert report.main([str(run)]) == 0
    assert_png(run / "curves.png")

    fig, summary = report.build_figure(report.read_metrics(str(run)), "run")
    assert summary["title"] == "run (0 preemptions, 1 resume: 1 after a kill or a rerun)"
    assert (summary["preemptions"], summary["resumes"], summary["unpaired_resumes"]) == (0, 1, 1)
    assert "no preemption" in summary["stops"][0] and "rerun" in summary["stops"][0]
    assert not lines_by_gid(fig, "event-preempted") and not lines_by_gid(fig, "event-resumed")
    unpaired = lines_by_gid(fig, "event-resumed-unpaired")
    assert len(unpaired) == 2 and {line.get_color() for line in unpaired} == {report.UNPAIRED}
    assert report.UNPAIRED not in (report.PREEMPTED, report.RESUMED)
    labels = legend_texts(fig)
    assert "preempted" not in labels and "preempted + resumed (same step)" not in labels
    assert any("no preemption before it" in label for label in labels)


def test_pairing_preemptions_resumes_and_a_kill() -> None:
    """preempted -> resumed (pair); a hard kill -> resumed (alone); preempted, not resumed yet."""
    records = smoke_like((("preempted", 50, {"signal": "SIGTERM"}), ("resumed", 50, {"world_size": 2, "device": "cpu"}),
                          ("resumed", 120, {"world_size": 1, "device": "cuda"}), ("preempted", 200, {})))
    found = report.stops(records)
    assert [s.kind for s in found] == ["preempted+resumed", "unpaired resume", "preempted"]
    assert report.title_for("r", found) == "r (2 preemptions, 2 resumes: 1 after a kill or a rerun)"
    assert found[2].describe() == "step 200 (epoch 8.511): preempted, not resumed (yet)"
    # Resumed at another step than the preemption's (tracking.py cuts the file back to the resume step, so
    # this only comes from an edited file): each line drawn where it happened.
    records = smoke_like((("preempted", 90, {}),)) + [
        {"step": 80, "epoch": epoch(80), "samples": 0, "event": "resumed", "world_size": 1, "device": "cpu"}]
    apart = report.stops(records)
    assert [s.kind for s in apart] == ["preempted+resumed"] and not apart[0].same_place
    fig, _ = report.build_figure(records, "r")
    assert [line.get_xdata()[0] for line in lines_by_gid(fig, "event-preempted")] == [epoch(90)] * 2
    assert [line.get_xdata()[0] for line in lines_by_gid(fig, "event-resumed")] == [epoch(80)] * 2
    assert {"preempted", "resumed"} <= set(legend_texts(fig))


def test_annotations_stay_off_the_curves(tmp_path: Path) -> None:
    """Event tags sit above each plot's frame, never inside it, where the top-5 curve runs at 1.0."""
    records = smoke_like((PREEMPTED, RESUMED, ("preempted", 152, {"signal": "SIGTERM"}),
                          ("resumed", 152, {"world_size": 1, "device": "cpu"}), RERUN), first_val_loss=1047.3)
    fig, summary = report.build_figure(records, "runs/demo")
    _, renderer = pixels(fig)
    tags = [t for ax in fig.axes for t in ax.texts if t.get_gid() == "event-tag"]
    assert sorted(t.get_text() for t in tags) == ["1", "1", "2", "2", "3", "3"]
    for text in [*tags, *(t for ax in fig.axes for t in ax.texts if t.get_gid() == "clipped-loss-value")]:
        box, frame = text.get_window_extent(renderer), text.axes.get_window_extent(renderer)
        assert box.y0 >= frame.y1 - 1, text.get_text()  # at or above the top edge
        title = text.axes.title.get_window_extent(renderer)
        assert box.y1 <= title.y0 + 1, text.get_text()  # below the plot's title
    # The legend rows and footer lines sit below every plot, and the top-5 curve at 1.0 is inside the frame.
    lowest = min(ax.get_tightbbox(renderer).y0 for ax in fig.axes)  # tick labels and axis labels included
    for artist in [*fig.legends, *(t for t in fig.texts if t.get_text() != fig.get_suptitle())]:
        assert artist.get_window_extent(renderer).y1 < lowest
    assert fig.axes[1].get_ylim()[1] > 1.0


# --- the loss axis ---------------------------------------------------------------------------------


def test_one_huge_early_val_loss_does_not_flatten_the_loss_axis(tmp_path: Path) -> None:
    records = smoke_like(first_val_loss=1047.3)
    run = write_run(tmp_path / "run", records)
    assert report.main([str(run)]) == 0
    assert_png(run / "curves.png")

    fig, summary = report.build_figure(records, "run")
    assert summary["clipped"] == [{"key": "val/loss", "step": 24, "epoch": 1.0, "value": 1047.3}]
    assert summary["notes"] == ["1 val loss above the axis (1047 at step 24)"]
    low, high = summary["loss_ylim"]
    ax_loss = fig.axes[0]
    assert ax_loss.get_yscale() == "log" and (low, high) == ax_loss.get_ylim()
    others = [r[k] for r in records for k in ("train/loss", "val/loss") if k in r and r[k] < 1000]
    assert max(others) < high < 20 and low < min(others)  # every other loss shown; the axis spans < 3 decades
    marks = lines_by_gid(fig, "clipped-loss")
    assert len(marks) == 1 and list(marks[0].get_xdata()) == [1.0] and list(marks[0].get_ydata()) == [1.0]
    assert any(t.get_text() == "1047" for t in ax_loss.texts)
    assert "1 val loss above the axis (1047 at step 24)" in [t.get_text() for t in fig.texts]


@pytest.mark.parametrize("train, val, clipped", [
    ([5.3, 4.1, 3.0, 2.2], [14.0, 200.0, 16.0], [200.0]),  # early evals on BN statistics of a few steps
    ([5.3, 4.1, 3.0, 2.2], [4.0, 3.0, 2.5], []),  # an ordinary start: nothing clipped
    ([4.1, 3.0, 2.2, 0.5], [30.0, 35.0, 40.0, 45.0], []),  # val far above train all along (overfitting): kept
    ([2.0, 1.5], [float("nan"), 1.0], [float("nan")]),
])
def test_what_is_clipped(train: list[float], val: list[float], clipped: list[float]) -> None:
    records = [{"step": s, "epoch": s / 10, "train/loss": v} for s, v in enumerate(train, 1)]
    records += [{"step": 10 * i, "epoch": float(i), "val/loss": v} for i, v in enumerate(val, 1)]
    got = [c["value"] for c in report.loss_clip(records)[1]]
    assert len(got) == len(clipped)
    assert all(g == c or (math.isnan(g) and math.isnan(c)) for g, c in zip(got, clipped))


def test_empty_metrics_file_still_draws(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", [])
    assert report.main([str(run)]) == 0
    assert_png(run / "curves.png")


# --- curves_png: the picture in the exported model's folder ------------------------------------------


def test_curves_png_is_drawn_afresh_else_the_old_file_else_none(tmp_path: Path, monkeypatch) -> None:
    run = write_run(tmp_path / "run", smoke_like((PREEMPTED, RESUMED)))
    drawn = report.curves_png(str(run) + "/")
    assert drawn is not None and drawn.startswith(PNG_SIGNATURE) and len(drawn) > 1000
    assert not (run / "curves.png").exists()  # bytes for the caller; nothing written into the run

    (run / "metrics.jsonl").unlink()  # no metrics any more, but a picture drawn before
    (run / "curves.png").write_bytes(PNG_SIGNATURE + b"an earlier picture")
    assert report.curves_png(str(run)) == PNG_SIGNATURE + b"an earlier picture"

    write_run(run, smoke_like())  # metrics again, but no matplotlib: the old picture, not an error
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)  # every import of it fails, as if not installed
    assert report.curves_png(str(run)) == PNG_SIGNATURE + b"an earlier picture"

    assert report.curves_png(str(tmp_path / "never-ran")) is None  # nothing at all: None, never a raise

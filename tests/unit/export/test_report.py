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

from tinydist.export import report

ROOT = Path(__file__).resolve().parents[3]
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



def test_missing_run_dir_or_metrics_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """Under cli.run: the contract's code for "no rerun fixes it", one line naming the path and what it
    should be, no traceback."""
    missing = tmp_path / "nothing-here"
    proc = run_report(missing)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"error: {missing}/metrics.jsonl not found: {missing} does not exist; give a run's train.output_dir "
        "(the folder training writes metrics.jsonl, checkpoints/ and model/ into)"]

    (tmp_path / "empty").mkdir()
    proc = run_report(tmp_path / "empty")
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert f"{tmp_path}/empty holds no metrics.jsonl" in proc.stderr and "Traceback" not in proc.stderr

    assert report.main([str(missing)]) == 2  # the same in process: a code, never a raise


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


# --- the EMA and flip TTA ---------------------------------------------------------------------------


def with_ema(records: list[dict[str, Any]], flip: bool = False) -> list[dict[str, Any]]:
    """val_ema/* (and */top1_flip, */top5_flip) beside every val/* record, as train.py logs them."""
    out = []
    for r in records:
        r = dict(r)
        if "val/top1" in r:
            r.update({"val_ema/loss": r["val/loss"] * 0.8, "val_ema/top1": min(1.0, r["val/top1"] + 0.04),
                      "val_ema/top5": min(1.0, r["val/top5"] + 0.01)})
            if flip:
                r.update({"val/top1_flip": r["val/top1"] + 0.01, "val/top5_flip": r["val/top5"],
                          "val_ema/top1_flip": r["val_ema/top1"] + 0.01, "val_ema/top5_flip": r["val_ema/top5"]})
        out.append(r)
    return out


def curve(fig: Any, key: str) -> Any:
    found = lines_by_gid(fig, f"curve-{key}")
    assert len(found) == 1, key
    return found[0]


def test_ema_curves_are_drawn_beside_the_raw_ones(tmp_path: Path) -> None:
    records = with_ema(smoke_like((PREEMPTED, RESUMED)))
    run = write_run(tmp_path / "run", records)
    assert report.main([str(run)]) == 0
    assert_png(run / "curves.png")

    fig, _ = report.build_figure(report.read_metrics(str(run)), "run")
    ax_loss, ax_acc = fig.axes
    evals = [r for r in records if "val_ema/top1" in r]
    assert len(evals) == 10
    for key, ax in (("val_ema/loss", ax_loss), ("val_ema/top1", ax_acc), ("val_ema/top5", ax_acc)):
        ema, raw = curve(fig, key), curve(fig, key.replace("val_ema/", "val/"))
        assert ema.axes is ax and raw.axes is ax
        assert list(ema.get_xdata()) == [r["epoch"] for r in evals]
        assert list(ema.get_ydata()) == [r[key] for r in evals]
        # Told apart from the raw curve of the same metric by its style, and named in the legend.
        assert ema.get_linestyle() != raw.get_linestyle()
        assert ema.get_markerfacecolor() != raw.get_markerfacecolor()
        assert key in legend_texts(fig)
    # Nothing about flip TTA when the run did not log it.
    assert not [t for t in legend_texts(fig) if "flip" in t]

    # A run without the EMA: no EMA line, no EMA legend entry.
    fig, _ = report.build_figure(smoke_like(), "run")
    assert not [line for ax in fig.axes for line in ax.get_lines() if "val_ema" in (line.get_gid() or "")]
    assert not [t for t in legend_texts(fig) if "val_ema" in t]


def test_flip_tta_top1_is_drawn_top5_is_not() -> None:
    records = with_ema(smoke_like(), flip=True)
    fig, _ = report.build_figure(records, "run")
    for key in ("val/top1_flip", "val_ema/top1_flip"):
        line = curve(fig, key)
        assert line.axes is fig.axes[1]
        assert list(line.get_ydata()) == [r[key] for r in records if key in r]
        assert line.get_linestyle() not in (curve(fig, "val/top1").get_linestyle(),
                                            curve(fig, "val_ema/top1").get_linestyle())
        assert key in legend_texts(fig)
    # Top-5 with flips sits at ~1.0 on top of the plain top-5: left out, so the plot stays readable.
    assert not lines_by_gid(fig, "curve-val/top5_flip") and not lines_by_gid(fig, "curve-val_ema/top5_flip")
    # Curve colours never reuse an event line's colour.
    from matplotlib.colors import to_hex
    events = {to_hex(c) for c in (report.PREEMPTED, report.RESUMED, report.UNPAIRED)}
    assert not {to_hex(line.get_color()) for ax in fig.axes for line in ax.get_lines()
                if (line.get_gid() or "").startswith("curve-")} & events


def test_legend_rows_fit_the_figure_with_every_curve() -> None:
    records = with_ema(smoke_like((PREEMPTED, RESUMED, RERUN), first_val_loss=1047.3), flip=True)
    fig, _ = report.build_figure(records, "run")
    _, renderer = pixels(fig)
    width = fig.bbox.width
    for legend in fig.legends:
        box = legend.get_window_extent(renderer)
        assert box.x0 >= 0 and box.x1 <= width, [t.get_text() for t in legend.get_texts()]


def test_a_clipped_val_and_ema_loss_of_one_eval_share_a_mark_and_do_not_overlap() -> None:
    records = with_ema(smoke_like(first_val_loss=1047.3))  # val_ema/loss 837.8 at epoch 1: clipped too
    fig, summary = report.build_figure(records, "run")
    assert [(c["key"], c["epoch"]) for c in summary["clipped"]] == [("val/loss", 1.0), ("val_ema/loss", 1.0)]
    assert "1 val_ema loss above the axis (837.8 at step 24)" in summary["notes"]
    assert len(lines_by_gid(fig, "clipped-loss")) == 1  # one mark at epoch 1
    _, renderer = pixels(fig)
    texts = [t for t in fig.axes[0].texts if t.get_gid() == "clipped-loss-value"]
    assert [t.get_text() for t in texts] == ["1047", "EMA 837.8"]
    a, b = (t.get_window_extent(renderer) for t in texts)
    assert a.x1 <= b.x0  # side by side, not on top of each other


# --- the loss axis's labels ------------------------------------------------------------------------


def loss_tick_labels(fig: Any) -> list[tuple[float, str, Any]]:
    """(y, text, box) of each labelled tick drawn on the loss axis, bottom up."""
    _, renderer = pixels(fig)
    ax = fig.axes[0]
    low, high = ax.get_ylim()
    ticks = [t for t in ax.yaxis.get_major_ticks() if t.label1.get_visible() and t.label1.get_text()]
    return sorted((t.get_loc(), t.label1.get_text(), t.label1.get_window_extent(renderer))
                  for t in ticks if low <= t.get_loc() <= high)


@pytest.mark.parametrize("train, val", [
    ([2.4, 1.2, 0.6, 0.3], [2.6, 0.4, 0.1, 0.07]),  # the smoke recipe: 0.07..2.6, ~1.6 decades
    ([5.3, 4.1, 3.0, 2.2, 1.5], [5.0, 3.6, 2.4, 1.7]),  # Tiny ImageNet, 100 epochs: half a decade
    ([0.45, 0.40, 0.36, 0.33], [0.42, 0.38, 0.35]),  # a resumed tail: inside a factor of 1.5
    ([900.0, 50.0, 3.0, 0.01], [400.0, 2.0, 0.02]),  # five decades
])
def test_the_loss_axis_has_enough_readable_labels(train: list[float], val: list[float]) -> None:
    records = [{"step": s, "epoch": float(s), "train/loss": v} for s, v in enumerate(train, 1)]
    records += [{"step": s, "epoch": float(s), "val/loss": v} for s, v in enumerate(val, 1)]
    fig, _ = report.build_figure(records, "run")
    assert fig.axes[0].get_yscale() == "log"
    labels = loss_tick_labels(fig)
    assert report.MIN_LOSS_LABELS == 4 and 4 <= len(labels) <= 12, [t for _, t, _ in labels]
    for y, text, _ in labels:  # each label is the plain number at its tick
        assert math.isclose(float(text), y, rel_tol=0.01), (text, y)
    for (_, _, below), (_, _, above) in zip(labels, labels[1:]):
        assert below.y1 <= above.y0  # no two labels overlap


def test_log_ticks() -> None:
    assert report.log_ticks(0.07, 4.7) == [0.1, 0.2, 0.5, 1.0, 2.0]
    assert report.log_ticks(1.5, 5.3) == [2.0, 3.0, 4.0, 5.0]
    assert report.log_ticks(0.001, 1000) == [0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0]
    assert len(report.log_ticks(2.0, 2.3)) >= 4 and report.log_ticks(1.0, 1.0) == []


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


def test_curves_drawn_in_the_background_are_curves_png_and_do_not_hold_up_the_caller(tmp_path: Path,
                                                                                    monkeypatch) -> None:
    """train starts the picture as the last save begins to write: the call returns at once, the drawing
    goes on, and its result (or its error) is curves_png's."""
    import threading

    run = write_run(tmp_path / "run", smoke_like((PREEMPTED, RESUMED)))
    assert report.curves_png_in_background(str(run)).result(timeout=60) == report.curves_png(str(run))

    release, draws = threading.Event(), []

    def slow_drawing(run_dir: str) -> bytes:
        draws.append(threading.current_thread().name)
        release.wait(timeout=10)
        if not release.is_set():
            raise AssertionError("never released")
        return PNG_SIGNATURE + run_dir.encode()

    monkeypatch.setattr(report, "curves_png", slow_drawing)
    drawing = report.curves_png_in_background("runs/x")
    assert not drawing.done()  # returned while the picture is still being drawn
    release.set()
    assert drawing.result(timeout=10) == PNG_SIGNATURE + b"runs/x"
    assert draws and draws[0].startswith("tinydist-curves")


def test_a_torn_line_is_left_out_not_a_crash(tmp_path: Path) -> None:
    """A kill mid-write can leave half a line at the end of metrics.jsonl: the report draws the rest."""
    run = tmp_path / "run"
    run.mkdir()
    good = [{"step": s, "epoch": s / 10, "samples": s * 64, "train/loss": 2.0 / s} for s in range(1, 6)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good) + '{"step": 6, "epo')
    assert report.read_metrics(str(run)) == good
    assert report.main([str(run), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes().startswith(b"\x89PNG")


def test_a_resume_after_a_crash_says_its_tier_and_the_steps_it_redid() -> None:
    records = smoke_like((("resumed", 120, {"world_size": 1, "device": "cpu", "tier": "local", "lost_steps": 1}),
                          ("resumed", 160, {"world_size": 2, "device": "cpu", "tier": "durable", "lost_steps": None})))
    first, second = report.stops(records)
    assert first.describe() == ("step 120 (epoch 5.106): resumed on 1 proc. (cpu) from the local tier, 1 step(s) "
                                "redone, no preemption logged before it (after a hard kill, or a rerun)")
    assert "from the durable tier, no preemption" in second.describe()

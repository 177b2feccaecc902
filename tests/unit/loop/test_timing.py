"""tinydist.loop.timing: where a run's wall time goes, and what background saves cost its steps."""

from __future__ import annotations

import pytest

from tinydist.loop.timing import Phases, SaveDrag


def test_save_drag_is_each_saving_step_beyond_the_median_of_the_recent_quiet_ones():
    drag = SaveDrag(window=5)
    drag.step(0.30, saving=True)  # no quiet step yet: nothing to compare with, nothing counted
    assert drag.seconds == 0.0
    for seconds in (0.10, 0.12, 0.50, 0.11, 0.09):  # median 0.11: one slow quiet step does not move it
        drag.step(seconds, saving=False)
    drag.step(0.20, saving=True)
    drag.step(0.05, saving=True)  # faster than the median: no negative drag
    assert drag.seconds == pytest.approx(0.09)
    for seconds in (0.30, 0.30, 0.30):  # the window slides: the oldest quiet steps leave it
        drag.step(seconds, saving=False)
    drag.step(0.40, saving=True)  # window now 0.11, 0.09, 0.30, 0.30, 0.30: median 0.30
    assert drag.seconds == pytest.approx(0.09 + 0.10)


def test_the_drag_is_reported_inside_the_steps_not_beside_them():
    phases = Phases()
    for _ in range(3):
        phases.save_drag.step(0.1, saving=False)
    phases.save_drag.step(0.6, saving=True)
    metrics = phases.as_metrics()
    assert metrics["time/save_drag_s"] == pytest.approx(0.5)
    assert set(metrics) == {"time/data_s", "time/startup_s", "time/validation_s", "time/saves_s", "time/export_s",
                            "time/steps_s", "time/wall_s", "time/save_drag_s"}
    assert phases.describe().endswith("; the steps include 0.5 s of slowdown while saves wrote in the background")
    assert "slowdown" not in Phases().describe()

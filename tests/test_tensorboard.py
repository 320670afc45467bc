"""report.tensorboard: rank 0's step metrics and evaluations as TensorBoard scalars, read back
with TensorBoard's own reader. In-process (the run end to end: tests/test_train_e2e.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytest.importorskip("tensorboard")  # the test extra installs it (pyproject.toml)

from tensorboard.backend.event_processing.event_accumulator import (
    EventAccumulator,
)

from fne_dist.reporters import TensorBoardReporter


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def test_a_resumed_run_replaces_the_steps_it_redoes(tmp_path: Path) -> None:
    """Invariant: a resume after logged step 2 keeps steps 1-2 of the first attempt and shows
    the second attempt's values for the steps it redoes (no step twice), as train_log.jsonl
    does (an evaluation after step 2 goes too: the resumed run redoes it); a NaN loss stays
    NaN; evaluations are ``val/...`` at their step; non-numbers are not written."""
    first = TensorBoardReporter(tmp_path)
    first.resumed(0)
    for step in range(4):  # logged steps 1..4
        first.step(step, {"loss": float(step), "gate_open": True, "note": "text"})
        if step + 1 in (2, 4):
            first.evaluation(step + 1, "val", {"rsum": 10.0 + step})
    first.close()
    second = TensorBoardReporter(tmp_path)
    second.resumed(2)
    second.step(2, {"loss": 30.0, "gate_open": False})
    second.step(3, {"loss": float("nan"), "gate_open": False})
    second.close()
    series = _scalars(tmp_path)
    assert set(series) == {"loss", "gate_open", "val/rsum"}
    assert series["loss"][:3] == [(1, 0.0), (2, 1.0), (3, 30.0)]
    assert series["loss"][3][0] == 4 and math.isnan(series["loss"][3][1])
    assert series["gate_open"] == [(1, 1.0), (2, 1.0), (3, 0.0), (4, 0.0)]
    assert series["val/rsum"] == [(2, 11.0)]

"""bench/quality.py --smoke runs end to end (the CI form of the quality benchmark)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("quality", ROOT / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_smoke_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Invariant: the smoke benchmark trains each smoke variant through the project's step,
    reports finite strict/group rsum and group mAP for every run, P_fn precision/recall where
    the posterior exists, and writes results.md, runs.json and a PNG chart."""
    quality = _bench()
    runs = quality.main(["--smoke", "--out", str(tmp_path)])
    assert list(runs) == list(quality.SMOKE_VARIANTS)
    for name, seeds in runs.items():
        assert len(seeds) == 1
        for key in ("rsum", "group_rsum", "group_map", "wall_s"):
            assert math.isfinite(seeds[0][key]), (name, key)
        assert 0 <= seeds[0]["rsum"] <= seeds[0]["group_rsum"] + 1e-9 <= 600 + 1e-9
    assert "fn_pfn_recall" in runs["fne"][0]  # measured where the posterior exists
    # the CLI's report (the last epoch's test) beside the val-selected one
    assert all(math.isfinite(r[0]["end_group_map"]) for r in runs.values())
    assert "fn_pfn_recall" in runs["fne_sum_intra"][0]
    assert "fn_pfn_recall" not in runs["window"][0]
    text = (tmp_path / "results.md").read_text()
    assert all(f"| {name} |" in text for name in quality.SMOKE_VARIANTS)
    assert (tmp_path / "runs.json").exists() and "best FNE configuration" in capsys.readouterr().out
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the chart


def test_gap_share_and_bootstrap_by_hand() -> None:
    """Invariant: the gap share is (x − vse0)/(best oracle − vse0) on the means, the best
    oracle being the family's (fne + mask or vse0 + mask) with the higher mean of that metric;
    the goal lines measure the best FNE form against vse0 and InfoNCE; the paired bootstrap
    interval of constant differences is that constant."""
    quality = _bench()
    runs = {
        "vse0": [{"group_map": 40.0}, {"group_map": 42.0}],
        "infonce": [{"group_map": 30.0}, {"group_map": 30.0}],
        "oracle": [{"group_map": 50.0}, {"group_map": 52.0}],
        "vse0_oracle": [{"group_map": 60.0}, {"group_map": 62.0}],
        "fne_sum": [{"group_map": 50.0}, {"group_map": 52.0}],
    }
    assert quality.best_oracle(runs) == "vse0_oracle"
    assert quality.gap_share(runs, "fne_sum") == pytest.approx(0.5)
    lines = "\n".join(quality.goals(runs))
    assert "fne_sum beats vse0" in lines and "fne_sum beats infonce" in lines
    assert "50% of the vse0 → vse0_oracle group_map gap" in lines
    assert quality.paired_bootstrap([3.0, 5.0, 7.0], [1.0, 3.0, 5.0]) == (2.0, 2.0)


def test_a_run_that_exits_non_zero_fails_the_goals() -> None:
    """Invariant (``--loop``): a form with a run that exited non-zero through the CLI is never
    the best FNE form and its goal line says FAIL; a crashed baseline gives no comparison."""
    quality = _bench()
    ok = [{"group_rsum": 500.0, "group_map": 50.0}, {"group_rsum": 502.0, "group_map": 51.0}]
    runs = {
        "vse0": ok,
        "infonce": [{"failed": 1.0, "wall_s": 1.0}, *ok[1:]],
        "fne_sum_intra": [{"failed": 2.0, "wall_s": 1.0}, {"group_rsum": 900.0}],
        "fne_intra": ok,
    }
    assert quality.best_fne(runs) == "fne_intra"
    lines = quality.goals(runs)
    assert "FAIL fne_sum_intra exited non-zero through the CLI (--loop)" in lines
    assert "FAIL infonce exited non-zero: no comparison" in lines

"""Long-task progress (fne_dist/progress.py), shard errors and the gradient norm: what the
metrics and progress lines rest on. Fake clocks; no training run."""

from __future__ import annotations

import logging
import math
import threading
import time
from pathlib import Path

import pytest
import torch
from prometheus_client import generate_latest

from fne_dist import progress
from fne_dist.config import load_config
from fne_dist.data.decode import REASONS
from fne_dist.engine import DDPEngine
from fne_dist.monitoring import last_grad_norm
from fne_dist.monitoring.metrics_reporter import MetricsReporter
from fne_dist.monitoring.sinks import PromSink
from fne_dist.progress import TaskProgress, human_seconds
from fne_dist.reporters import Progress

from .shard_factory import write_dataset
from .test_data_stream import make_stream, run_epoch

ROOT = Path(__file__).resolve().parents[1]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fne_dist"]


def test_log_lines_every_period_with_share_elapsed_and_time_left(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Invariant: off a terminal, a long task writes one line per ``every_s`` (not per
    update) with done/total, percent, elapsed and the time left at the rate so far, and a
    closing line; the numbers are the clock's, not made up."""
    clock = FakeClock()
    caplog.set_level(logging.INFO, logger="fne_dist")
    bar = TaskProgress("feature_cache", "feature cache val", 5000, "samples", 30, clock, tty=False)
    for t, n in ((10, 300), (20, 300), (41, 600), (50, 1000), (71, 1000)):
        clock.now = t
        bar.update(n)
    clock.now = 100
    bar.update(1800)
    bar.close()
    # rate 1200 samples / 41 s: 3800 left take ~130 s, shown as 2 min
    assert lines(caplog) == [
        "feature cache val: 1200/5000 samples (24%), 41 s, ~2 min left",
        "feature cache val: 3200/5000 samples (64%), 71 s, ~40 s left",
        "feature cache val: done, 5000 samples in 2 min",  # t = 100: 29 s after the last
    ]


def test_a_short_task_prints_nothing(caplog: pytest.LogCaptureFixture) -> None:
    """Invariant: a task that ends before the first period writes no line at all (no noise
    for the many short evaluations), but still reports itself finished to the listeners."""
    clock = FakeClock()
    seen: list[tuple[str, float, float]] = []
    progress.add_listener(lambda *a: seen.append(a))
    try:
        caplog.set_level(logging.INFO, logger="fne_dist")
        with TaskProgress("evaluation", "evaluation", 10, "items", 30, clock, tty=False) as bar:
            clock.now = 5
            bar.update(4)
        assert lines(caplog) == []
    finally:
        progress._listeners.clear()
    assert seen[0] == ("evaluation", 0.0, 0.0)
    assert seen[1] == ("evaluation", 0.4, 5.0)
    assert seen[-1] == ("evaluation", 1.0, 5.0)


def test_failed_task_is_not_reported_done(caplog: pytest.LogCaptureFixture) -> None:
    """Invariant: a task left by an exception is not reported finished (fraction stays where
    it stopped) and writes no "done" line."""
    clock = FakeClock()
    caplog.set_level(logging.INFO, logger="fne_dist")
    bar = TaskProgress("checkpoint_upload", "upload", 4, "files", 1, clock, tty=False)
    with pytest.raises(RuntimeError), bar:
        clock.now = 2
        bar.update()
        raise RuntimeError("network")
    assert bar.fraction == 0.25
    assert not any("done" in line for line in lines(caplog))


def test_unknown_total_and_unknown_task() -> None:
    """Invariant: without a total there is no percentage or estimate (never a division by 0);
    a task name outside TASKS is refused (its metric series would not exist)."""
    clock = FakeClock()
    bar = TaskProgress("ray_start", "ray start", None, "", 30, clock, tty=False)
    clock.now = 95
    assert bar.line(clock.now) == "ray start: 0 , 2 min"
    assert bar.fraction == 0.0
    with pytest.raises(ValueError, match="unknown progress task 'upload'"):
        TaskProgress("upload", "x", 1, tty=False)
    assert [human_seconds(s) for s in (5, 89, 600, 7200)] == ["5 s", "89 s", "10 min", "2.0 h"]


@pytest.mark.timeout(30)
def test_ticking_writes_lines_while_a_call_blocks(caplog: pytest.LogCaptureFixture) -> None:
    """Invariant: around one blocking call (ray.init) the periodic lines keep coming from a
    daemon thread, and the thread is gone afterwards."""
    caplog.set_level(logging.INFO, logger="fne_dist")
    bar = TaskProgress("ray_start", "ray start", None, "", every_s=0.05, tty=False)
    with bar.ticking(period_s=0.01):
        time.sleep(0.3)
    bar.close()
    assert sum(line.startswith("ray start: 0 ,") for line in lines(caplog)) >= 2
    assert not any(t.name == "fne-progress-ray_start" for t in threading.enumerate())


def _sample(registry, name: str, **labels: str) -> float:
    for family in registry.collect():
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(name)


def test_metrics_reporter_exports_task_progress_and_shard_errors() -> None:
    """Invariant: a rank's /metrics has fne_task_progress/fne_task_seconds for every task from
    the first scrape (NaN), then the values the progress helper reports; fne_shard_errors_total
    grows by the deltas of the cumulative counts the loop reports."""
    sink = PromSink({"run": "r", "rank": "0", "node": "0"})
    limits = {
        "stall_after_s": 60.0,
        "max_bad_fraction": 0.05,
        "checkpoint_max_age_s": 0.0,
        "checkpoint_every_steps": 0.0,
    }
    reporter = MetricsReporter(
        sink,
        {"version": "v", "config_hash": "h", "launcher": "local", "world_size": "1"},
        limits,
        REASONS,
    )
    try:
        for task in progress.TASKS:
            assert math.isnan(_sample(sink.registry, "fne_task_progress", task=task))
        assert _sample(sink.registry, "fne_shard_errors_total", reason="truncated") == 0
        clock = FakeClock()
        bar = TaskProgress("feature_cache", "feature cache", 8, "samples", 30, clock, tty=False)
        clock.now = 3
        bar.update(2)
        assert _sample(sink.registry, "fne_task_progress", task="feature_cache") == 0.25
        assert _sample(sink.registry, "fne_task_seconds", task="feature_cache") == 3
        reporter.progress(Progress(0, 0, 0))
        reporter.progress(Progress(1, 1, 4, shard_errors={"truncated": 2}))
        reporter.progress(Progress(2, 2, 8, shard_errors={"truncated": 3}))
        assert _sample(sink.registry, "fne_shard_errors_total", reason="truncated") == 3
    finally:
        reporter.close()
    assert b"fne_task_progress" in generate_latest(sink.registry)
    assert reporter._task_progress not in progress._listeners  # closed: no longer fed


def test_truncated_shard_is_one_shard_error_and_many_bad_samples(tmp_path: Path) -> None:
    """Invariant: a shard cut in half (its sizes.json still promising 12 samples) is counted
    once as a shard error ("truncated") while each missing sample is a bad sample
    (truncated_tar); an intact shard adds no shard error."""
    paths = write_dataset(tmp_path, [12, 12])
    raw = paths[1].read_bytes()
    paths[1].write_bytes(raw[: len(raw) // 2])
    stream = make_stream(str(tmp_path / "part-{000000..000001}.tar"), batch=2, max_bad_fraction=1.0)
    run_epoch(stream)
    assert stream.counters.shard_errors == {"truncated": 1}
    assert stream.counters.bad["truncated_tar"] > 1


def test_ddp_twin_grad_norm_is_the_clip_norm() -> None:
    """Invariant: the DDP twin's reported gradient norm is the global 2-norm of the gradients
    before clipping (computed here independently), left on the device until a log window reads
    it; without clipping it reports none."""
    cfg = load_config(ROOT / "tests" / "configs" / "tiny.yaml")
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    engine = DDPEngine(model, cfg, total_steps=10)
    assert last_grad_norm(engine) is None  # before any step
    loss = model(torch.randn(5, 4)).square().sum()
    engine.backward(loss)
    grads = [p.grad.clone() for p in model.parameters()]
    expected = torch.sqrt(sum(g.square().sum() for g in grads)).item()
    engine.step()
    assert isinstance(engine.get_global_grad_norm(), torch.Tensor)
    assert last_grad_norm(engine) == pytest.approx(expected, rel=1e-5)
    assert expected > cfg.optim.grad_clip  # the norm before clipping, not after

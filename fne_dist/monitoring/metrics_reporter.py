"""The metrics reporter: turns what the loop reports (log windows, cumulative progress,
evaluations, checkpoints) into the catalog's series on one sink (prometheus_client or Ray).

Everything it reads is already on the host: the log window's means (the loop's one
``float()`` per window), host counters, the phase timer's totals, psutil and the CUDA caching
allocator's host-side counters. It never touches a device tensor.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from pathlib import Path
from typing import Protocol

import psutil
import torch

from .. import progress as progress_listeners
from ..reporters import Progress, Reporter
from .catalog import LOGGED, METRICS, RECALL_KEYS, initial_label_values


class Sink(Protocol):
    def set(self, name: str, labels: tuple[str, ...], value: float) -> None: ...
    def add(self, name: str, labels: tuple[str, ...], amount: float) -> None: ...
    def observe(self, name: str, labels: tuple[str, ...], value: float) -> None: ...
    def touch(self, name: str, labels: tuple[str, ...]) -> None: ...
    def close(self) -> None: ...


class MetricsReporter(Reporter):
    """Every catalog series of one rank, created at construction (gauges NaN until measured,
    counters 0), updated by the loop's reporter calls."""

    def __init__(
        self,
        sink: Sink,
        info: dict[str, str],
        limits: dict[str, float],
        bad_reasons: tuple[str, ...],
        cuda: bool = False,
    ) -> None:
        """info: fne_run_info's labels; limits: stall_after_s, max_bad_fraction,
        checkpoint_max_age_s (0: from checkpoint_every_steps × the median step time),
        checkpoint_every_steps."""
        self.sink, self.limits, self.cuda = sink, limits, cuda
        self.process = psutil.Process()
        self.cpu_seen = 0.0
        self.prev: Progress | None = None
        self.prev_time = time.time()
        self.step_seconds: deque[float] = deque(maxlen=1000)  # for the median step time
        self._create_series(info, bad_reasons)
        self._process_metrics()
        progress_listeners.add_listener(self._task_progress)

    def _task_progress(self, task: str, fraction: float, seconds: float) -> None:
        """A long task's progress (``fne_dist.progress``): host values, any thread."""
        self.sink.set("fne_task_progress", (task,), fraction)
        self.sink.set("fne_task_seconds", (task,), seconds)

    def _create_series(self, info: dict[str, str], bad_reasons: tuple[str, ...]) -> None:
        now = time.time()
        initial = {
            "fne_stall_after_seconds": self.limits["stall_after_s"],
            "fne_max_bad_fraction": self.limits["max_bad_fraction"],
            "fne_checkpoint_timestamp_seconds": now,  # age counts from the start of the run
            "fne_last_step_timestamp_seconds": now,
            "fne_checkpoint_max_age_seconds": self.limits["checkpoint_max_age_s"] or math.nan,
        }
        for m in METRICS:
            if m.gpu_only and not self.cuda:
                continue
            if m.name == "fne_run_info":
                labels = tuple(info[k] for k in m.labels)
                self.sink.set(m.name, labels, 1.0)
                continue
            for labels in initial_label_values(m, bad_reasons):
                if m.kind == "counter":
                    self.sink.add(m.name, labels, 0.0)
                elif m.kind == "histogram":
                    self.sink.touch(m.name, labels)
                else:
                    self.sink.set(m.name, labels, initial.get(m.name, math.nan))

    def step(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            if key in LOGGED:
                name, labels = LOGGED[key]
                self.sink.set(name, labels, float(value))
        if not math.isfinite(metrics.get("loss", 0.0)):
            self.sink.add("fne_nonfinite_loss", (), 1.0)
        self.sink.set("fne_last_step_timestamp_seconds", (), time.time())
        self._process_metrics()

    def progress(self, progress: Progress) -> None:
        now = time.time()
        prev, self.prev = self.prev, progress
        if prev is None:  # the baseline (a resumed run's counts are not new work)
            self.prev_time = now
            return
        micro = progress.micro_steps - prev.micro_steps
        self._add_deltas(progress, prev)
        self.sink.set("fne_optimizer_step", (), progress.opt_step)
        self.sink.set("fne_memory_fill", (), progress.memory_fill)
        if micro > 0:
            elapsed = max(now - self.prev_time, 1e-9)
            self.sink.observe("fne_step_seconds", (), elapsed / micro)
            self.sink.set("fne_samples_per_second", (), (progress.samples - prev.samples) / elapsed)
            self.step_seconds.extend([elapsed / micro] * min(micro, 100))
            self.prev_time = now
        self._checkpoint_max_age()

    def _add_deltas(self, new: Progress, old: Progress) -> None:
        """Counters grow by what changed since the last progress report."""
        pairs = [
            ("fne_samples", (), new.samples - old.samples),
            ("fne_micro_steps", (), new.micro_steps - old.micro_steps),
            ("fne_skipped_steps", (), new.skipped_steps - old.skipped_steps),
        ]
        for phase, seconds in new.phase_seconds.items():
            pairs.append(("fne_phase_seconds", (phase,), seconds - old.phase_seconds.get(phase, 0)))
        for reason, n in new.bad_samples.items():
            pairs.append(("fne_bad_samples", (reason,), n - old.bad_samples.get(reason, 0)))
        for reason, n in new.shard_errors.items():
            pairs.append(("fne_shard_errors", (reason,), n - old.shard_errors.get(reason, 0)))
        for cause, n in new.dropped.items():
            pairs.append(("fne_dropped_samples", (cause,), n - old.dropped.get(cause, 0)))
        for name, labels, delta in pairs:
            if delta > 0:
                self.sink.add(name, labels, float(delta))

    def _checkpoint_max_age(self) -> None:
        """Twice the checkpoint interval: a configured age, else every_steps × median step."""
        every = self.limits["checkpoint_every_steps"]
        if self.limits["checkpoint_max_age_s"] or not every or not self.step_seconds:
            return
        median = statistics.median(self.step_seconds)
        self.sink.set("fne_checkpoint_max_age_seconds", (), 2.0 * every * median)

    def evaluation(self, step: int, split: str, metrics: dict[str, float]) -> None:
        for key, (direction, k) in RECALL_KEYS.items():
            if key in metrics:
                self.sink.set("fne_eval_recall", (split, direction, k), float(metrics[key]))
        for key, name in (("rsum", "fne_eval_rsum"), ("group_rsum", "fne_eval_group_rsum")):
            if key in metrics:
                self.sink.set(name, (split,), float(metrics[key]))

    def checkpoint_done(self, path: Path, step: int, seconds: float) -> None:
        size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
        self.sink.add("fne_checkpoints", (), 1.0)
        self.sink.set("fne_checkpoint_seconds", (), seconds)
        self.sink.set("fne_checkpoint_bytes", (), float(size))
        self.sink.set("fne_checkpoint_timestamp_seconds", (), time.time())

    def close(self) -> None:
        progress_listeners.remove_listener(self._task_progress)
        self.sink.close()

    def _process_metrics(self) -> None:
        with self.process.oneshot():
            rss = self.process.memory_info().rss
            times = self.process.cpu_times()
        self.sink.set("fne_process_resident_memory_bytes", (), float(rss))
        cpu = times.user + times.system
        if cpu > self.cpu_seen:
            self.sink.add("fne_process_cpu_seconds", (), cpu - self.cpu_seen)
            self.cpu_seen = cpu
        if self.cuda:  # the caching allocator's host-side counters: no device sync
            self.sink.set("fne_cuda_memory_allocated_bytes", (), torch.cuda.memory_allocated())
            self.sink.set("fne_cuda_memory_reserved_bytes", (), torch.cuda.memory_reserved())

"""Progress of the phases a run can wait minutes for: the feature-cache
build, shard indexing, evaluation, checkpoint upload and Ray start.

One helper for all of them: on a terminal a tqdm bar; otherwise (a job log, ``ray job logs``, a
Slurm output file) a log line through the ``fne_dist`` logger every ``every_s`` seconds, e.g.
``feature cache val: 1200/5000 samples (24%), 41 s, ~2 min left``, and a closing line when at
least one progress line was written (a phase that ends quickly prints nothing). Every update is
also handed to the listeners (the metrics reporter exports ``fne_task_progress{task}`` and
``fne_task_seconds{task}`` from them), so a dashboard shows a long wait too.

The clock is a parameter, so the tests drive the log lines with a fake one.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType

log = logging.getLogger("fne_dist")

TASKS = ("feature_cache", "shard_index", "evaluation", "checkpoint_upload", "ray_start")
EVERY_S = 30.0  # seconds between progress lines when stderr is not a terminal

Listener = Callable[[str, float, float], None]  # (task, fraction done 0..1, seconds so far)
_listeners: list[Listener] = []


def add_listener(listener: Listener) -> None:
    """Receive every progress update of this process (the metrics reporter does)."""
    _listeners.append(listener)


def remove_listener(listener: Listener) -> None:
    if listener in _listeners:
        _listeners.remove(listener)


def human_seconds(seconds: float) -> str:
    """41 s, 2 min, 1.5 h: a duration as a person reads it in a log line."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class TaskProgress:
    """Progress of one long task: ``update(n)`` as work is done, ``close()`` (or a ``with``
    block) at the end. ``total`` may be None (unknown: no percentage, no estimate)."""

    def __init__(
        self,
        task: str,
        label: str,
        total: int | None,
        unit: str = "items",
        every_s: float = EVERY_S,
        clock: Callable[[], float] = time.monotonic,
        tty: bool | None = None,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"unknown progress task {task!r} (known: {', '.join(TASKS)})")
        self.task, self.label, self.total, self.unit = task, label, total, unit
        self.every_s, self.clock = every_s, clock
        self.done = 0
        self.finished = False  # closed without an error: fraction 1
        self.start = self.last_line = clock()
        self.lines = 0  # progress lines written
        self.bar = None
        if sys.stderr.isatty() if tty is None else tty:
            from tqdm import tqdm

            # delay: a task that ends within 2 s never draws a bar (no flicker for quick ones)
            self.bar = tqdm(
                total=total, desc=label, unit=f" {unit}", file=sys.stderr, leave=False, delay=2.0
            )
        self._notify()

    def __enter__(self) -> TaskProgress:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        err: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(failed=kind is not None)

    @property
    def fraction(self) -> float:
        """Share done, 0..1 (0 while the total is unknown or 0; 1 once finished)."""
        if self.finished:
            return 1.0
        return min(1.0, self.done / self.total) if self.total else 0.0

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        now = self.clock()
        if self.bar is None and now - self.last_line >= self.every_s:
            self.last_line = now
            self.lines += 1
            log.info(self.line(now))
        self._notify()

    @contextlib.contextmanager
    def ticking(self, period_s: float = 1.0) -> Iterator[TaskProgress]:
        """Around one blocking call (``ray.init``): a daemon thread calls ``update(0)`` every
        ``period_s``, so the periodic lines (elapsed time) keep coming while it blocks."""
        stop = threading.Event()

        def tick() -> None:
            while not stop.wait(period_s):
                self.update(0)

        thread = threading.Thread(target=tick, name=f"fne-progress-{self.task}", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()

    def line(self, now: float) -> str:
        """``label: done/total unit (p%), elapsed, ~left`` (without a total: done and elapsed)."""
        elapsed = now - self.start
        if not self.total:
            return f"{self.label}: {self.done} {self.unit}, {human_seconds(elapsed)}"
        text = (
            f"{self.label}: {self.done}/{self.total} {self.unit} "
            f"({100 * self.fraction:.0f}%), {human_seconds(elapsed)}"
        )
        if 0 < self.done < self.total:
            text += f", ~{human_seconds(elapsed * (self.total - self.done) / self.done)} left"
        return text

    def close(self, failed: bool = False) -> None:
        """End the task: the bar goes; a closing line if progress lines were written."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elapsed = self.clock() - self.start
        if self.lines and not failed:
            log.info(
                "%s: done, %d %s in %s", self.label, self.done, self.unit, human_seconds(elapsed)
            )
        self.finished = not failed
        self._notify()

    def _notify(self) -> None:
        seconds = self.clock() - self.start
        for listener in list(_listeners):
            listener(self.task, self.fraction, seconds)

"""Per-phase wall-clock timing of the training step (``train.profile_phases``).

The null timer costs nothing; the real one synchronises CUDA at phase boundaries so GPU time is
attributed to the phase that queued it (on the CPU there is nothing to wait for).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator

import torch


class NullTimer:
    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        yield

    def totals(self) -> dict[str, float]:
        return {}

    def part_totals(self) -> dict[str, float]:
        return {}


class PhaseTimer(NullTimer):
    """Accumulates seconds per phase name, and per part: a part is timed inside a phase
    (backward_step's backward, gradient reduction and optimizer step) and kept apart from the
    phases, so that the phases still add up to the step without counting a second twice."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)
        self.parts: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        with self._timed(self.seconds, name):
            yield

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        with self._timed(self.parts, name):
            yield

    @contextlib.contextmanager
    def _timed(self, into: dict[str, float], name: str) -> Iterator[None]:
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            into[name] += time.perf_counter() - start

    def totals(self) -> dict[str, float]:
        return dict(self.seconds)

    def part_totals(self) -> dict[str, float]:
        return dict(self.parts)


class Timeline:
    """Wall-clock marks of a run's stages, written to metrics.json with train.profile_phases.

    Seconds since the Unix epoch (``time.time``), not a process's own clock: a benchmark puts
    them on one axis with the launching process's start and exit, so that the time outside the
    loop (Ray's start, the workers' imports, the data, the engine, the final evaluation, the
    writes, the shutdown) is split by where it is spent. ``elapsed`` is ``perf_counter``'s.
    """

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self.marks: dict[str, float] = {"train_start": time.time()}

    def mark(self, name: str) -> None:
        self.marks[name] = time.time()

    def elapsed(self) -> float:
        return time.perf_counter() - self._start

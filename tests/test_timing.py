"""The step timer's parts (``PhaseTimer.part``): backward_step's backward, gradient reduction,
gradient check and optimizer step are timed inside the phase and kept apart from the phases,
so the phases still add up to the step (bench/default_run.py sums them) and the parts are not
counted twice; DeepSpeed's reduction is timed by wrapping the engine's own call."""

from __future__ import annotations

import torch

from fne_dist.engine import time_gradient_reduction
from fne_dist.timing import NullTimer, PhaseTimer


def test_a_part_is_timed_apart_from_the_phase_it_runs_in() -> None:
    timer = PhaseTimer(torch.device("cpu"))
    with timer.phase("backward_step"):
        with timer.part("backward"):
            sum(range(1000))
        with timer.part("optimizer_step"):
            pass
    assert set(timer.totals()) == {"backward_step"}  # no part among the phases
    assert set(timer.part_totals()) == {"backward", "optimizer_step"}
    # nested: the parts' seconds are inside the phase's (an order of clocks, not a speed)
    assert sum(timer.part_totals().values()) <= timer.totals()["backward_step"]


def test_the_null_timer_records_no_part() -> None:
    timer = NullTimer()
    with timer.phase("backward_step"), timer.part("backward"):
        pass
    assert timer.totals() == {} and timer.part_totals() == {}


class _Engine:  # the one call of DeepSpeed's engine the wrapper replaces
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def allreduce_gradients(self, bucket_size: int = 5) -> str:
        self.calls.append((bucket_size,))
        return "reduced"


def test_the_gradient_reduction_is_timed_and_still_runs_with_its_arguments() -> None:
    engine, timer = _Engine(), PhaseTimer(torch.device("cpu"))
    time_gradient_reduction(engine, timer)
    assert engine.allreduce_gradients(bucket_size=7) == "reduced"
    assert engine.allreduce_gradients() == "reduced"
    assert engine.calls == [(7,), (5,)]
    assert set(timer.part_totals()) == {"grad_reduce"}


def test_an_engine_without_a_separate_reduction_is_left_alone() -> None:
    class Twin:  # the DDP twin reduces in its buckets' hooks during backward
        pass

    twin, timer = Twin(), PhaseTimer(torch.device("cpu"))
    time_gradient_reduction(twin, timer)
    assert not hasattr(twin, "allreduce_gradients") and timer.part_totals() == {}

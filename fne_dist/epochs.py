"""Epochs of batches that every rank agrees on.

The step's all-gather needs every rank to bring a full batch of the same size. The plan gives
every rank the same number of batches, but bad samples can leave one rank short, and a data
error on one rank must not leave the others blocked in a collective. So before each step the
ranks all-reduce (MIN) one integer (2 = "I have a batch", 1 = "my epoch is over", 0 = "a signal
asks me to stop", −1 = "my data failed"): on 1 every rank ends the epoch there (the batches
others held are counted as dropped), on 0 every rank stops before this step (``interrupt``: a
signal may reach only some ranks), on −1 every rank stops with an error.

On the host (gloo, a CPU training device) the next step's vote rides on this step's gather
(``Lookahead``): the loop reads the next batch at the start of a step, its status travels with
the gathered embeddings, and the next step starts on the agreed minimum without a collective of
its own; only an epoch's first step agrees alone (an all-reduce of its own). Elsewhere (a GPU:
the gather is a device collective, and reading the vote back would wait for the device) it is
one 8-byte all-reduce per step on a gloo group, which never waits for the GPU. The identity at
world size 1.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from . import distributed as dist_ops
from .data.decode import REASONS
from .data.sources import DataError
from .data.stream import RankPosition, TrainStream
from .interrupt import StopRequest
from .reporters import Reporter
from .timing import NullTimer, PhaseTimer


class DataLog:
    """Data counters of a run on one rank: bad samples per reason, dropped samples, epochs cut
    short, and the position after the last batch the loop consumed."""

    def __init__(self, stream: TrainStream, reporter: Reporter) -> None:
        self.stream, self.reporter = stream, reporter
        self.bad: Counter[str] = Counter()
        self.shard_errors: Counter[str] = Counter()  # finished epochs, by reason
        self.dropped = 0  # planned for this rank but never in a batch (cut-short epochs)
        self.dropped_by_plan = 0  # global: N − S·G per epoch (the same on every rank)
        self.epochs_cut_short = 0
        self.position: RankPosition | None = None
        self.in_epoch = False  # the stream's counters hold an epoch not yet in ``bad``

    def bad_so_far(self) -> Counter[str]:
        """Bad samples by reason up to now, the running epoch's included (metrics)."""
        return self.bad + self.stream.counters.bad if self.in_epoch else self.bad.copy()

    def shard_errors_so_far(self) -> Counter[str]:
        """Shard errors by reason up to now, the running epoch's included (metrics)."""
        running = self.stream.counters.shard_errors
        return self.shard_errors + running if self.in_epoch else self.shard_errors.copy()

    def epoch_started(self, epoch: int, first: bool) -> None:
        plan = self.stream.plan(epoch)
        self.in_epoch = True
        self.dropped_by_plan += plan.dropped
        if first:
            self.reporter.message(self.stream.describe(plan))

    def epoch_done(self, epoch: int, steps_run: int, steps_planned: int) -> None:
        self.bad.update(self.stream.counters.bad)
        self.shard_errors.update(self.stream.counters.shard_errors)
        self.in_epoch = False
        if steps_run < steps_planned:
            self.epochs_cut_short += 1
            self.dropped += (steps_planned - steps_run) * self.stream.opts.batch
            self.reporter.message(
                f"epoch {epoch} ended after {steps_run} of {steps_planned} steps: a rank ran out "
                f"of samples (bad samples so far on this rank: {dict(self.bad)})"
            )

    def totals(self, device: torch.device) -> dict:
        """Counts summed over ranks (a collective: every rank calls it)."""
        local = torch.tensor(
            [self.bad.get(r, 0) for r in REASONS] + [self.dropped],
            dtype=torch.float64,
            device=device,
        )
        total = dist_ops.all_reduce_sum(local).tolist()
        bad = {r: int(n) for r, n in zip(REASONS, total, strict=False) if n}
        return {
            "bad_samples": bad,
            "dropped_by_plan": self.dropped_by_plan,
            "dropped_cut_short": int(total[len(REASONS)]),
            "epochs_cut_short": self.epochs_cut_short,  # the same on every rank
            "position": self.position.to_dict() if self.position else None,
        }


def agreed_batches(
    stream: TrainStream,
    total_micro: int,
    data_log: DataLog,
    timer: PhaseTimer | NullTimer,
    resume: RankPosition | None = None,
    stop: StopRequest | None = None,
    ahead: Lookahead | None = None,
) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
    """(micro step, epoch, batch) until ``total_micro`` micro steps have been planned; micro =
    epoch · S + step, so a step's number (and its sampler uniforms) never depends on how
    earlier epochs ended. ``resume`` continues inside its epoch. When any rank's ``stop`` was
    requested, every rank ends here with ``stop.agreed`` set. ``ahead``: where a step votes
    for the next one (``Lookahead``); without votes every step agrees by itself."""
    steps = stream.steps_per_epoch
    epoch = resume.epoch if resume else 0
    first = True
    ahead = ahead or Lookahead()
    while epoch * steps < total_micro:
        data_log.epoch_started(epoch, first)
        start = resume if resume is not None and epoch == resume.epoch else None
        step = start.step if start else 0
        batches = stream.epoch(epoch, start)

        def read_ahead(batches=batches) -> int:
            with timer.phase("data"):
                ahead.read = _next_batch(batches, stop)
            return ahead.read[0]

        try:
            while step < steps and epoch * steps + step < total_micro:
                if ahead.read is not None:  # read during the last step, its vote agreed there
                    (status, batch, position, error), agreed = ahead.take()
                else:
                    with timer.phase("data"):
                        status, batch, position, error = _next_batch(batches, stop)
                        agreed = dist_ops.all_min_int(status)
                if agreed < 0:
                    raise error or DataError(
                        "a data error on another rank stopped the run (see that rank's log)"
                    )
                if agreed == STOP:
                    stop.agreed = True  # type: ignore[union-attr]  # only a stop sends STOP
                    return
                if agreed == EPOCH_OVER:
                    break
                data_log.position = position
                # the next step reads ahead only inside this epoch (an epoch's end closes its
                # stream: the next epoch's first step agrees alone)
                more = step + 1 < steps and epoch * steps + step + 1 < total_micro
                ahead.reader = read_ahead if more else None
                yield epoch * steps + step, epoch, batch
                ahead.reader = None
                step += 1
        finally:
            ahead.reader = None
            batches.close()
        data_log.epoch_done(epoch, step, min(steps, total_micro - epoch * steps))
        epoch += 1
        first = False


BATCH, EPOCH_OVER, STOP, FAILED = 2, 1, 0, -1  # all-reduced with MIN: the lowest wins


@dataclass
class Lookahead:
    """The next step's data agreement, voted during this step so that it can ride on one of
    its collectives. ``vote()`` reads this rank's next batch now and returns its status (None
    when the next step is not in this epoch: it then agrees alone); the step's collective
    hands back every rank's minimum (``agreed``), which ``agreed_batches`` takes instead of an
    all-reduce of its own. Every rank must vote at the same steps (the loop's choice depends
    only on the world size and the device type). A stop signal that arrives after the vote
    acts one step later than it would otherwise."""

    reader: Callable[[], int] | None = None  # set by agreed_batches while a step runs
    read: tuple | None = None  # (status, batch, position, error) of the batch read ahead
    value: int | None = None  # the agreed minimum, once the step's collective returned it

    def vote(self) -> int | None:
        return self.reader() if self.reader is not None else None

    def agreed(self, value: int) -> None:
        self.value = value

    def take(self) -> tuple[tuple, int]:
        """The batch read ahead and the agreed status (agreed alone if no step carried it)."""
        read, value = self.read, self.value
        self.read, self.value = None, None
        assert read is not None
        return read, dist_ops.all_min_int(read[0]) if value is None else value


def _next_batch(batches, stop: StopRequest | None):
    """(status, batch, position, error) of this rank's next batch; no batch is read once a
    stop is requested."""
    if stop is not None and stop.requested:
        return STOP, None, None, None
    try:
        batch, position = next(batches)
        return BATCH, batch, position, None
    except StopIteration:
        return EPOCH_OVER, None, None, None
    except DataError as err:
        return FAILED, None, None, err

"""Which samples each rank and loader worker reads in an epoch: a pure function of the config.

Legend: W ranks, C loader workers per rank ("consumers"; C = 1 without workers), B local batch,
G = W·B global batch, N samples in the epoch, S steps per epoch (the same on every rank).

Exact mode (each sample at most once per epoch):
  1. the shard order is shuffled with (seed, epoch): identical on every rank;
  2. the shards, in that order, form one stream of N samples; S = N // G and the last
     N − S·G ≤ G − 1 samples are dropped (counted and logged);
  3. rank r takes the contiguous range [r·S·B, (r+1)·S·B) of the stream ("split by node");
  4. inside it, consumer c takes a contiguous range of ``batches_c`` whole batches, where
     batches_c = S // C + (c < S % C) ("split by worker"); batch j of a rank comes from consumer
     j mod C, which is the order a DataLoader's round robin delivers them in;
  5. a range is a list of pieces (shard, start, stop): boundaries fall between samples, not
     between shards, so fewer shards than W·C still gives everyone exactly their share (a
     consumer reads, without decoding, the samples of a shard before its piece).

Resampled mode (with replacement, "virtual epochs" of N samples): each consumer draws shards
with probability ∝ its source's weight / the source's shard count, from a generator seeded with
(seed, epoch, rank, consumer), and reads whole shards until it has batches_c batches.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple (stable across processes and Python versions, unlike hash())."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class Piece:
    """Samples [start, stop) of shard ``shard`` (an index into the shard list)."""

    shard: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class ConsumerPlan:
    rank: int
    consumer: int
    batches: int
    pieces: tuple[Piece, ...]  # exact mode; empty in resampled mode (drawn lazily)


@dataclass(frozen=True)
class EpochPlan:
    epoch: int
    steps: int  # S: batches per rank
    shard_order: tuple[int, ...]  # exact mode: the epoch's shard order
    consumers: tuple[tuple[ConsumerPlan, ...], ...]  # [rank][consumer]
    dropped: int  # samples of the epoch no rank reads (exact: N − S·G)
    skipped_reads: int  # samples read but not decoded to reach a piece's start


def batches_of_consumer(steps: int, consumers: int, c: int) -> int:
    return steps // consumers + (1 if c < steps % consumers else 0)


def consumer_of_batch(j: int, consumers: int) -> tuple[int, int]:
    """Batch j of a rank's epoch → (consumer, that consumer's batch index)."""
    return j % consumers, j // consumers


def _cut(order: Sequence[int], sizes: Sequence[int], begin: int, end: int) -> tuple[Piece, ...]:
    """Pieces covering stream positions [begin, end) of the shards concatenated in ``order``."""
    pieces, offset = [], 0
    for shard in order:
        lo, hi = max(begin, offset), min(end, offset + sizes[shard])
        if lo < hi:
            pieces.append(Piece(shard, lo - offset, hi - offset))
        offset += sizes[shard]
        if offset >= end:
            break
    return tuple(pieces)


def exact_plan(
    sizes: Sequence[int], world: int, consumers: int, batch: int, seed: int, epoch: int
) -> EpochPlan:
    """The exact-mode plan of one epoch (see the module docstring)."""
    order = list(range(len(sizes)))
    random.Random(derive_seed("shard-order", seed, epoch)).shuffle(order)
    total = sum(sizes)
    steps = total // (world * batch)
    ranks = []
    skipped = 0
    for r in range(world):
        begin = r * steps * batch
        plans = []
        for c in range(consumers):
            n = batches_of_consumer(steps, consumers, c)
            pieces = _cut(order, sizes, begin, begin + n * batch)
            skipped += sum(p.start for p in pieces)
            plans.append(ConsumerPlan(r, c, n, pieces))
            begin += n * batch
        ranks.append(tuple(plans))
    return EpochPlan(
        epoch, steps, tuple(order), tuple(ranks), total - steps * world * batch, skipped
    )


def resampled_plan(
    samples_per_epoch: int, world: int, consumers: int, batch: int, epoch: int
) -> EpochPlan:
    """The resampled-mode plan: batch counts only; shards are drawn by ``shard_draws``."""
    steps = samples_per_epoch // (world * batch)
    ranks = tuple(
        tuple(
            ConsumerPlan(r, c, batches_of_consumer(steps, consumers, c), ())
            for c in range(consumers)
        )
        for r in range(world)
    )
    return EpochPlan(epoch, steps, (), ranks, samples_per_epoch - steps * world * batch, 0)


def shard_probabilities(source_of: Sequence[int], weights: Sequence[float]) -> list[float]:
    """Per-shard draw probability: a source's weight spread evenly over its shards."""
    counts: dict[int, int] = {}
    for s in source_of:
        counts[s] = counts.get(s, 0) + 1
    raw = [weights[s] / counts[s] for s in source_of]
    total = sum(raw)
    return [w / total for w in raw]


def shard_draws(
    probabilities: Sequence[float], seed: int, epoch: int, rank: int, consumer: int
) -> Iterator[int]:
    """The endless, reproducible sequence of shards one consumer reads in resampled mode."""
    rng = random.Random(derive_seed("resample", seed, epoch, rank, consumer))
    population = range(len(probabilities))
    while True:
        yield rng.choices(population, weights=probabilities)[0]

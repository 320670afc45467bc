"""The streaming training pipeline: WebDataset stages per rank and loader worker, resumable.

Stages, in order (``plan.py`` decides the first three before any sample is read):
  shard list (``::`` sources, braces, globs; sizes.json)
  → epoch-seeded shard shuffle, identical on every rank           (exact mode)
    or shards drawn with replacement by source weight               (resampled mode)
  → split by node: each rank a contiguous range of S·B samples
  → split by loader worker: each worker a contiguous range of whole batches
  → tar (webdataset ``tar_file_expander`` + ``group_by_keys``) → skip to the piece's start
  → sample shuffle buffer, re-seeded per piece with (seed, epoch, rank, worker, piece)
  → skip the samples a resumed run already consumed (before decoding)
  → decode (explicit decoders; bad samples skipped and counted) → caption cleaning
  → per-sample transform (image preprocessing) → batching + tokenisation (collate).

Batches carry their data position, so the loop always knows, per worker, which piece of which
shard it is in and how many of its samples were consumed: ``TrainStream.epoch(e, resume=pos)``
re-opens that piece, replays the shuffle buffer and skips the consumed samples, and then yields
exactly the batches an uninterrupted run would have yielded.

Every rank runs the same number S of full batches: the plan gives each rank S·B samples; bad
samples can leave a worker short, so the loop agrees on "everyone has a batch" every step
(``loop.py``) and ends the epoch for all ranks together, counting what was left as dropped.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import webdataset as wds
from webdataset.tariterators import base_plus_ext, tar_file_expander, valid_sample

from .decode import (
    DUPLICATE,
    RESERVED,
    BadSample,
    BadSampleLog,
    Decoded,
    IdRegistry,
    decode_sample,
)
from .plan import (
    ConsumerPlan,
    EpochPlan,
    Piece,
    consumer_of_batch,
    derive_seed,
    exact_plan,
    resampled_plan,
    shard_draws,
    shard_probabilities,
)
from .sources import DataError, ShardList, is_url, open_shard

log = logging.getLogger("fne_dist.data")
# Shard-level errors, counted once per shard piece (its samples count as bad samples too):
# "truncated": the piece ended before its planned samples (a truncated or corrupt archive, or
# a sizes.json that claims more).
SHARD_ERRORS = ("truncated",)


@dataclass(frozen=True)
class StreamOptions:
    """What the stream needs from the config (``data.*``, batch, seed) and the process group."""

    batch: int
    seed: int
    rank: int = 0
    world: int = 1
    workers: int = 0  # DataLoader workers; 0 = read in the training process
    mode: str = "exact"  # exact | resampled
    samples_per_epoch: int = 0  # resampled: virtual epoch length (0 = the data's size)
    weights: tuple[float, ...] = ()  # resampled: per-source weights (empty = equal)
    shuffle_buffer: int = 1000
    caption_key: str = "txt"
    max_pixels: int = 50_000_000
    max_bad_fraction: float = 0.05

    @property
    def consumers(self) -> int:
        return max(1, self.workers)


@dataclass
class ConsumerPosition:
    """Where one loader worker ("consumer") is: piece index in its plan (exact) or draw index
    (resampled), samples of that piece already consumed, and batches delivered."""

    consumer: int
    piece: int = 0
    consumed: int = 0
    batches: int = 0
    shard: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class RankPosition:
    """A rank's data position: enough to replay its epoch from the next batch on."""

    epoch: int
    step: int  # batches of this epoch this rank has consumed
    consumers: list[ConsumerPosition]
    shard_order_seed: int = 0
    mode: str = "exact"
    # the rest of an epoch begun at another world size: that layout's plan, replayed
    replay: Replay | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "epoch": self.epoch,
            "step": self.step,
            "mode": self.mode,
            "shard_order_seed": self.shard_order_seed,
            "consumers": [c.to_dict() for c in self.consumers],
        }
        if self.replay is not None:
            out["replay"] = self.replay.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RankPosition:
        return cls(
            int(d["epoch"]),
            int(d["step"]),
            [ConsumerPosition(**c) for c in d["consumers"]],
            int(d.get("shard_order_seed", 0)),
            str(d.get("mode", "exact")),
            Replay.from_dict(d["replay"]) if d.get("replay") else None,
        )


@dataclass
class Replay:
    """An epoch begun with another layout (``world`` ranks × ``batch``, ``consumers`` loader
    workers each) and continued at this run's world size with the same global batch: every
    rank replays that layout's per-rank streams from ``positions`` (one per old rank) and
    takes its own slice of each global batch, so the epoch's global batches (their samples
    and their order) are those of an uninterrupted run; ``reads`` are the old ranks this
    rank replays (the others' positions are gathered from the ranks that read them)."""

    world: int
    batch: int
    consumers: int
    positions: list[RankPosition]
    reads: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "world": self.world,
            "batch": self.batch,
            "consumers": self.consumers,
            "positions": [p.to_dict() for p in self.positions],
            "reads": list(self.reads),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Replay:
        return cls(
            int(d["world"]),
            int(d["batch"]),
            int(d["consumers"]),
            [RankPosition.from_dict(p) for p in d["positions"]],
            [int(q) for q in d.get("reads", [])],
        )

    def slices(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """(old rank, start, stop) of each old rank's batch within global rows [lo, hi)."""
        out = []
        for q in range(self.world):
            a, b = max(lo, q * self.batch), min(hi, (q + 1) * self.batch)
            if a < b:
                out.append((q, a - q * self.batch, b - q * self.batch))
        return out


Transform = Callable[[Decoded], dict[str, Any]]
Collate = Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]


def group_members(members: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Tar members → samples, by webdataset's rule (a run of members with one key, the key
    being the name up to the first dot of its base name, the extension lower-cased).

    Unlike webdataset's ``group_by_keys``, which raises on a member name repeated inside one
    sample and so ends the whole shard, the sample is marked (``DUPLICATE``) for the decoder
    to count as bad, and the samples after it are read. An extension like ``__key__`` would
    overwrite the sample's own fields, so it is marked (``RESERVED``) too.
    """
    current: dict[str, Any] | None = None
    for member in members:
        prefix, suffix = base_plus_ext(member["fname"])
        if prefix is None:
            continue
        suffix = suffix.lower()
        if current is None or prefix != current["__key__"]:
            if valid_sample(current):
                yield current
            current = {"__key__": prefix, "__url__": member.get("__url__")}
        if suffix.startswith("__"):
            current.setdefault(RESERVED, suffix)
        elif suffix in current:
            current.setdefault(DUPLICATE, suffix)  # keep the first; the sample is bad anyway
        else:
            current[suffix] = member["data"]
    if valid_sample(current):
        yield current


def raw_samples(url: str, piece: Piece | None = None) -> Iterator[dict]:
    """Grouped raw samples [start, stop) of a shard (tar → group by key → slice; every sample
    without ``piece``); the samples before ``start`` are read but not decoded. Stops quietly at
    a truncated tar: the caller counts what is missing against the plan."""
    stream = open_shard(url)
    try:
        members = tar_file_expander([{"url": url, "stream": stream}], eof_value=None)
        samples = group_members(members)
        if piece is None:
            yield from samples
        else:
            yield from itertools.islice(samples, piece.start, piece.stop)
    except Exception as err:  # truncated or corrupt archive: read what was there
        log.warning("shard %s ends early: %s", url, str(err).splitlines()[0] if str(err) else err)
    finally:
        stream.close()


SHARD_MEMO_BYTES = 256 << 20
"""Bytes of local shard files whose grouped samples a training process keeps between epochs."""


class ShardMemo:
    """The grouped raw samples of the local shards a training process reads, kept from one
    epoch to the next (``data.loader_workers: 0`` only: loader workers are new processes each
    epoch). Each epoch then slices the samples of its piece from memory instead of parsing the
    tar again: the same dicts of the same bytes in the same order, so shuffling, decoding,
    bad-sample counts and batches are what ``raw_samples`` gives.

    Why: the default run reads the same 2,924 cached feature samples 20 times, and parsing the
    tar headers (Python's tarfile) was most of its per-step data time; the bytes are ~10 MB.
    A shard is kept only when it is a local file, fits what is left of ``budget`` bytes, and
    reads to its end without an error; a shard that changed on disk (size or modification
    time) is read again. Anything else (URLs, pipes, a truncated tar, a full budget) is read by
    ``raw_samples`` every time, its warnings and counts unchanged."""

    def __init__(self, budget: int = SHARD_MEMO_BYTES) -> None:
        self.budget, self.used = budget, 0
        self.kept: dict[str, tuple[tuple[int, int], list[dict[str, Any]]]] = {}
        self.refused: set[str] = set()

    def samples(self, url: str, piece: Piece) -> Iterator[dict[str, Any]]:
        """The piece's grouped samples (fresh dicts over the kept bytes), as ``raw_samples``."""
        kept = self._kept(url)
        if kept is None:
            return raw_samples(url, piece)
        return (dict(sample) for sample in kept[piece.start : piece.stop])

    def _kept(self, url: str) -> list[dict[str, Any]] | None:
        if url in self.refused or url.startswith("pipe:") or is_url(url):
            return None
        try:
            st = os.stat(url)
        except OSError:  # raw_samples reports it
            return None
        stamp = (st.st_size, st.st_mtime_ns)
        if url in self.kept:
            if self.kept[url][0] == stamp:
                return self.kept[url][1]
            self.used -= self.kept.pop(url)[0][0]  # changed on disk: read it again
        if st.st_size > self.budget - self.used:
            self.refused.add(url)
            return None
        stream = open_shard(url)
        try:
            members = tar_file_expander([{"url": url, "stream": stream}], eof_value=None)
            samples = list(group_members(members))
        except Exception:  # a truncated or corrupt tar: raw_samples reads it and says so
            self.refused.add(url)
            return None
        finally:
            stream.close()
        self.kept[url] = (stamp, samples)
        self.used += st.st_size
        return samples


class _ConsumerReader:
    """One consumer's epoch: pieces → shuffle → skip → decode → batches (with positions)."""

    memo: ShardMemo | None = None  # the stream's, when it reads in the training process

    def __init__(
        self,
        shards: ShardList,
        opts: StreamOptions,
        plan: ConsumerPlan,
        epoch: int,
        start: ConsumerPosition,
        transform: Transform,
        collate: Collate,
        probabilities: list[float],
    ) -> None:
        self.shards, self.opts, self.plan, self.epoch = shards, opts, plan, epoch
        self.start, self.transform, self.collate = start, transform, collate
        self.probabilities = probabilities
        self.bad = BadSampleLog()
        self.ids = IdRegistry()  # string ids of this consumer's epoch: collisions are bad
        self.shard_errors: Counter[str] = Counter()  # since the last item handed out

    def _take_shard_errors(self) -> dict[str, int]:
        out, self.shard_errors = dict(self.shard_errors), Counter()
        return out

    def _pieces(self) -> Iterator[tuple[int, Piece]]:
        if self.opts.mode == "exact":
            yield from enumerate(self.plan.pieces)
            return
        draws = shard_draws(
            self.probabilities, self.opts.seed, self.epoch, self.plan.rank, self.plan.consumer
        )
        for i, shard in enumerate(draws):
            yield i, Piece(shard, 0, self.shards.sizes[shard])

    def _check_bad(self, url: str, piece: Piece, bad: Counter[str]) -> None:
        n_bad = sum(bad.values())
        if n_bad > self.opts.max_bad_fraction * len(piece):
            raise DataError(
                f"shard {url}: {n_bad} of {len(piece)} samples are bad ({dict(bad)}), "
                f"above data.max_bad_fraction={self.opts.max_bad_fraction}"
            )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        o, c = self.opts, self.plan.consumer
        pos = ConsumerPosition(c, self.start.piece, self.start.consumed, self.start.batches)
        pending: list[dict[str, Any]] = []
        if pos.batches >= self.plan.batches:
            return
        for i, piece in self._pieces():
            if i < pos.piece:
                continue
            url = self.shards.urls[piece.shard]
            seed = derive_seed("buffer", o.seed, self.epoch, o.rank, c, i)
            shuffle = wds.shuffle(o.shuffle_buffer, initial=o.shuffle_buffer, seed=seed)
            source = self.memo.samples(url, piece) if self.memo else raw_samples(url, piece)
            raw = shuffle(iter(source))
            skip = pos.consumed if i == pos.piece else 0
            n = 0
            bad: Counter[str] = Counter()
            for sample in raw:
                n += 1
                if n <= skip:  # consumed before the resume: no decoding
                    continue
                try:
                    decoded = decode_sample(sample, o.caption_key, o.max_pixels, ids=self.ids)
                    pending.append(self.transform(decoded))
                except BadSample as err:
                    bad[err.reason] += 1
                    self.bad.add(err.reason, url, str(err))
                    self._check_bad(url, piece, bad)
                    continue
                if len(pending) == o.batch:
                    pos.piece, pos.consumed, pos.shard = i, n, url
                    pos.batches += 1
                    j = c + o.consumers * (pos.batches - 1)  # the batch's index in the rank
                    yield {
                        "batch": self.collate(pending),
                        "j": j,
                        "position": pos.to_dict(),
                        "bad": self.bad.take(),
                        "shard_errors": self._take_shard_errors(),
                    }
                    pending = []
                    if pos.batches >= self.plan.batches:
                        return
            missing = len(piece) - n
            if missing > 0:
                self.shard_errors["truncated"] += 1
                bad["truncated_tar"] += missing
                self.bad.add(
                    "truncated_tar", url, f"{missing} of {len(piece)} samples missing", missing
                )
                self._check_bad(url, piece, bad)
            pos.piece, pos.consumed = i + 1, 0
        # out of pieces before the planned batches: bad samples left this consumer short
        end = {"end": True, "bad": self.bad.take(), "dropped": len(pending)}
        yield {**end, "shard_errors": self._take_shard_errors()}


class _EpochDataset(torch.utils.data.IterableDataset):
    """The iterable a DataLoader splits over its workers: physical worker p plays consumer
    (start_step + p) mod C, so a resumed epoch's round robin continues where it stopped."""

    def __init__(self, stream: TrainStream, plan: EpochPlan, resume: RankPosition) -> None:
        super().__init__()
        self.stream, self.plan, self.resume = stream, plan, resume

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        p = info.id if info is not None else 0
        o = self.stream.opts
        c = (self.resume.step + p) % o.consumers
        reader = _ConsumerReader(
            self.stream.shards,
            o,
            self.plan.consumers[o.rank][c],
            self.plan.epoch,
            self.resume.consumers[c],
            self.stream.transform,
            self.stream.collate,
            self.stream.probabilities,
        )
        reader.memo = self.stream.memo
        yield from reader


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # loader workers decode; the training process owns the cores


def _clean_worker_error(err: DataError) -> DataError:
    """A DataError raised in a loader worker arrives wrapped with its traceback; keep the one
    line that names the problem."""
    lines = [ln for ln in str(err).splitlines() if ln.strip()]
    last = lines[-1] if lines else str(err)
    return DataError(last.split("DataError: ", 1)[-1])


@dataclass
class EpochCounters:
    bad: Counter[str] = field(default_factory=Counter)
    shard_errors: Counter[str] = field(default_factory=Counter)  # by SHARD_ERRORS reason
    dropped: int = 0  # samples planned for this rank that ended in no batch


class TrainStream:
    """A rank's training stream: ``epoch(e)`` yields (batch, position) pairs, S per epoch
    unless bad samples cut the epoch short (the caller then sees the iterator end early)."""

    def __init__(
        self, shards: ShardList, opts: StreamOptions, transform: Transform, collate: Collate
    ) -> None:
        if opts.mode not in ("exact", "resampled"):
            raise DataError(f"data.mode: expected exact or resampled, got {opts.mode!r}")
        n_sources = max(shards.source_of) + 1
        weights = opts.weights or (1.0,) * n_sources
        if len(weights) != n_sources:
            raise DataError(
                f"data.train_weights: {len(weights)} weights for {n_sources} '::' sources"
            )
        self.shards, self.opts = shards, opts
        self.transform, self.collate = transform, collate
        self.probabilities = shard_probabilities(shards.source_of, weights)
        self.counters = EpochCounters()
        # in-process reading keeps the shards' samples between epochs (loader workers are
        # new processes each epoch: nothing to keep)
        self.memo = ShardMemo() if opts.workers == 0 else None
        if self.steps_per_epoch == 0:
            raise DataError(
                f"data.train: {self.samples_per_epoch} samples per epoch are fewer than one "
                f"global batch ({opts.world} ranks × {opts.batch})"
            )

    @property
    def samples_per_epoch(self) -> int:
        if self.opts.mode == "resampled" and self.opts.samples_per_epoch:
            return self.opts.samples_per_epoch
        return self.shards.total

    @property
    def steps_per_epoch(self) -> int:
        return self.samples_per_epoch // (self.opts.world * self.opts.batch)

    def plan(self, epoch: int) -> EpochPlan:
        o = self.opts
        if o.mode == "exact":
            return exact_plan(self.shards.sizes, o.world, o.consumers, o.batch, o.seed, epoch)
        return resampled_plan(self.samples_per_epoch, o.world, o.consumers, o.batch, epoch)

    def start_position(self, epoch: int) -> RankPosition:
        return RankPosition(
            epoch,
            0,
            [ConsumerPosition(c) for c in range(self.opts.consumers)],
            derive_seed("shard-order", self.opts.seed, epoch),
            self.opts.mode,
        )

    def describe(self, plan: EpochPlan) -> str:
        o = self.opts
        text = (
            f"epoch {plan.epoch}: {self.samples_per_epoch} samples ({o.mode}), {plan.steps} "
            f"steps × {o.world}×{o.batch}, {plan.dropped} dropped by the plan"
        )
        if o.mode == "exact" and len(self.shards.urls) < o.world * o.consumers:
            text += (
                f"; {len(self.shards.urls)} shard(s) for {o.world} rank(s) × {o.consumers} "
                f"worker(s): shards are split by sample ranges ({plan.skipped_reads} samples "
                f"read and skipped to reach them)"
            )
        return text

    def epoch(
        self, epoch: int, resume: RankPosition | None = None
    ) -> Iterator[tuple[dict[str, torch.Tensor], RankPosition]]:
        """This rank's batches of ``epoch`` in order, each with the position after it."""
        position = resume if resume is not None else self.start_position(epoch)
        if position.epoch != epoch:
            raise ValueError(f"resume position is for epoch {position.epoch}, not {epoch}")
        if position.replay is not None:
            yield from self._replay_epoch(position, position.replay)
            return
        plan = self.plan(epoch)
        if len(position.consumers) != self.opts.consumers:
            raise DataError(
                f"the data position has {len(position.consumers)} loader workers per rank, this "
                f"run {self.opts.consumers}: resume with data.loader_workers="
                f"{len(position.consumers)}"
            )
        dataset = _EpochDataset(self, plan, position)
        o = self.opts
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=o.workers,
            worker_init_fn=_worker_init if o.workers else None,
            prefetch_factor=2 if o.workers else None,
            persistent_workers=False,
            # its own generator: a DataLoader otherwise draws its base seed from the global
            # torch RNG each epoch, and a resumed run would then drift from the original
            generator=torch.Generator().manual_seed(o.seed),
        )
        self.counters = EpochCounters()
        expected = position.step
        consumers = [ConsumerPosition(**c.to_dict()) for c in position.consumers]
        try:
            for item in loader:
                self.counters.bad.update(item.get("bad", {}))
                self.counters.shard_errors.update(item.get("shard_errors", {}))
                if "end" in item:
                    self.counters.dropped += item["dropped"]
                    continue
                if item["j"] != expected:  # a worker came up short: the epoch ends here
                    break
                c, _ = consumer_of_batch(item["j"], o.consumers)
                consumers[c] = ConsumerPosition(**item["position"])
                expected += 1
                yield (
                    item["batch"],
                    RankPosition(
                        epoch,
                        expected,
                        [ConsumerPosition(**x.to_dict()) for x in consumers],
                        position.shard_order_seed,
                        o.mode,
                    ),
                )
                if expected >= plan.steps:
                    break
        except DataError as err:
            raise _clean_worker_error(err) from None
        finally:
            del loader
        if expected < plan.steps:
            self.counters.dropped += (plan.steps - expected) * o.batch

    def _old_rank_batches(
        self, replay: Replay, q: int, start: RankPosition
    ) -> Iterator[dict[str, Any]]:
        """Old rank ``q``'s batches (lists of transformed samples) from ``start`` on, read in
        this process in the order its loader's round robin over its consumers gave them."""
        o = self.opts
        old = dataclasses.replace(
            o, rank=q, world=replay.world, batch=replay.batch, workers=replay.consumers
        )
        if o.mode == "exact":
            plan = exact_plan(
                self.shards.sizes, replay.world, replay.consumers, replay.batch, o.seed, start.epoch
            )
        else:
            plan = resampled_plan(
                self.samples_per_epoch, replay.world, replay.consumers, replay.batch, start.epoch
            )
        readers = [
            iter(
                _ConsumerReader(
                    self.shards,
                    old,
                    plan.consumers[q][c],
                    start.epoch,
                    start.consumers[c],
                    self.transform,
                    list,  # whole samples: this rank collates its own slice of them
                    self.probabilities,
                )
            )
            for c in range(replay.consumers)
        ]
        for j in itertools.count(start.step):
            if j >= plan.steps:
                return
            item = next(readers[j % replay.consumers], None)
            while item is not None and "end" in item:
                self.counters.bad.update(item.get("bad", {}))
                self.counters.dropped += item["dropped"]
                item = next(readers[j % replay.consumers], None)
            if item is None:
                return
            self.counters.bad.update(item.get("bad", {}))
            self.counters.shard_errors.update(item.get("shard_errors", {}))
            yield item

    def _replay_epoch(
        self, position: RankPosition, replay: Replay
    ) -> Iterator[tuple[dict[str, torch.Tensor], RankPosition]]:
        """The rest of an epoch begun with ``replay``'s layout: this rank's rows of each global
        batch, taken from the old ranks' streams (read here, without loader workers)."""
        o = self.opts
        if replay.world * replay.batch != o.world * o.batch:
            raise DataError(
                f"the data position replays a global batch of {replay.world}×{replay.batch}, "
                f"this run's is {o.world}×{o.batch}"
            )
        mine = replay.slices(o.rank * o.batch, (o.rank + 1) * o.batch)
        positions = [RankPosition.from_dict(p.to_dict()) for p in replay.positions]
        streams = {q: self._old_rank_batches(replay, q, positions[q]) for q, _, _ in mine}
        self.counters = EpochCounters()
        step = position.step
        while True:
            items: list[dict[str, Any]] = []
            for q, a, b in mine:
                item = next(streams[q], None)
                if item is None:  # the old plan's epoch is over (or a stream came up short)
                    return
                c, _ = consumer_of_batch(item["j"], replay.consumers)
                old = positions[q]
                old.consumers[c] = ConsumerPosition(**item["position"])
                positions[q] = RankPosition(
                    old.epoch, old.step + 1, old.consumers, old.shard_order_seed, old.mode
                )
                items.extend(item["batch"][a:b])
            step += 1
            after = Replay(
                replay.world,
                replay.batch,
                replay.consumers,
                [RankPosition.from_dict(p.to_dict()) for p in positions],
                [q for q, _, _ in mine],
            )
            yield (
                self.collate(items),
                RankPosition(
                    position.epoch,
                    step,
                    position.consumers,
                    position.shard_order_seed,
                    o.mode,
                    after,
                ),
            )

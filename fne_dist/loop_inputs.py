"""What the loop feeds the model: shard lists (raw or cached features), the training stream and
the evaluation tables, assembled from the config for one rank.

A frozen tower's features are computed once per content (splits over the same shards share
them) into feature shards (``data/feature_shards.py``) by local rank 0 of each node, under a lock
so that nodes sharing data.cache_dir build it once, while the other ranks wait; training and
evaluation then read those shards instead of the raw ones.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import distributed as dist_ops
from .config import Config
from .data.batching import PairCollate, PairTransform
from .data.feature_shards import (
    build_feature_shards,
    build_once,
    cache_fingerprint,
    is_complete,
)
from .data.sources import DataError, ShardList, shard_list
from .data.splits import PairTable, load_split
from .data.stream import StreamOptions, TrainStream
from .encoders import ImageBackbone, TextBackbone
from .interrupt import Interrupted
from .towers import TOWERS, Towers

SPLITS = ("train", "val", "test")


def raw_shards(cfg: Config, split: str) -> ShardList:
    return shard_list(getattr(cfg.data, split), f"data.{split}", cfg.data.allow_pipe)


def _shard_identity(url: str, samples: int) -> list:
    """A source shard as the cache key sees it: name, sample count, and byte size when it is
    a local file (a rewritten shard of the same name gets a new cache)."""
    path = Path(url)
    return [path.name, samples, path.stat().st_size if path.is_file() else None]


def cache_dir(cfg: Config, split: str, shards: ShardList) -> Path:
    """Where ``split``'s feature shards go: keyed by content (shards, encoders, sizes,
    caption choice), not by split name, so splits over the same shards share one cache."""
    image, text = cfg.model.image, cfg.model.text
    identity = {
        "shards": [_shard_identity(u, n) for u, n in zip(shards.urls, shards.sizes, strict=True)],
        "caption_key": cfg.data.caption_key,
        "all_captions": split != "train",  # evaluation keeps every caption of an image
        "max_pixels": cfg.data.max_pixels,
        "image": [image.type, image.name_or_path, image.image_size] if image.frozen else None,
        "text": [text.type, text.name_or_path, text.max_length] if text.frozen else None,
    }
    return Path(cfg.data.cache_dir) / f"feat-{cache_fingerprint(identity)}"


def towers_to_load(cfg: Config) -> list[str]:
    """The backbones a run must load: a trained tower, and a frozen one while some split's
    feature cache is not complete (the cache is built with it). Checked before any rank starts
    building, so a complete cache is read without loading the frozen towers at all."""
    image, text = cfg.model.image, cfg.model.text
    if (image.frozen or text.frozen) and not all(
        is_complete(cache_dir(cfg, split, raw_shards(cfg, split))) for split in SPLITS
    ):
        return list(TOWERS)
    return [name for name, tower in zip(TOWERS, (image, text), strict=True) if not tower.frozen]


def split_shards(
    cfg: Config,
    split: str,
    towers: Towers,
    local_rank: int = 0,
    local_world: int = 1,
    log=print,
    stop_reason: Callable[[], str | None] = lambda: None,
) -> ShardList:
    """The shards a split is read from: the raw ones, or (frozen towers) its feature shards,
    built here by local rank 0 if missing. Every rank must call it (it waits for the build).
    A stop signal (``stop_reason`` names it) ends the build or the wait with ``Interrupted``
    within one batch: a cache takes longer to build than a scheduler waits after SIGTERM."""
    shards = raw_shards(cfg, split)
    if not (cfg.model.image.frozen or cfg.model.text.frozen):
        return shards
    out = cache_dir(cfg, split, shards)
    if local_rank == 0:  # one builder per node; one per cluster on a shared data.cache_dir
        t0 = time.perf_counter()
        bad = {}

        def build() -> None:
            threads = torch.get_num_threads()
            # the other local ranks only wait: lend their cores to the build
            torch.set_num_threads(min(os.cpu_count() or 1, threads * local_world))
            try:
                built = _build(cfg, split, shards, out, towers, stop_reason)
                bad.update(built)
            finally:
                torch.set_num_threads(threads)

        if build_once(out, build, cfg.data.cache_wait_s, stop_reason=stop_reason):
            log(
                f"data.{split}: cached frozen-tower features of {shards.total} samples in "
                f"{time.perf_counter() - t0:.1f} s → {out}"
                + (f" (bad samples skipped: {bad})" if bad else "")
            )
    deadline = time.monotonic() + cfg.data.cache_wait_s
    while not is_complete(out):  # local rank 0 of this node is building it or waiting
        reason = stop_reason()
        if reason is not None:
            raise Interrupted(
                f"{reason} while waiting for the feature cache of data.{split}: stopped before "
                "training; run the same command again to continue"
            )
        if time.monotonic() > deadline:
            raise DataError(
                f"data.{split}: feature cache {out} not complete after "
                f"data.cache_wait_s={cfg.data.cache_wait_s:.0f} s"
            )
        time.sleep(0.5)
    dist_ops.long_barrier()  # other nodes may still be building theirs: dist.barrier_timeout_s
    return shard_list(str(out / "feat-*.tar"), f"data.{split} (feature cache)")


def _build(
    cfg: Config,
    split: str,
    shards: ShardList,
    out: Path,
    towers: Towers,
    stop_reason: Callable[[], str | None],
) -> dict[str, int]:
    return dict(
        build_feature_shards(
            shards,
            out,
            (
                towers.image if cfg.model.image.frozen else None,
                towers.text if cfg.model.text.frozen else None,
            ),
            cfg.data,
            all_captions=split != "train",
            label=f"feature cache {split}",
            stop_reason=stop_reason,
        )
    )


def train_stream(
    cfg: Config,
    shards: ShardList,
    image_backbone: ImageBackbone | None,
    text_backbone: TextBackbone | None,
    rank: int,
    world: int,
) -> TrainStream:
    """This rank's training stream over ``shards``."""
    d = cfg.data
    opts = StreamOptions(
        batch=cfg.train.batch_size,
        seed=cfg.run.seed,
        rank=rank,
        world=world,
        workers=d.loader_workers,
        mode=d.mode,
        samples_per_epoch=d.samples_per_epoch,
        weights=tuple(d.train_weights or ()),
        shuffle_buffer=d.shuffle_buffer,
        caption_key=d.caption_key,
        max_pixels=d.max_pixels,
        max_bad_fraction=d.max_bad_fraction,
    )
    image = None if cfg.model.image.frozen else image_backbone  # frozen: features are cached
    text = None if cfg.model.text.frozen else text_backbone
    transform = PairTransform(None if image is None else image.preprocess)
    collate = PairCollate(None if text is None else text.tokenize)
    return TrainStream(shards, opts, transform, collate)


def eval_table(
    cfg: Config,
    split: str,
    shards: ShardList,
    image_backbone: ImageBackbone | None,
    rank: int,
    world: int,
) -> PairTable:
    """This rank's share of an evaluation split (every W-th sample)."""
    return load_split(
        shards,
        f"data.{split}",
        None if cfg.model.image.frozen or image_backbone is None else image_backbone.preprocess,
        cfg.data.caption_key,
        cfg.data.max_pixels,
        rank,
        world,
        cfg.data.max_bad_fraction,
    )

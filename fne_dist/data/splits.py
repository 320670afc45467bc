"""Evaluation splits: each rank reads every W-th sample of a split into memory.

Legend: I images, T captions (each caption belongs to one image: ``text_to_image_T``), W ranks.

Evaluation splits by *sample* (not by shard): val/test sets are small and often one shard, and
every rank must hold a share for ZeRO-3's collective forward passes. Each rank embeds its share
and ``sharded_eval.py`` gathers the embeddings. A sample may list every caption of its image in
its json (``captions``, the ``image`` layout of ``python -m fne_dist.shards``); otherwise its
caption member is its one caption, and samples with the same image id are one image.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import Tensor

from .decode import BadSample, BadSampleLog, Decoded, IdRegistry, decode_sample
from .sources import DataError, ShardList, warn_if_more
from .stream import raw_samples


@dataclass
class PairTable:
    """One split (or one rank's share of it) in memory: model inputs per image and caption."""

    image_inputs: dict[str, Tensor]  # pixels I×3×S×S uint8, or img_feat I×F
    captions: list[str]  # T captions
    text_inputs: dict[str, Tensor]  # txt_feat T×F, or nothing (tokenised when embedded)
    text_to_image_T: Tensor  # int64: index of each caption's image in 0..I-1
    image_ids_I: Tensor  # int64: the dataset's image id (the positive mask key)
    groups_I: Tensor  # int64: group label (NO_GROUP = -1: none, fne.groups), e.g. the emoji family
    # Global sample index of each image's first sample and of each caption (×1024 + position in
    # the sample): gathered shares are put back in this order, so W ranks evaluate exactly
    # like one (the COCO 1K folds depend on image order).
    order_I: Tensor
    order_T: Tensor
    bad: Counter[str] = field(default_factory=Counter)

    @property
    def num_images(self) -> int:
        return int(self.image_ids_I.shape[0])

    @property
    def num_captions(self) -> int:
        return len(self.captions)


def count_mine(begin: int, end: int, rank: int, world: int) -> int:
    """How many global sample indices in [begin, end) are ≡ rank (mod world), without a loop
    (a size index claiming 10^8 samples must not cost 10^8 iterations)."""

    def below(n: int) -> int:  # indices in [0, n) that are ≡ rank
        return max(0, (n - rank + world - 1) // world)

    return below(end) - below(begin) if end > begin else 0


class _TableBuilder:
    """Accumulates one rank's share of a split, sample by sample."""

    def __init__(self, preprocess: Callable[[Image.Image], Tensor] | None) -> None:
        self.preprocess = preprocess
        self.images: list[Tensor] = []
        self.captions: list[str] = []
        self.txt_feats: list[Tensor] = []
        self.text_to_image: list[int] = []
        self.image_ids: list[int] = []
        self.groups: list[int] = []
        self.order_I: list[int] = []
        self.order_T: list[int] = []
        self.index_of: dict[int, int] = {}

    def add(self, d: Decoded, index: int) -> None:
        """Add decoded sample number ``index`` (global); BadSample if it has no image input."""
        if d.image_id not in self.index_of:
            if d.img_feat is not None:
                pixels = torch.from_numpy(d.img_feat)
            elif self.preprocess is not None and d.image is not None:
                pixels = self.preprocess(d.image)
            else:
                raise BadSample("missing_image", d.key)
            self.index_of[d.image_id] = len(self.image_ids)
            self.image_ids.append(d.image_id)
            self.groups.append(d.group)
            self.order_I.append(index)
            self.images.append(pixels)
        for k, caption in enumerate(d.captions):
            self.captions.append(caption)
            self.text_to_image.append(self.index_of[d.image_id])
            self.order_T.append(index * 1024 + k)
            if d.txt_feat is not None:
                self.txt_feats.append(torch.from_numpy(d.txt_feat[k]))

    def table(self, bad: Counter[str]) -> PairTable:
        images = self.images
        image_key = "img_feat" if images and images[0].dtype != torch.uint8 else "pixels"
        return PairTable(
            image_inputs={image_key: torch.stack(images)} if images else {},
            captions=self.captions,
            text_inputs={"txt_feat": torch.stack(self.txt_feats)} if self.txt_feats else {},
            text_to_image_T=torch.tensor(self.text_to_image, dtype=torch.long),
            image_ids_I=torch.tensor(self.image_ids, dtype=torch.long),
            groups_I=torch.tensor(self.groups, dtype=torch.long),
            order_I=torch.tensor(self.order_I, dtype=torch.long),
            order_T=torch.tensor(self.order_T, dtype=torch.long),
            bad=bad,
        )


def load_split(
    shards: ShardList,
    key: str,
    preprocess: Callable[[Image.Image], Tensor] | None,
    caption_key: str = "txt",
    max_pixels: int = 50_000_000,
    rank: int = 0,
    world: int = 1,
    max_bad_fraction: float = 0.05,
) -> PairTable:
    """Rank ``rank``'s share (global sample index ≡ rank mod W) of the split in ``shards``.

    ``preprocess`` turns a PIL image into model pixels (None when the shards hold ``img_feat``).
    Every sample present in a shard is read, also beyond what sizes.json claims (with a warning
    naming the shard); samples it claims that are not there count as ``truncated_tar``. Bad
    samples are skipped and counted like in training; above ``max_bad_fraction`` of a shard
    the split fails with a DataError naming it.
    """
    builder = _TableBuilder(preprocess)
    log = BadSampleLog()
    ids = IdRegistry()  # this rank's share: two strings with one id would merge images
    offset = 0
    for url, size in zip(shards.urls, shards.sizes, strict=True):
        bad: Counter[str] = Counter()
        seen = 0
        for i, sample in enumerate(raw_samples(url)):
            seen += 1
            if (offset + i) % world != rank:
                continue
            try:
                d = decode_sample(
                    sample,
                    caption_key,
                    max_pixels,
                    all_captions=True,
                    decode_image=preprocess is not None,
                    ids=ids,
                )
                builder.add(d, offset + i)
            except BadSample as err:
                bad[err.reason] += 1
                log.add(err.reason, url, str(err))
        missing = count_mine(offset + seen, offset + size, rank, world)
        if missing:
            bad["truncated_tar"] += missing
            log.add("truncated_tar", url, f"{size - seen} of {size} samples missing", missing)
        warn_if_more(url, size, seen)
        mine = count_mine(offset, offset + max(seen, size), rank, world)
        if sum(bad.values()) > max_bad_fraction * max(mine, 1):
            raise DataError(
                f"{key}: shard {url}: {sum(bad.values())} of {mine} samples read are bad "
                f"({dict(bad)}), above data.max_bad_fraction={max_bad_fraction}"
            )
        offset += max(seen, size)  # the same on every rank: each reads every sample
    return builder.table(log.counts)

"""From image entries to samples: the ``pair`` and ``image`` layouts, and members of a sample.

``pair``: one sample per image-caption pair (the image repeated per caption), what FNE/ALBEF
training iterates over. ``image``: one sample per image carrying all its captions (``txt`` =
the first, json ``captions``/``caption_ids`` = all), what retrieval evaluation needs.

Skipped counts are always in image-caption pairs, whatever the layout: an image layout sample of
an image with 5 captions whose file is missing counts 5 ``missing_image``. An empty caption is
checked first (it costs no file read), so a pair is counted under one reason only.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .entries import ImageEntry, ShardError, check_id, fingerprint
from .media import SKIP_EMPTY_CAPTION, Media, MediaSource
from .writer import BuiltSample, ShardOptions, ShardSummary, write_shards

Layout = Literal["pair", "image"]
LAYOUTS: tuple[str, ...] = ("pair", "image")


@dataclass(frozen=True)
class PlannedSample:
    """One sample to be: an entry (by index) and which of its captions (by index) it carries."""

    entry: int
    captions: tuple[int, ...]


def plan_samples(entries: Sequence[ImageEntry], layout: str) -> list[PlannedSample]:
    """The samples of ``entries`` in output order (entry order, then caption order)."""
    if layout == "pair":
        return [
            PlannedSample(e, (c,))
            for e, entry in enumerate(entries)
            for c in range(len(entry.captions))
        ]
    if layout == "image":
        return [
            PlannedSample(e, tuple(range(len(entry.captions))))
            for e, entry in enumerate(entries)
            if entry.captions
        ]
    raise ValueError(f"unknown layout {layout!r} (one of {', '.join(LAYOUTS)})")


def _json_bytes(obj: Mapping[str, Any]) -> bytes:
    # sort_keys: the member bytes must not depend on the order fields were added in.
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()


class SampleBuilder:
    """Builds the members of planned sample ``i`` (the writer's ``build`` callback).

    The media read of the last entry is cached: in the pair layout consecutive samples repeat
    one image, which is then read and verified once, not once per caption.
    """

    def __init__(
        self,
        entries: Sequence[ImageEntry],
        plan: Sequence[PlannedSample],
        media: MediaSource,
        layout: str,
    ) -> None:
        self.entries = entries
        self.plan = plan
        self.media = media
        self.layout = layout
        self._cached: tuple[int, Media | str] | None = None

    def _read(self, index: int) -> Media | str:
        if self._cached is None or self._cached[0] != index:
            self._cached = (index, self.media.read(self.entries[index]))
        return self._cached[1]

    def __call__(self, item: int) -> BuiltSample:
        planned = self.plan[item]
        entry = self.entries[planned.entry]
        captions = [entry.captions[c] for c in planned.captions]
        kept = [c for c in captions if c.text]
        skipped: Counter[str] = Counter()
        if len(kept) < len(captions):
            skipped[SKIP_EMPTY_CAPTION] = len(captions) - len(kept)
        if not kept:
            return BuiltSample(None, 0, skipped)
        media = self._read(planned.entry)
        if isinstance(media, str):
            skipped[media] += len(kept)
            return BuiltSample(None, 0, skipped)
        meta: dict[str, Any] = dict(entry.meta)
        meta["image_id"] = entry.image_id
        meta["caption_id"] = kept[0].caption_id
        if entry.group_id is not None:
            meta["group_id"] = entry.group_id
        if self.layout == "image":
            meta["captions"] = [c.text for c in kept]
            meta["caption_ids"] = [c.caption_id for c in kept]
        members = [
            (media.ext, media.data),
            ("json", _json_bytes(meta)),
            ("txt", kept[0].text.encode("utf-8")),
        ]
        return BuiltSample(members, len(kept), skipped)


def check_ids(entries: Sequence[ImageEntry]) -> None:
    """Refuse entries whose ids the loader would read as bad (``entries.check_id``, e.g. an
    image id 10^30 or -5, a group label -5) or whose image ids or caption ids repeat (the json
    contract of a shard).

    The loaders build unique ids, but where ids come from the input (COCO, Karpathy, features)
    a duplicate would silently merge two images into one positive set during training.
    """
    image_ids: set[int] = set()
    caption_ids: set[int] = set()
    for entry in entries:
        where = f"image {entry.meta.get('filename', entry.image_id)!r}"
        check_id(entry.image_id, "image_id", where)
        if entry.group_id is not None:
            check_id(entry.group_id, "group_id", where)
        if entry.image_id in image_ids:
            raise ShardError(f"image_id {entry.image_id} is given to two images")
        image_ids.add(entry.image_id)
        for caption in entry.captions:
            check_id(caption.caption_id, "caption_id", where)
            if caption.caption_id in caption_ids:
                raise ShardError(f"caption_id {caption.caption_id} is given to two captions")
            caption_ids.add(caption.caption_id)


def write_entries(
    entries: Sequence[ImageEntry],
    media: MediaSource,
    layout: str,
    options: ShardOptions,
    settings: Mapping[str, Any],
) -> ShardSummary:
    """Write ``entries`` as shards in ``layout``; ``settings`` identify the run for resuming.

    The fingerprint of the entries joins the settings, so resuming with a different input (or
    ``--limit``, or column choice) is refused rather than mixing two datasets in one directory.
    """
    check_ids(entries)
    plan = plan_samples(entries, layout)
    run_settings = {**settings, "layout": layout, "input_sha256": fingerprint(entries)}
    builder = SampleBuilder(entries, plan, media, layout)
    return write_shards(len(plan), builder, options, run_settings)

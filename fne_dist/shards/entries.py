"""The input side of every writer: images with their captions, before any file is read.

Each input format (``folder``, ``coco``, ``karpathy``, ``albef``, ``features``) parses its file
into a list of :class:`ImageEntry` in a deterministic order; :mod:`.layout` turns entries into
samples and :mod:`.writer` writes them. Nothing here opens an image.

Ids follow the shard conventions: ``image_id`` is an int unique per image and shared by all
captions of that image, ``caption_id`` an int unique per caption, ``group_id`` an optional int
class label of the image.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.decode import ID_LOW, id_range_problem


class ShardError(Exception):
    """A user-caused problem (missing or unparseable input, mismatched resume); one line."""


@dataclass(frozen=True)
class Caption:
    """One caption of an image; ``text`` is normalised, "" when the input had none."""

    caption_id: int
    text: str


@dataclass(frozen=True)
class ImageEntry:
    """One image and all its captions, as the input describes them.

    Exactly one of ``path`` (an image file) and ``feature_row`` (a row of a feature matrix) is
    set. ``meta`` holds extra json fields copied into every sample of the image (``filename``,
    ``split``, the original group label, ...).
    """

    image_id: int
    captions: tuple[Caption, ...]
    path: Path | None = None
    feature_row: int | None = None
    group_id: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def normalize_caption(value: object, where: str) -> str:
    """The caption text with whitespace collapsed; "" for a missing (None) caption.

    A non-string caption (a number, a dict) is an input error rather than a skip: it means the
    wrong column or key was chosen, which the user should hear about at once.
    """
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ShardError(f"{where}: caption must be a string, got {type(value).__name__}")
    return " ".join(value.split())


def check_id(value: int, field: str, where: str) -> int:
    """``value`` if the loader accepts it as the json ``field`` (``image_id``, ``caption_id``,
    ``group_id``), else a ShardError: writers and the reader share one id validation
    (``data.decode.id_range_problem``), so no shard is written whose ids it reads as bad."""
    problem = id_range_problem(value, ID_LOW[field])
    if problem is not None:
        raise ShardError(f"{where}: {field} {problem} (the loader reads it as a bad id)")
    return value


def parse_int(value: object, where: str, field: str | None = None) -> int:
    """An int id from an int or a decimal string; anything else is an input error. With
    ``field`` (``image_id``, ``caption_id``, ``group_id``), also one the loader accepts there."""
    if isinstance(value, bool):  # bool is an int subclass, but True is no id
        raise ShardError(f"{where}: expected an integer id, got {value!r}")
    number: int | None = None
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and is_int_like(value):
        number = int(value.strip())
    if number is None:
        raise ShardError(f"{where}: expected an integer id, got {value!r}")
    return number if field is None else check_id(number, field, where)


def is_int_like(value: object) -> bool:
    """True for ints (not bools) and decimal strings such as "42" or "-1"."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    if isinstance(value, str):
        try:
            int(value.strip())
        except ValueError:
            return False
        return True
    return False


def record_once(
    seen: dict[Any, tuple[object, str]], key: object, value: object, where: str, what: str
) -> None:
    """Remember ``value`` for ``key`` (first seen at ``where``); a different value for the same
    key later fails with one line naming both places. ``what``: e.g. "image 'a.jpg' has group"."""
    if key not in seen:
        seen[key] = (value, where)
    elif seen[key][0] != value:
        raise ShardError(f"{where}: {what} {value!r} here but {seen[key][0]!r} at {seen[key][1]}")


def group_ids(labels: Sequence[object]) -> tuple[list[int | None], bool]:
    """Int group ids for per-image raw group labels (None or "" = no label).

    If every label is an int or a decimal string the labels are the ids. Otherwise the distinct
    labels are numbered in sorted order, so the ids do not depend on row order; the second
    return value then says that the caller should keep the original label in the json.
    """
    present = [label for label in labels if label is not None and label != ""]
    if all(is_int_like(label) for label in present):
        return [None if label is None or label == "" else int(label) for label in labels], False
    names = sorted({str(label) for label in present})
    number = {name: i for i, name in enumerate(names)}
    return [None if label is None or label == "" else number[str(label)] for label in labels], True


def limit_entries(entries: list[ImageEntry], limit: int | None) -> list[ImageEntry]:
    """The first ``limit`` images (all of them when ``limit`` is None)."""
    if limit is None:
        return entries
    if limit < 1:
        raise ShardError(f"--limit must be at least 1, got {limit}")
    return entries[:limit]


def fingerprint(entries: Iterable[ImageEntry]) -> str:
    """sha256 over everything the entries contribute to the shards (for resume checks)."""
    digest = hashlib.sha256()
    for entry in entries:
        record = [
            entry.image_id,
            None if entry.path is None else str(entry.path),
            entry.feature_row,
            entry.group_id,
            entry.meta,
            [[c.caption_id, c.text] for c in entry.captions],
        ]
        digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

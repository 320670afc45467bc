"""``albef``: an ALBEF/FNE-style annotation list plus its image directory.

The file is a JSON list of ``{"image": relative path, "caption": str or [str, ...],
"image_id"?}``: training files have one caption per row (an image repeats over rows), test
files a list of captions per row. Rows of one image (same path) are one image, written where the
path first appears, with its captions in file order. ``caption_id`` numbers captions in file
order (a list counts one per caption).

``image_id``: when every image carries an integer id (``391895`` or ``"391895"``) it is used.
Otherwise (ids missing, or named like ``"coco_391895"``) images are numbered 0, 1, ... by first
appearance of their path, and a named id is kept in the json as ``source_image_id``.
"""

from __future__ import annotations

import posixpath
from pathlib import Path

from .annotations import read_json, require_dir
from .entries import (
    Caption,
    ImageEntry,
    ShardError,
    is_int_like,
    normalize_caption,
    parse_int,
    record_once,
)


def load_albef(captions: Path, images: Path) -> list[ImageEntry]:
    """Image entries of an ALBEF annotation list, in order of first appearance."""
    images_dir = require_dir(images, "--images").absolute()
    doc = read_json(captions, "--captions")
    if not isinstance(doc, list):
        raise ShardError(f"--captions: {captions} is not an ALBEF annotation list (a JSON list)")
    paths: list[str] = []
    captions_of: dict[str, list[Caption]] = {}
    raw_id_of: dict[str, tuple[object, str]] = {}
    next_caption_id = 0
    for i, row in enumerate(doc):
        where = f"{captions.name}[{i}]"
        if not isinstance(row, dict):
            raise ShardError(f"{where}: not a JSON object")
        raw_path = row.get("image")
        if not isinstance(raw_path, str) or not raw_path.strip():
            raise ShardError(f"{where}: no 'image' path")
        path = posixpath.normpath(raw_path.strip())
        if path not in captions_of:
            paths.append(path)
            captions_of[path] = []
        value = row.get("caption")
        texts = value if isinstance(value, list) else [value]
        for text in texts:
            captions_of[path].append(Caption(next_caption_id, normalize_caption(text, where)))
            next_caption_id += 1
        raw_id = row.get("image_id")
        if raw_id is None:
            continue
        if isinstance(raw_id, bool) or not isinstance(raw_id, (int, str)):
            raise ShardError(f"{where}: image_id must be an int or a string, got {raw_id!r}")
        record_once(raw_id_of, path, raw_id, where, f"image {path!r} has image_id")

    path_of_id: dict[object, str] = {}
    for path, (raw_id, where) in raw_id_of.items():
        # int("7") == 7: compare ids as the ints they will become when they all are int-like.
        key = int(raw_id) if is_int_like(raw_id) else raw_id
        if key in path_of_id:
            raise ShardError(
                f"{where}: image_id {raw_id!r} is given to two images "
                f"({path_of_id[key]!r} and {path!r})"
            )
        path_of_id[key] = path
    use_given = len(raw_id_of) == len(paths) and all(
        is_int_like(raw_id) for raw_id, _ in raw_id_of.values()
    )

    entries = []
    for number, path in enumerate(paths):
        meta: dict[str, object] = {"filename": path}
        if use_given:
            image_id = parse_int(*raw_id_of[path], "image_id")
        else:
            image_id = number
            if path in raw_id_of:
                meta["source_image_id"] = raw_id_of[path][0]
        entries.append(
            ImageEntry(
                image_id=image_id,
                captions=tuple(captions_of[path]),
                path=images_dir / path,
                meta=meta,
            )
        )
    return entries

"""``folder``: an image folder plus a captions file (CSV/TSV or JSON Lines).

Each row names an image (path relative to ``--images``) and one caption; several rows with the
same image are several captions of one image. Images are ordered by path (a CSV's row order is
often an accident of how it was made, a sorted order is reproducible) and numbered 0, 1, ... in
that order: that number is the ``image_id``. A caption's ``caption_id`` is its data row number
(0-based), so every sample can be traced back to its row. An optional group column gives each
image a ``group_id`` (see :func:`~.entries.group_ids` for non-integer labels).
"""

from __future__ import annotations

import posixpath
from pathlib import Path

from .annotations import read_rows, require_dir
from .entries import Caption, ImageEntry, ShardError, group_ids, normalize_caption, record_once


def load_folder(
    captions: Path,
    images: Path | None = None,
    *,
    image_column: str = "filepath",
    caption_column: str = "caption",
    group_column: str | None = None,
    fmt: str | None = None,
    delimiter: str | None = None,
) -> list[ImageEntry]:
    """Image entries of a captions file, sorted by image path.

    ``images`` defaults to the directory of the captions file; ``fmt`` ("csv"/"jsonl") to the
    file suffix. A row without an image path, or one image with two different group labels, is
    an input error naming the line.
    """
    images_dir = require_dir(images if images is not None else captions.parent, "--images")
    required = [image_column, caption_column] + ([group_column] if group_column else [])
    # (path, caption, group label, where) per data row, in row order; the index is the caption id.
    rows: list[tuple[str, str, object, str]] = []
    for lineno, row in read_rows(captions, "--captions", required, fmt, delimiter):
        where = f"{captions.name} line {lineno}"
        raw_path = row.get(image_column)
        if not isinstance(raw_path, str) or not raw_path.strip():
            raise ShardError(f"{where}: no image path in {image_column!r}")
        # normpath: "./a.jpg" and "a.jpg" are one image.
        path = posixpath.normpath(raw_path.strip())
        text = normalize_caption(row.get(caption_column), where)
        group = row.get(group_column) if group_column else None
        rows.append((path, text, group, where))

    # A stable sort keeps the captions of an image in row order.
    order = sorted(range(len(rows)), key=lambda i: rows[i][0])
    paths: list[str] = []
    captions_of: dict[str, list[Caption]] = {}
    label_of: dict[str, tuple[object, str]] = {}
    for row_index in order:
        path, text, group, where = rows[row_index]
        if path not in captions_of:
            paths.append(path)
            captions_of[path] = []
        captions_of[path].append(Caption(row_index, text))
        if group is None or group == "":
            continue
        record_once(label_of, path, group, where, f"image {path!r} has group")

    labels = [label_of.get(path, (None, ""))[0] for path in paths]
    ids, named = group_ids(labels)
    entries = []
    for image_id, (path, group_id, label) in enumerate(zip(paths, ids, labels, strict=True)):
        meta: dict[str, object] = {"filename": path}
        if named and label is not None:
            meta["group"] = str(label)
        entries.append(
            ImageEntry(
                image_id=image_id,
                captions=tuple(captions_of[path]),
                path=images_dir.absolute() / path,
                group_id=group_id,
                meta=meta,
            )
        )
    return entries

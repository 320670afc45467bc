"""``features``: precomputed image features (an N×D ``.npy``) plus a captions file.

Each captions row (JSON Lines, or CSV/TSV by suffix) has ``index`` (the feature row) and/or
``image_id``, a caption, and optionally ``caption_id`` and a group label. Without ``index`` the
``image_id`` is the row; without ``image_id`` the row is the id. Rows of one image are one image,
written where it first appears, with its captions in file order. ``caption_id`` defaults to the
data row number (0-based).

A row outside the matrix is skipped as ``missing_feature``, a vector with NaN/inf (after the
cast to ``--dtype``) as ``corrupt_feature``.
"""

from __future__ import annotations

from pathlib import Path

from .annotations import read_rows
from .entries import (
    Caption,
    ImageEntry,
    ShardError,
    group_ids,
    normalize_caption,
    parse_int,
    record_once,
)


def _given(row: dict[str, object], key: str) -> bool:
    return row.get(key) is not None and row.get(key) != ""


def load_feature_captions(
    captions: Path,
    *,
    caption_column: str = "caption",
    group_column: str | None = None,
    fmt: str | None = None,
) -> list[ImageEntry]:
    """Image entries (with ``feature_row`` set) of a captions file, by first appearance."""
    order: list[int] = []  # image ids by first appearance
    row_of: dict[int, tuple[int, str]] = {}
    id_of_row: dict[int, int] = {}
    captions_of: dict[int, list[Caption]] = {}
    label_of: dict[int, tuple[object, str]] = {}
    data_row = -1
    for lineno, row in read_rows(captions, "--captions", [], fmt):
        data_row += 1
        where = f"{captions.name} line {lineno}"
        if not (_given(row, "index") or _given(row, "image_id")):
            raise ShardError(f"{where}: needs 'index' (feature row) or 'image_id'")
        feature_row = parse_int(row["index"] if _given(row, "index") else row["image_id"], where)
        image_id = parse_int(
            row["image_id"] if _given(row, "image_id") else row["index"], where, "image_id"
        )
        caption_id = (
            parse_int(row["caption_id"], where, "caption_id")
            if _given(row, "caption_id")
            else data_row
        )
        if image_id not in row_of:
            if feature_row in id_of_row:
                raise ShardError(
                    f"{where}: feature row {feature_row} belongs to image_id "
                    f"{id_of_row[feature_row]} and {image_id}"
                )
            order.append(image_id)
            row_of[image_id] = (feature_row, where)
            id_of_row[feature_row] = image_id
            captions_of[image_id] = []
        elif row_of[image_id][0] != feature_row:
            raise ShardError(
                f"{where}: image_id {image_id} has feature row {feature_row} here but "
                f"{row_of[image_id][0]} at {row_of[image_id][1]}"
            )
        text = normalize_caption(row.get(caption_column), where)
        captions_of[image_id].append(Caption(caption_id, text))
        if group_column and _given(row, group_column):
            group = row[group_column]
            record_once(label_of, image_id, group, where, f"image_id {image_id} has group")

    labels = [label_of.get(image_id, (None, ""))[0] for image_id in order]
    ids, named = group_ids(labels)
    entries = []
    for image_id, group_id, label in zip(order, ids, labels, strict=True):
        feature_row = row_of[image_id][0]
        meta: dict[str, object] = {"feature_row": feature_row}
        if named and label is not None:
            meta["group"] = str(label)
        entries.append(
            ImageEntry(
                image_id=image_id,
                captions=tuple(captions_of[image_id]),
                feature_row=feature_row,
                group_id=group_id,
                meta=meta,
            )
        )
    return entries

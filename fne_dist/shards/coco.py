"""``coco``: a COCO captions file (``captions_train2017.json``) plus its image directory.

``images`` lists ``{id, file_name}``, ``annotations`` lists ``{image_id, id, caption}``. The
COCO ids are kept: ``image_id`` = the image id, ``caption_id`` = the annotation id. Images are
written in id order with their captions in annotation-id order; images without a caption are
left out (there is no pair to write).
"""

from __future__ import annotations

from pathlib import Path

from .annotations import read_json, require_dir
from .entries import Caption, ImageEntry, ShardError, normalize_caption, parse_int


def load_coco(captions: Path, images: Path) -> list[ImageEntry]:
    """Image entries of a COCO captions file, in image-id order."""
    images_dir = require_dir(images, "--images")
    doc = read_json(captions, "--captions")
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("images"), list)
        or not isinstance(doc.get("annotations"), list)
    ):
        raise ShardError(
            f"--captions: {captions} is not a COCO captions file "
            "(needs 'images' and 'annotations' lists)"
        )
    file_of: dict[int, str] = {}
    for i, image in enumerate(doc["images"]):
        where = f"{captions.name} images[{i}]"
        if not isinstance(image, dict):
            raise ShardError(f"{where}: not a JSON object")
        image_id = parse_int(image.get("id"), f"{where}.id", "image_id")
        file_name = image.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            raise ShardError(f"{where}: no 'file_name'")
        if image_id in file_of:
            raise ShardError(f"{where}: image id {image_id} appears twice")
        file_of[image_id] = file_name

    captions_of: dict[int, list[Caption]] = {}
    seen: set[int] = set()
    for i, ann in enumerate(doc["annotations"]):
        where = f"{captions.name} annotations[{i}]"
        if not isinstance(ann, dict):
            raise ShardError(f"{where}: not a JSON object")
        image_id = parse_int(ann.get("image_id"), f"{where}.image_id", "image_id")
        caption_id = parse_int(ann.get("id"), f"{where}.id", "caption_id")
        if image_id not in file_of:
            raise ShardError(f"{where}: image_id {image_id} is not in 'images'")
        if caption_id in seen:
            raise ShardError(f"{where}: annotation id {caption_id} appears twice")
        seen.add(caption_id)
        text = normalize_caption(ann.get("caption"), where)
        captions_of.setdefault(image_id, []).append(Caption(caption_id, text))

    return [
        ImageEntry(
            image_id=image_id,
            captions=tuple(sorted(captions_of[image_id], key=lambda c: c.caption_id)),
            path=images_dir.absolute() / file_of[image_id],
            meta={"filename": file_of[image_id]},
        )
        for image_id in sorted(captions_of)
    ]

"""``karpathy``: a Karpathy split file (``dataset_coco.json``, ``dataset_flickr30k.json``).

``images`` lists ``{filepath?, filename, split, sentences: [{raw, tokens, sentid}], imgid,
cocoid?}``; the image is ``--images/filepath/filename`` (flickr files have no ``filepath``).
``image_id`` = ``cocoid`` when present (so COCO ids stay comparable across tools) else
``imgid``; ``caption_id`` = ``sentid``; the caption is ``raw`` (``tokens`` are lower-cased and
stripped of punctuation, the tokenizer of the model should see the real text).

Splits: ``restval`` joins ``train`` (the usual 113k COCO training set) unless ``keep_restval``.
Images keep the file's order within each split; the json ``split`` keeps the original name.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from pathlib import Path

from .annotations import read_json, require_dir
from .entries import Caption, ImageEntry, ShardError, normalize_caption, parse_int

SPLITS = ("train", "restval", "val", "test")
# Training reads pairs; retrieval evaluation needs every caption of an image in one sample.
DEFAULT_LAYOUT = {"train": "pair", "restval": "pair", "val": "image", "test": "image"}


@dataclass(frozen=True)
class KarpathySplits:
    """The entries of each output split (in SPLITS order) and the file's ``dataset`` name."""

    dataset: str | None
    splits: dict[str, list[ImageEntry]]


def load_karpathy(captions: Path, images: Path, keep_restval: bool = False) -> KarpathySplits:
    """Image entries per split of a Karpathy split file."""
    images_dir = require_dir(images, "--images").absolute()
    doc = read_json(captions, "--captions")
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise ShardError(f"--captions: {captions} is not a Karpathy split file (no 'images' list)")
    by_split: dict[str, list[ImageEntry]] = {}
    for i, image in enumerate(doc["images"]):
        where = f"{captions.name} images[{i}]"
        if not isinstance(image, dict):
            raise ShardError(f"{where}: not a JSON object")
        split = image.get("split")
        if split not in SPLITS:
            raise ShardError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}")
        id_key = "cocoid" if image.get("cocoid") is not None else "imgid"
        image_id = parse_int(image.get(id_key), f"{where}.{id_key}", "image_id")
        filename = image.get("filename")
        if not isinstance(filename, str) or not filename:
            raise ShardError(f"{where}: no 'filename'")
        filepath = image.get("filepath")
        relative = posixpath.join(filepath, filename) if filepath else filename
        sentences = image.get("sentences")
        if not isinstance(sentences, list):
            raise ShardError(f"{where}: no 'sentences' list")
        image_captions = []
        for j, sentence in enumerate(sentences):
            s_where = f"{where}.sentences[{j}]"
            if not isinstance(sentence, dict):
                raise ShardError(f"{s_where}: not a JSON object")
            caption_id = parse_int(sentence.get("sentid"), f"{s_where}.sentid", "caption_id")
            image_captions.append(
                Caption(caption_id, normalize_caption(sentence.get("raw"), s_where))
            )
        out_split = "train" if split == "restval" and not keep_restval else split
        by_split.setdefault(out_split, []).append(
            ImageEntry(
                image_id=image_id,
                captions=tuple(image_captions),
                path=images_dir / relative,
                meta={"filename": relative, "split": split},
            )
        )
    dataset = doc.get("dataset")
    return KarpathySplits(
        dataset=dataset if isinstance(dataset, str) else None,
        splits={split: by_split[split] for split in SPLITS if split in by_split},
    )

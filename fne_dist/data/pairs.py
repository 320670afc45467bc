"""Read WebDataset shards of image-caption pairs into an in-memory split.

Legend: I images, T captions (each caption belongs to one image: ``text_to_image_T``).

Members are decoded explicitly (images with PIL, text as UTF-8, json with ``json.loads``):
webdataset's default decoders would unpickle ``.pyd``/``.pickle`` and ``torch.load`` ``.pth``
members, and nothing from a shard may ever be executed. A sample is keyed by its image id from
the json member, so several captions of one image (several samples) map to one image.
"""

from __future__ import annotations

import glob
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import braceexpand
import torch
import webdataset as wds
from PIL import Image
from torch import Tensor

IMAGE_KEYS = ("webp", "png", "jpg", "jpeg")
REPO_ROOT = Path(__file__).resolve().parents[2]


class DataError(ValueError):
    """A user-caused data problem (bad path, empty or unreadable shard); one line."""


@dataclass
class PairTable:
    """One split held in memory: preprocessed images, captions and their ids."""

    images_I: Tensor  # uint8 I×3×S×S, as produced by the image backbone's preprocess
    captions: list[str]  # T captions
    text_to_image_T: Tensor  # int64: index of each caption's image in 0..I-1
    image_ids_I: Tensor  # int64: the dataset's image id (the positive mask key)
    groups_I: Tensor  # int64: group label (-1 = unknown), e.g. the emoji family

    @property
    def num_images(self) -> int:
        return int(self.images_I.shape[0])

    @property
    def num_captions(self) -> int:
        return len(self.captions)


def resolve_shards(spec: str, key: str) -> list[str]:
    """Shard paths from a brace pattern and/or glob (``a-{000..002}.tar``, ``dir/*.tar.gz``).

    Relative paths are tried from the working directory, then from the repository root, so the
    shipped configs work from anywhere. Raises DataError naming ``key`` if nothing matches.
    """
    if spec.startswith("pipe:"):
        raise DataError(f"{key}: 'pipe:' shard URLs run shell commands and are refused ({spec})")
    paths: list[str] = []
    for pattern in braceexpand.braceexpand(spec):
        candidates = [Path(pattern)]
        if not Path(pattern).is_absolute():
            candidates.append(REPO_ROOT / pattern)
        for candidate in candidates:
            found = sorted(glob.glob(str(candidate)))
            if found:
                paths += found
                break
    if not paths:
        raise DataError(f"{key}: no shard matches {spec!r}")
    return paths


def _every_rank(urls: list[str]) -> list[str]:  # a webdataset nodesplitter
    return urls


def _image_bytes(sample: dict) -> bytes | None:
    for key in IMAGE_KEYS:
        if key in sample:
            return sample[key]
    return None


def load_pairs(
    spec: str,
    key: str,
    preprocess: Callable[[Image.Image], Tensor],
    caption_key: str = "txt",
) -> PairTable:
    """Read every sample of the shards matched by ``spec`` (config key ``key`` for errors)."""
    images: list[Tensor] = []
    captions: list[str] = []
    text_to_image: list[int] = []
    image_ids: list[int] = []
    groups: list[int] = []
    index_of: dict[int, int] = {}
    for path in resolve_shards(spec, key):
        n_before = len(captions)
        # handler=reraise: a corrupt shard is reported with its name, not skipped silently here.
        dataset = wds.WebDataset(
            path,
            shardshuffle=False,
            handler=wds.reraise_exception,
            empty_check=False,
            nodesplitter=_every_rank,  # each rank holds the whole split; batches are split later
        )
        try:
            for sample in dataset:
                raw_image, raw_caption = _image_bytes(sample), sample.get(caption_key)
                if raw_image is None or raw_caption is None or "json" not in sample:
                    raise DataError(
                        f"{key}: sample {sample.get('__key__')} in {path} lacks an image, "
                        f"'{caption_key}' or json member"
                    )
                meta = json.loads(sample["json"].decode("utf-8"))
                image_id = int(meta["image_id"])
                if image_id not in index_of:
                    index_of[image_id] = len(image_ids)
                    image_ids.append(image_id)
                    groups.append(int(meta.get("family_id", meta.get("group_id", -1))))
                    with Image.open(io.BytesIO(raw_image)) as img:
                        images.append(preprocess(img))  # handles modes and alpha
                captions.append(raw_caption.decode("utf-8").strip())
                text_to_image.append(index_of[image_id])
        except DataError:
            raise
        except Exception as err:  # a truncated tar, an undecodable image: name the shard
            raise DataError(f"{key}: cannot read shard {path}: {err}".splitlines()[0]) from None
        if len(captions) == n_before:
            raise DataError(f"{key}: shard {path} contains no samples")
    return PairTable(
        images_I=torch.stack(images),
        captions=captions,
        text_to_image_T=torch.tensor(text_to_image, dtype=torch.long),
        image_ids_I=torch.tensor(image_ids, dtype=torch.long),
        groups_I=torch.tensor(groups, dtype=torch.long),
    )

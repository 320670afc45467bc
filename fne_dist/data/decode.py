"""Explicit decoders for shard samples, and the accounting of bad ones.

Nothing from a shard is executed or unpickled: images are opened with PIL (after a pixel-count
check), text is UTF-8, json is ``json.loads``, ``.npy`` uses ``allow_pickle=False``. A member
with any other extension makes the sample bad ("unknown_extension"): webdataset's default
decoders would unpickle ``.pyd``/``.pickle`` and ``torch.load`` ``.pth`` members.

A bad sample raises ``BadSample(reason)``; the stream skips it and counts it per reason.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import time
import warnings
from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
FEATURE_EXTS = ("img_feat.npy", "txt_feat.npy")
# Members we know how to read safely. Other text fields (``full.txt``, ``url.txt``) and json
# fields (``meta.json``) are data too; anything else is rejected.
_SAFE_EXT = re.compile(
    r"^((.+\.)?(txt|json)|jpg|jpeg|png|webp|npy|img_feat\.npy|txt_feat\.npy|cls)$"
)

REASONS = (
    "truncated_tar",
    "unknown_extension",
    "missing_image",
    "corrupt_image",
    "too_many_pixels",
    "missing_caption",
    "empty_caption",
    "bad_utf8",
    "bad_json",
    "bad_npy",
)

log = logging.getLogger("fne_dist.data")


class BadSample(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class Decoded:
    """One decoded sample: an image (PIL) or its precomputed features, and its captions."""

    key: str
    image: Image.Image | None
    img_feat: np.ndarray | None
    captions: list[str]
    txt_feat: np.ndarray | None  # K×F features of ``captions`` (feature shards)
    image_id: int
    caption_id: int
    group: int
    raw_image: tuple[str, bytes] | None  # (ext, bytes), kept for feature-shard writing


def stable_id(key: str) -> int:
    """A 62-bit id from a sample key, for shards without ids (img2dataset): decimal keys are used
    as they are, others hashed (blake2b), so every rank derives the same id."""
    tail = key.rsplit("/", 1)[-1]
    if tail.isdigit():
        return int(tail)
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 2


def clean_caption(text: str) -> str:
    """Strip and collapse whitespace (captions from the web carry newlines and tabs)."""
    return " ".join(text.split())


def _text(sample: dict, key: str) -> str:
    try:
        return sample[key].decode("utf-8")
    except UnicodeDecodeError:
        raise BadSample("bad_utf8", key) from None


_NPY_HEADERS: dict[bytes, tuple[tuple[int, ...], np.dtype, int]] = {}


def _npy(raw: bytes, key: str) -> np.ndarray:
    """A float array from ``.npy`` bytes, never unpickling. Every sample of a feature shard has
    the same header, so a parsed header is reused (numpy parses it with ``ast`` each time)."""
    try:
        if raw[:6] != b"\x93NUMPY":
            raise ValueError("not an .npy file")
        size_bytes = 2 if raw[6] == 1 else 4
        end = 8 + size_bytes + int.from_bytes(raw[8 : 8 + size_bytes], "little")
        header = raw[:end]
        if header not in _NPY_HEADERS:
            stream = io.BytesIO(raw)
            version = np.lib.format.read_magic(stream)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(stream)
            if dtype.hasobject or fortran or dtype.kind != "f":  # object arrays need pickle
                raise ValueError(f"unsupported array (dtype {dtype}, fortran order {fortran})")
            _NPY_HEADERS[header] = (shape, dtype, stream.tell())
        shape, dtype, offset = _NPY_HEADERS[header]
        arr = np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape)), offset=offset)
    except Exception as err:
        raise BadSample("bad_npy", f"{key}: {err}") from None
    return arr.reshape(shape).astype(np.float32)


_PIL_FORMAT = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}


def open_image(raw: bytes, max_pixels: int, ext: str = "") -> Image.Image:
    """Decode an image, refusing oversized ones before their pixels are decoded. The member's
    extension is tried first: PIL otherwise probes several formats before the right one."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                img = Image.open(io.BytesIO(raw), formats=[_PIL_FORMAT[ext]] if ext else None)
            except Image.UnidentifiedImageError:  # mislabelled (a PNG named .jpg): probe all
                img = Image.open(io.BytesIO(raw))
            width, height = img.size
            if width * height > max_pixels:
                raise BadSample("too_many_pixels", f"{width}×{height}")
            img.load()
    except BadSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadSample("too_many_pixels", str(err)) from None
    except Exception as err:
        detail = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the image bytes", str(err))
        raise BadSample("corrupt_image", detail.splitlines()[0] if detail else "") from None
    return img  # the backbone's preprocess handles modes and alpha


def decode_sample(
    sample: dict,
    caption_key: str = "txt",
    max_pixels: int = 50_000_000,
    all_captions: bool = False,
    decode_image: bool = True,
) -> Decoded:
    """Decode one grouped sample (``{"__key__": ..., ext: bytes}``) or raise BadSample.

    ``all_captions``: evaluation reads json ``captions`` (every caption of the image) when
    present; training reads ``caption_key`` (one caption per sample).
    """
    key = str(sample.get("__key__", "?"))
    members = [k for k in sample if not k.startswith("__")]
    for ext in members:
        if not _SAFE_EXT.match(ext):
            raise BadSample("unknown_extension", f"{key}.{ext}")
    meta: dict = {}
    if "json" in sample:
        try:
            meta = json.loads(_text(sample, "json"))
        except ValueError:
            raise BadSample("bad_json", key) from None
        if not isinstance(meta, dict):
            raise BadSample("bad_json", f"{key}: not an object")

    image = img_feat = None
    raw_image = None
    if "img_feat.npy" in sample:
        img_feat = _npy(sample["img_feat.npy"], "img_feat.npy")
    else:
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None or not sample[ext]:
            raise BadSample("missing_image" if ext is None else "corrupt_image", key)
        raw_image = (ext, sample[ext])
        if decode_image:
            image = open_image(sample[ext], max_pixels, ext)

    captions: list[str]
    listed = meta.get("captions") if all_captions else None
    if isinstance(listed, list) and listed:
        captions = [clean_caption(str(c)) for c in listed]
    elif caption_key in sample:
        captions = [clean_caption(_text(sample, caption_key))]
    else:
        raise BadSample("missing_caption", f"{key}.{caption_key}")
    if not all(captions):
        raise BadSample("empty_caption", key)
    txt_feat = _npy(sample["txt_feat.npy"], "txt_feat.npy") if "txt_feat.npy" in sample else None
    if txt_feat is not None:
        txt_feat = txt_feat.reshape(-1, txt_feat.shape[-1])
        if txt_feat.shape[0] != len(captions):
            raise BadSample(
                "bad_npy", f"{key}: {txt_feat.shape[0]} features, {len(captions)} captions"
            )

    try:
        image_id = int(meta["image_id"]) if "image_id" in meta else stable_id(key)
        caption_id = int(meta.get("caption_id", -1))
        group = int(meta.get("group_id", meta.get("family_id", -1)))
    except (TypeError, ValueError):
        raise BadSample("bad_json", f"{key}: non-integer id") from None
    return Decoded(key, image, img_feat, captions, txt_feat, image_id, caption_id, group, raw_image)


class BadSampleLog:
    """Counts bad samples per reason and logs them rate-limited: the first few of each reason,
    then at most one line per ``every_s`` seconds with the running counts."""

    def __init__(self, every_s: float = 30.0, first: int = 3) -> None:
        self.counts: Counter[str] = Counter()
        self._every_s, self._first = every_s, first
        self._last = 0.0
        self._pending: Counter[str] = Counter()  # not yet handed to the consumer of counts

    def add(self, reason: str, where: str, detail: str = "", n: int = 1) -> None:
        self.counts[reason] += n
        self._pending[reason] += n
        now = time.monotonic()
        if self.counts[reason] <= self._first:
            log.warning("skipped bad sample (%s) in %s: %s", reason, where, detail)
        elif now - self._last >= self._every_s:
            self._last = now
            log.warning("bad samples so far: %s (latest in %s)", dict(self.counts), where)

    def take(self) -> dict[str, int]:
        """Counts since the last call (they travel with the next batch)."""
        out, self._pending = dict(self._pending), Counter()
        return out

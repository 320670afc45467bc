"""Explicit decoders for shard samples, and the accounting of bad ones.

Nothing from a shard is executed or unpickled: images are opened with PIL only when their magic
bytes say JPEG, PNG, WebP, GIF or BMP (``open_raster``; PIL's own probing would hand PostScript
to Ghostscript), after a pixel-count check; text is UTF-8, json is ``json.loads``, ``.npy``
uses ``allow_pickle=False``. A member with any other extension makes the sample bad
("unknown_extension"): webdataset's default decoders would unpickle ``.pyd``/``.pickle`` and
``torch.load`` ``.pth`` members.

A bad sample raises ``BadSample(reason)``; the stream skips it and counts it per reason; its
detail names the member (``<key>.<extension>``) and, for json, the field. Every value taken
from a sample is checked for type and range here, where it enters:

* ids are JSON integers or strings (not floats or booleans: ``3.7`` is bad, not truncated to
  3); ``image_id`` lies in 0..2^63−1 (negative ids are reserved: the memory marks empty slots
  with −100), ``caption_id`` and ``group_id``/``family_id`` are −1 (no label, ``NO_GROUP``) or
  in 0..2^63−1. A string id (a file name, ``"train-123"``, a hash) becomes an integer by
  ``string_id``: ASCII decimal digits are their number, any other non-empty string a 62-bit
  blake2b hash (never negative, so never the empty-slot marker nor "no label"). Two different
  strings with one id are caught by an ``IdRegistry`` where the reader keeps one (the training
  stream per loader consumer and epoch, evaluation per rank and split) and the later sample is
  bad ("id_collision"), never silently merged with the other. A sample without a json
  ``image_id`` (img2dataset) gets ``stable_id`` of its key and its shard's directory (keys
  count from 0 in every img2dataset output); such an id given to other image bytes is an
  ``id_collision`` too;
* a caption is text after replacing control characters by spaces and collapsing whitespace;
  one with nothing left but whitespace, control or format characters is empty;
* ``.npy`` features are finite floats.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
import re
import time
import unicodedata
import warnings
from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..fne.groups import NO_GROUP

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
    "bad_id",
    "bad_npy",
    "duplicate_member",
    "id_collision",
)
MAX_ID = 2**63 - 1  # ids are int64 tensors
DUPLICATE = "__duplicate__"  # set by the stream's grouping: a member name repeated in a sample
RESERVED = "__reserved__"  # set by the grouping: a member extension that looks like ``__x__``

log = logging.getLogger("fne_dist.data")


class BadSample(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


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


def stable_id(key: str, source: str = "") -> int:
    """A 62-bit id for a sample without a json ``image_id`` (img2dataset shards), from its key
    and its ``source``, the directory its shard lies in (as the data spec names it): such
    keys count from 0 in every output directory, so the key alone would give two sources'
    different pictures one id (positives, false negatives and metrics merged). A blake2b hash
    of both, so every rank derives the same id; never negative."""
    raw = f"{source}\0{key}".encode("utf-8", "surrogatepass")  # tar names may hold surrogates
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little") >> 2


def source_of(sample: dict) -> str:
    """The directory of the shard a grouped sample came from ("" when unknown)."""
    return posixpath.dirname(str(sample.get("__url__") or ""))


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def clean_caption(text: str) -> str:
    """Control characters become spaces, then whitespace is stripped and collapsed (captions
    from the web carry newlines, tabs and NUL bytes)."""
    return " ".join(_CONTROL.sub(" ", text).split())


def is_blank(text: str) -> bool:
    """True when ``text`` has nothing but whitespace, control and format characters (a
    caption of NUL bytes or zero-width spaces says nothing)."""
    return all(unicodedata.category(ch) in ("Cc", "Cf") or ch.isspace() for ch in text)


def describe_value(value: object) -> str:
    """A short, safe rendering of a JSON value for a message (never a 10 MB string)."""
    if isinstance(value, str):
        return repr(value[:40])
    if isinstance(value, (bool, float)) or value is None:
        return repr(value)
    if isinstance(value, int):
        return str(value) if abs(value) < 10**40 else f"an integer of {value.bit_length()} bits"
    return f"a JSON {type(value).__name__}"


def string_id(value: str) -> int:
    """The id of a string id: ASCII decimal digits (within int64) are their number, any other
    string the top 62 bits of its blake2b digest (8 bytes), so ids are stable across ranks,
    runs and machines and never negative."""
    decimal = value.isascii() and value.isdigit() and len(value.lstrip("0")) <= 19
    if decimal and int(value) <= MAX_ID:
        return int(value)
    raw = value.encode("utf-8", "surrogatepass")  # json may hold a lone surrogate
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little") >> 2


class IdRegistry:
    """Which string each hashed id came from, per field, to catch two different strings that
    hash to one id (a 62-bit hash: about n²/2^63 collisions among n strings); and which image
    bytes each id derived from a sample key named. Up to ``limit`` ids per field are
    remembered; beyond, ids are no longer checked (memory stays bounded)."""

    def __init__(self, limit: int = 2_000_000) -> None:
        self.limit = limit
        self.seen: dict[str, dict[int, str]] = {}

    def _first(self, field: str, id_: int, value: str) -> str | None:
        """The value first recorded for ``id_`` (None, and ``value`` recorded, if new)."""
        table = self.seen.setdefault(field, {})
        previous = table.get(id_)
        if previous is None and len(table) < self.limit:
            table[id_] = value
        return previous

    def check(self, field: str, value: str, id_: int, key: str) -> None:
        previous = self._first(field, id_, value)
        if previous is not None and previous != value:
            raise BadSample(
                "id_collision",
                f"{key}.json {field}: {describe_value(value)} and {describe_value(previous)} "
                f"have the same id {id_}",
            )

    def check_image(self, id_: int, content: bytes, key: str) -> None:
        """An id derived from a sample key names one picture: another sample with that id and
        other image bytes is bad, never a positive of the first (keys repeated in one
        directory, or a 62-bit hash collision)."""
        digest = hashlib.blake2b(content, digest_size=16).hexdigest()
        previous = self._first("image bytes", id_, digest)
        if previous is not None and previous != digest:
            raise BadSample(
                "id_collision",
                f"{key}: image id {id_} (from the key, no json image_id) was given to other "
                "image bytes before",
            )


# The lowest id the loader accepts per json field; all go up to MAX_ID. The shard writers check
# the ids they write with ``id_range_problem`` too, so they never write an id read back as bad.
ID_LOW = {"image_id": 0, "caption_id": -1, "group_id": NO_GROUP, "family_id": NO_GROUP}


def id_range_problem(value: int, low: int) -> str | None:
    """Why the integer ``value`` is no id from ``low``..2^63−1 (None when it is one)."""
    if not low <= value <= MAX_ID:
        return f"{describe_value(value)} is outside {low}..2^63-1"
    return None


def json_int(
    meta: dict, field: str, key: str, default: int, low: int, ids: IdRegistry | None = None
) -> int:
    """``meta[field]`` (``default`` if absent) as an int in ``low``..MAX_ID, or a non-empty
    string id (``string_id``; checked against ``ids`` for collisions), else BadSample."""
    value = meta.get(field, default)
    if isinstance(value, str):
        if not value.strip():
            raise BadSample("bad_id", f"{key}.json {field}: an empty string")
        id_ = string_id(value)
        if ids is not None:
            ids.check(field, value, id_, key)
        return id_
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadSample(
            "bad_id", f"{key}.json {field}: not an integer or string ({describe_value(value)})"
        )
    problem = id_range_problem(value, low)
    if problem is not None:
        raise BadSample("bad_id", f"{key}.json {field}: {problem}")
    return value


def _text(sample: dict, ext: str) -> str:
    try:
        return sample[ext].decode("utf-8")
    except UnicodeDecodeError:
        where = f"{sample.get('__key__', '?')}.{ext}"
        raise BadSample("bad_utf8", f"{where}: not UTF-8") from None


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
        with np.errstate(over="ignore"):  # float64 beyond float32's range: caught below
            out = arr.reshape(shape).astype(np.float32)
    except Exception as err:
        raise BadSample("bad_npy", f"{key}: {err}") from None
    if out.size == 0 or not np.isfinite(out).all():  # also float64 beyond float32's range
        raise BadSample("bad_npy", f"{key}: empty or non-finite values")
    return out


# The raster formats a member may hold, recognised by their first bytes before PIL sees them:
# PIL's own format probing would hand a PostScript/EPS member (named .png or not) to Ghostscript,
# an external program that runs the file as a program. JPEG, PNG and WebP are what the shard
# writers and img2dataset write; GIF and BMP are what a mislabelled web image most often is, and
# PIL decodes both itself. TIFF is left out (libtiff and its dozens of codecs, never a caption
# image format), as is every format PIL delegates to another program (EPS/PS, PDF).
IMAGE_MAGIC: tuple[tuple[str, bytes], ...] = (
    ("JPEG", b"\xff\xd8\xff"),
    ("PNG", b"\x89PNG\r\n\x1a\n"),
    ("GIF", b"GIF87a"),
    ("GIF", b"GIF89a"),
    ("BMP", b"BM"),
)
DECODED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
_FORMAT_NAMES = "JPEG, PNG, WebP, GIF or BMP"


def image_format(raw: bytes) -> str | None:
    """PIL's name of the allowed raster format ``raw`` starts with (``DECODED_FORMATS``), by
    its magic bytes alone; None for anything else (PostScript, PDF, TIFF, text, garbage)."""
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return "WEBP"
    return next((name for name, magic in IMAGE_MAGIC if raw.startswith(magic)), None)


class RefusedImage(ValueError):
    """Image bytes that are not one of the allowed raster formats."""


def open_raster(raw: bytes, allowed: tuple[str, ...] = DECODED_FORMATS) -> Image.Image:
    """``Image.open`` on bytes of an allowed raster format only: the format is chosen by the
    magic bytes and PIL is told to try that plugin alone (``formats=[...]``), so no other
    plugin, and no external program, ever sees the bytes. Every reader of image bytes from
    data (training, evaluation, the feature cache, the shard writers) opens them here.
    Raises RefusedImage for other bytes, PIL's errors for a broken image of an allowed format."""
    found = image_format(raw)
    if found is None or found not in allowed:
        names = _FORMAT_NAMES if allowed == DECODED_FORMATS else ", ".join(allowed)
        raise RefusedImage(f"not a {names} image (starts with {bytes(raw[:12])!r})")
    return Image.open(io.BytesIO(raw), formats=[found])


def open_image(raw: bytes, max_pixels: int) -> Image.Image:
    """Decode an image of an allowed raster format (``open_raster``), refusing oversized ones
    before their pixels are decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = open_raster(raw)
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


def _meta(sample: dict, key: str) -> dict:
    """The json member as an object ({} without one); unparseable, too deeply nested or not an
    object → bad_json. ``Infinity``/``NaN`` parse to floats and fail the id checks."""
    if "json" not in sample:
        return {}
    try:
        meta = json.loads(_text(sample, "json"))
    except (ValueError, RecursionError) as err:  # RecursionError: 100k nested '['
        raise BadSample("bad_json", f"{key}.json: {type(err).__name__}") from None
    if not isinstance(meta, dict):
        raise BadSample("bad_json", f"{key}.json: not an object")
    return meta


def _captions(
    sample: dict, meta: dict, key: str, caption_key: str, all_captions: bool
) -> list[str]:
    listed = meta.get("captions") if all_captions else None
    if isinstance(listed, list) and listed:
        captions = []
        for i, text in enumerate(listed):
            if not isinstance(text, str):
                raise BadSample("bad_json", f"{key}.json captions[{i}]: not a string")
            try:
                text.encode("utf-8")  # a lone surrogate ("\ud800") would fail the tokenizer
            except UnicodeEncodeError:
                raise BadSample("bad_utf8", f"{key}.json captions[{i}]") from None
            captions.append(clean_caption(text))
    elif caption_key in sample:
        captions = [clean_caption(_text(sample, caption_key))]
        listed = None
    else:
        raise BadSample("missing_caption", f"{key}.{caption_key}: no such member")
    for i, caption in enumerate(captions):
        if is_blank(caption):
            where = f"{key}.json captions[{i}]" if listed else f"{key}.{caption_key}"
            raise BadSample("empty_caption", f"{where}: nothing but whitespace or control")
    return captions


def _image(
    sample: dict, key: str, max_pixels: int, decode_image: bool
) -> tuple[Image.Image | None, np.ndarray | None, tuple[str, bytes] | None]:
    """(PIL image or None, img_feat or None, raw (ext, bytes) or None)."""
    if "img_feat.npy" in sample:
        return None, _npy(sample["img_feat.npy"], f"{key}.img_feat.npy"), None
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise BadSample("missing_image", f"{key}: no {'/'.join(IMAGE_EXTS)} or img_feat.npy member")
    if not sample[ext]:
        raise BadSample("corrupt_image", f"{key}.{ext}: empty")
    try:
        image = open_image(sample[ext], max_pixels) if decode_image else None
    except BadSample as err:  # open_image knows the bytes, not the member
        raise BadSample(err.reason, f"{key}.{ext}: {err.detail}") from None
    return image, None, (ext, sample[ext])


def decode_sample(
    sample: dict,
    caption_key: str = "txt",
    max_pixels: int = 50_000_000,
    all_captions: bool = False,
    decode_image: bool = True,
    ids: IdRegistry | None = None,
) -> Decoded:
    """Decode one grouped sample (``{"__key__": ..., ext: bytes}``) or raise BadSample.

    ``all_captions``: evaluation reads json ``captions`` (every caption of the image) when
    present; training reads ``caption_key`` (one caption per sample). ``ids``: where
    string ids are checked for collisions (one registry per stream).
    """
    key = str(sample.get("__key__", "?"))
    if DUPLICATE in sample:
        raise BadSample("duplicate_member", f"{key}.{sample[DUPLICATE]} appears twice")
    if RESERVED in sample:
        raise BadSample("unknown_extension", f"{key}.{sample[RESERVED]}")
    for ext in (k for k in sample if not k.startswith("__")):
        if not _SAFE_EXT.match(ext):
            raise BadSample("unknown_extension", f"{key}.{ext}")
    meta = _meta(sample, key)
    derived = "image_id" not in meta
    if derived:
        image_id = stable_id(key, source_of(sample))
    else:
        image_id = json_int(meta, "image_id", key, -1, ID_LOW["image_id"], ids)
    caption_id = json_int(meta, "caption_id", key, -1, ID_LOW["caption_id"], ids)
    group_field = "group_id" if "group_id" in meta else "family_id"
    group = json_int(meta, group_field, key, NO_GROUP, ID_LOW[group_field], ids)
    image, img_feat, raw_image = _image(sample, key, max_pixels, decode_image)
    if derived and ids is not None:
        ids.check_image(image_id, raw_image[1] if raw_image else sample["img_feat.npy"], key)
    captions = _captions(sample, meta, key, caption_key, all_captions)
    has_txt_feat = "txt_feat.npy" in sample
    txt_feat = _npy(sample["txt_feat.npy"], f"{key}.txt_feat.npy") if has_txt_feat else None
    if txt_feat is not None:
        txt_feat = txt_feat.reshape(-1, txt_feat.shape[-1]) if txt_feat.ndim else txt_feat
        if txt_feat.ndim != 2 or txt_feat.shape[0] != len(captions):
            raise BadSample(
                "bad_npy", f"{key}.txt_feat.npy: shape {txt_feat.shape}, {len(captions)} captions"
            )
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

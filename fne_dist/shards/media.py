"""The image (or feature) member of a sample: read, checked, never re-encoded.

An image file is copied into the shard byte for byte, so a shard is a deterministic function of
the input files and writing costs no decoding. It is still opened with PIL and ``verify()``-ed,
because a file that the training loader cannot decode would otherwise end a training run hours
later; it is opened as the loader opens it (``data.decode.open_raster``): only as a raster
format recognised by its magic bytes, so that no PIL plugin hands it to an external program.
A precomputed feature vector becomes an ``img_feat.npy`` member written with
``numpy.save(..., allow_pickle=False)``.

A read either returns :class:`Media` or the name of the skip reason (one of the ``SKIP_*``
constants); the writer counts the reasons.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from ..data.decode import open_raster
from .annotations import require_file
from .entries import ImageEntry, ShardError, file_sha256

SKIP_EMPTY_CAPTION = "empty_caption"
SKIP_MISSING_IMAGE = "missing_image"
SKIP_CORRUPT_IMAGE = "corrupt_image"
SKIP_UNSUPPORTED_IMAGE = "unsupported_image_type"
SKIP_MISSING_FEATURE = "missing_feature"
SKIP_CORRUPT_FEATURE = "corrupt_feature"
SKIP_OUTSIDE_IMAGES = "outside_images"

# Member extension by file suffix: only the formats the training loader decodes.
IMAGE_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
# Member extension by the format PIL finds in the bytes.
PIL_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
FEATURE_MEMBER = "img_feat.npy"


@dataclass(frozen=True)
class Media:
    """The image-side member of a sample: its extension (``jpg``, ``img_feat.npy``) and bytes."""

    ext: str
    data: bytes


class MediaSource(Protocol):
    """Reads the image-side member of an entry, or says why it cannot."""

    def read(self, entry: ImageEntry) -> Media | str:
        """The member, or the skip reason."""
        ...


def inside(path: Path, root: Path) -> bool:
    """Whether ``path`` lies under ``root`` once ``..`` is resolved lexically. Lexically, not
    by resolving links: the image directory and its links are the user's own, the paths in an
    annotation file may not be (``../../home/me/.ssh/id_rsa``, ``/etc/shadow``)."""
    base = os.path.normpath(os.path.abspath(root))
    target = os.path.normpath(os.path.abspath(path))
    return os.path.commonpath([base, target]) == base and target != base


class ImageFiles:
    """Image files on disk, copied unchanged after a PIL ``verify()``.

    With ``root`` (the ``--images`` directory), a path outside it (``../``, absolute) is
    refused (``outside_images``) unless ``allow_outside``: converting an untrusted annotation
    file must not copy arbitrary files of the machine into shards.
    """

    def __init__(self, root: Path | None = None, allow_outside: bool = False) -> None:
        self.root = root
        self.allow_outside = allow_outside

    def read(self, entry: ImageEntry) -> Media | str:
        """The image bytes with their real extension, or a skip reason."""
        assert entry.path is not None, "ImageFiles needs entries with a path"
        if self.root is not None and not self.allow_outside and not inside(entry.path, self.root):
            return SKIP_OUTSIDE_IMAGES
        if entry.path.suffix.lower() not in IMAGE_SUFFIXES:
            return SKIP_UNSUPPORTED_IMAGE
        try:
            data = entry.path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            # Other OSErrors (permissions, I/O errors) propagate: the run stops, and rerunning
            # the command resumes once the disk is fixed instead of silently dropping images.
            return SKIP_MISSING_IMAGE
        found = image_format(data)
        if found is None:
            return SKIP_CORRUPT_IMAGE
        if found not in PIL_FORMATS:
            return SKIP_UNSUPPORTED_IMAGE
        # The bytes decide the extension: a PNG saved as x.jpg is a png member, so that a
        # loader which picks its decoder by extension decodes it.
        return Media(PIL_FORMATS[found], data)


def image_format(data: bytes) -> str | None:
    """PIL's format name for image bytes of an allowed raster format (``open_raster``: chosen
    by magic bytes, so PostScript never reaches Ghostscript) that pass ``verify()``; None for
    anything else."""
    try:
        with warnings.catch_warnings():
            # A huge image is a DecompressionBombWarning only; it is valid, so stay quiet.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with open_raster(data) as image:
                found = image.format
                image.verify()
    except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        return None
    return found


class FeatureRows:
    """Rows of an N×D float feature matrix stored as ``.npy`` (memory-mapped, never unpickled)."""

    def __init__(self, path: Path, dtype: str | None = None) -> None:
        require_file(path, "--features")
        try:
            matrix = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError:
            # numpy treats anything without the .npy magic as a pickle, and its message then
            # suggests allow_pickle=True: say what is wrong instead.
            raise ShardError(
                f"--features: {path} is not a .npy array (other formats and pickled object "
                "arrays are refused)"
            ) from None
        except (OSError, EOFError) as err:
            raise ShardError(f"--features: {path} is unreadable ({err})") from None
        if not isinstance(matrix, np.ndarray) or matrix.ndim != 2:
            shape = getattr(matrix, "shape", None)
            raise ShardError(f"--features: {path} must hold an N×D matrix, got shape {shape}")
        if not np.issubdtype(matrix.dtype, np.floating):
            raise ShardError(f"--features: {path} must be floating point, got {matrix.dtype}")
        if dtype is None:
            # float16/float32 are kept; wider floats shrink to float32, what the loader expects.
            dtype = "float16" if matrix.dtype == np.float16 else "float32"
        if dtype not in ("float16", "float32"):
            raise ShardError(f"--dtype must be float16 or float32, got {dtype!r}")
        self.path = path
        self.matrix = matrix
        self.dtype = np.dtype(dtype)

    @property
    def num_rows(self) -> int:
        """N, the number of feature vectors."""
        return int(self.matrix.shape[0])

    def sha256(self) -> str:
        """sha256 of the .npy file (part of the resume settings)."""
        return file_sha256(self.path)

    def read(self, entry: ImageEntry) -> Media | str:
        """The entry's feature vector as ``img_feat.npy`` bytes, or a skip reason."""
        row = entry.feature_row
        assert row is not None, "FeatureRows needs entries with a feature_row"
        if not 0 <= row < self.num_rows:
            return SKIP_MISSING_FEATURE
        vector = np.ascontiguousarray(self.matrix[row], dtype=self.dtype)
        if not np.isfinite(vector).all():  # also catches float32 → float16 overflow
            return SKIP_CORRUPT_FEATURE
        buf = io.BytesIO()
        np.save(buf, vector, allow_pickle=False)
        return Media(FEATURE_MEMBER, buf.getvalue())

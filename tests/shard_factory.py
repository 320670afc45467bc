"""Tiny shards for the data tests, written with the plain ``tarfile`` module (no fne_dist code),
so the reader is tested against bytes it did not write itself."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image


def png(size: int = 4, value: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (value % 256, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def sample_members(image_id: int, group: int = -1, caption: str | None = None) -> dict[str, bytes]:
    """The members of one well-formed sample."""
    return {
        "png": png(value=image_id),
        "txt": (caption or f"caption {image_id}").encode(),
        "json": json.dumps({"image_id": image_id, "group_id": group}).encode(),
    }


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A tar (``.tar.gz`` by suffix) with ``key.ext`` members in the given order."""
    mode = "w:gz" if path.name.endswith(".gz") else "w"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def write_dataset(
    directory: Path,
    sizes: list[int],
    prefix: str = "part",
    first_id: int = 0,
    group: int = -1,
    sizes_json: bool = True,
) -> list[Path]:
    """Shards ``prefix-00000i.tar`` with consecutive image ids; a sizes.json unless told not."""
    paths, image_id = [], first_id
    index = {}
    for n, size in enumerate(sizes):
        samples = []
        for _ in range(size):
            samples.append((f"{prefix}{image_id:08d}", sample_members(image_id, group)))
            image_id += 1
        path = write_tar(directory / f"{prefix}-{n:06d}.tar", samples)
        paths.append(path)
        index[path.name] = size
    if sizes_json:
        (directory / "sizes.json").write_text(json.dumps(index))
    return paths

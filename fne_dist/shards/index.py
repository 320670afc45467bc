"""``index``: (re)build ``sizes.json`` for existing shards by counting their samples.

For shards written by other tools (img2dataset writes ``000000000.jpg``, ``000000000.txt``,
``000000000.json`` per sample) or after shards were copied around. Samples are counted the way
webdataset groups members: a sample is a run of consecutive regular members with the same key
(the member name up to the first dot of its base name); webdataset's ``__meta__`` members and
names without an extension are ignored. Nothing is decoded; a .tar.gz is only decompressed.
"""

from __future__ import annotations

import glob
import json
import sys
import tarfile
import zlib
from pathlib import Path

import braceexpand
from tqdm import tqdm

from ..data.sources import count_samples as _count_samples
from ..data.sources import sample_count
from .entries import ShardError
from .writer import SIZES_FILE, write_json_atomic

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def count_samples(path: Path) -> int:
    """Number of samples in a .tar/.tar.gz shard, streamed (constant memory), counted exactly
    as the training loader counts them; an unreadable or truncated tar is an error here."""
    try:
        return _count_samples(path, strict=True)  # a Path: opened as a file, whatever its name
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise ShardError(f"{path}: not a readable tar file ({err})") from None


def find_shards(spec: str) -> list[Path]:
    """The shards of a directory (its .tar/.tar.gz/.tgz files), or of a glob/brace pattern."""
    root = Path(spec)
    if root.is_dir():
        found = [p for p in root.iterdir() if p.is_file() and p.name.endswith(TAR_SUFFIXES)]
    else:
        found = [
            Path(p)
            for pattern in braceexpand.braceexpand(spec)
            for p in glob.glob(pattern)
            if p.endswith(TAR_SUFFIXES) and Path(p).is_file()
        ]
    if not found:
        raise ShardError(f"no .tar/.tar.gz shard matches {spec!r}")
    return sorted(set(found))


def index_shards(spec: str, progress: bool = True) -> dict[Path, dict[str, int]]:
    """Count the samples of every shard matched by ``spec``; write ``sizes.json`` next to them.

    Returns the written sizes per directory. Entries of an existing ``sizes.json`` for shards
    that were not counted this time are kept if their file still exists (so indexing a glob of
    new shards adds to the index), and dropped otherwise.
    """
    shards = find_shards(spec)
    counts: dict[Path, dict[str, int]] = {}
    for path in tqdm(shards, desc="index", unit="shard", file=sys.stderr, disable=not progress):
        counts.setdefault(path.parent, {})[path.name] = count_samples(path)
    written: dict[Path, dict[str, int]] = {}
    for directory, fresh in counts.items():
        sizes: dict[str, int] = {}
        old_path = directory / SIZES_FILE
        if old_path.is_file():
            try:
                old = json.loads(old_path.read_text(encoding="utf-8"))
            except (ValueError, RecursionError):
                old = {}  # an unreadable index is exactly what this command replaces
            if isinstance(old, dict):
                sizes = {
                    name: n
                    for name, n in old.items()
                    if sample_count(n) is not None and (directory / name).is_file()
                }
        sizes.update(fresh)
        sizes = dict(sorted(sizes.items()))
        write_json_atomic(old_path, sizes)
        written[directory] = sizes
    return written

"""Where shards live: patterns → shard URLs, opening them, and their sample counts.

A data spec is one or more sources separated by ``::`` (open_clip's convention), each a brace
pattern and/or glob: ``/data/cc3m/{00000..00331}.tar::s3://bucket/laion/*.tar``. Local paths and
fsspec URLs (``s3://``, ``gs://``, ``file://``, ``memory://`` ...) are accepted. ``pipe:`` URLs
run a shell command, so they are refused unless the config explicitly allows them. Only a spec
the user wrote is a URL or a pipe: what a glob finds on disk is opened as a local file, whatever
it is called (a file named ``pipe:cmd #.tar`` is a file), and a remote name holding ``::``
(fsspec's chain separator) is refused.

Sample counts come from a ``sizes.json`` next to the shards (open_clip's size index, written by
``python -m fne_dist.shards``); shards it does not list are counted by reading their tar headers
(nothing is decoded). The exact-mode plan needs the counts to give every rank the same number of
batches before any sample is read.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import posixpath
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import braceexpand

from ..progress import TaskProgress
from .decode import describe_value

REPO_ROOT = Path(__file__).resolve().parents[2]
log = logging.getLogger("fne_dist.data")


class DataError(ValueError):
    """A user-caused data problem (bad path, empty or unreadable shard); one line."""


def is_url(pattern: str) -> bool:
    return "://" in pattern


def _has_magic(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


def split_sources(spec: str) -> list[str]:
    """``a::b`` → ``[a, b]`` (empty parts dropped)."""
    return [part.strip() for part in spec.split("::") if part.strip()]


def _expand_url(pattern: str) -> list[str]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(pattern)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if _has_magic(path):
        return [
            f"{protocol}://{p.lstrip('/') if protocol != 'file' else p}"
            for p in sorted(fs.glob(path))
        ]
    return [pattern] if fs.exists(path) else []


def resolve_source(pattern_spec: str, key: str, allow_pipe: bool = False) -> list[str]:
    """Shard URLs of one source. Relative local paths are tried from the working directory, then
    from the repository root, so the shipped configs work from anywhere. Raises DataError naming
    ``key`` if nothing matches."""
    if pattern_spec.startswith("pipe:"):
        if not allow_pipe:
            raise DataError(
                f"{key}: 'pipe:' shard URLs run shell commands and are refused "
                f"(set data.allow_pipe=true to allow them): {pattern_spec}"
            )
        return list(braceexpand.braceexpand(pattern_spec))
    urls: list[str] = []
    for pattern in braceexpand.braceexpand(pattern_spec):
        if is_url(pattern):
            for url in _expand_url(pattern):
                # a found object's name is data: fsspec would read '::' in it as a chain of
                # file systems (another protocol, a cache) instead of one object
                if "::" in url:
                    raise DataError(
                        f"{key}: shard {url!r} (found by {pattern!r}) has '::' in its name, "
                        "which fsspec reads as a chained URL: rename it"
                    )
                urls.append(url)
            continue
        candidates = [Path(pattern)]
        if not Path(pattern).is_absolute():
            candidates.append(REPO_ROOT / pattern)
        for candidate in candidates:
            found = sorted(glob.glob(str(candidate)))
            if found:
                urls += [local_path(path) for path in found]
                break
    if not urls:
        raise DataError(f"{key}: no shard matches {pattern_spec!r}")
    return urls


def resolve_shards(spec: str, key: str, allow_pipe: bool = False) -> list[str]:
    """Every shard of every ``::`` source of ``spec`` in order."""
    return [url for part in split_sources(spec) for url in resolve_source(part, key, allow_pipe)]


def local_path(path: str) -> str:
    """A path found on disk (a glob result) as a string that ``open_shard`` opens as a local
    file, whatever the file is called: a file *name* is data, not a spec the user wrote. A
    relative name whose first component holds a ':' would read as a scheme ("pipe:cmd #.tar"
    runs a shell command), and ':' followed by '//' as an fsspec URL; the same file is
    written "./pipe:cmd #.tar" and "dir/s3:/x" (POSIX treats repeated slashes as one)."""
    path = re.sub(r":/{2,}", ":/", path)
    if not os.path.isabs(path) and ":" in path.split("/", 1)[0]:
        path = "./" + path
    return path


def open_shard(url: str | Path) -> IO[bytes]:
    """A readable binary stream for a local path, an fsspec URL or (if allowed) a pipe. Only
    a spec the user wrote is a URL or a pipe (``resolve_source`` passes glob results through
    ``local_path``); a ``Path`` is always a local file."""
    if isinstance(url, Path):
        return open(url, "rb", buffering=1 << 20)
    if url.startswith("pipe:"):
        import webdataset as wds

        return wds.gopen(url, "rb")
    if is_url(url):
        import fsspec

        return fsspec.open(url, "rb").open()
    return open(url, "rb", buffering=1 << 20)


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/key.full.txt`` → (``dir/key``, ``full.txt``): webdataset's key/extension rule
    (the extension starts at the first dot of the file name)."""
    directory, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return posixpath.join(directory, stem) if directory else stem, ext.lower() if dot else ""


_META = re.compile(r"__[^/]*__($|/)")  # webdataset's tar reader skips these members


def sample_key(member_name: str) -> str | None:
    """The sample a tar member belongs to, as webdataset groups them; None for members its
    reader skips (``__meta__`` names, names without an extension)."""
    if _META.match(member_name) or "." not in posixpath.basename(member_name):
        return None
    return split_member_name(member_name)[0]


def count_samples(url: str | Path, strict: bool = False) -> int:
    """Samples (runs of members with one key) in a shard, read from the tar headers only.

    A truncated shard counts the samples that are there (with a warning) unless ``strict``:
    without a size index nothing says more were meant to be, and the readable part is data.
    """
    import tarfile

    n, last = 0, None
    with open_shard(url) as stream:
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as tar:
                for info in tar:
                    key = sample_key(info.name) if info.isreg() else None
                    if key is not None and key != last:
                        n, last = n + 1, key
        except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
            if strict or n == 0:
                raise
            log.warning("shard %s is truncated after %d samples (%s)", url, n, err)
    return n


MAX_SHARD_SAMPLES = 100_000_000  # a sane bound for one shard's count in a sizes.json


def warn_if_more(url: str, claimed: int, found: int) -> None:
    """A shard holding more samples than its sizes.json says was read whole: say so."""
    if found > claimed:
        log.warning(
            "shard %s holds %d samples, its sizes.json says %d: read all %d "
            "(rebuild the index with `python -m fne_dist.shards index DIR`)",
            url,
            found,
            claimed,
            found,
        )


def sample_count(value: object) -> int | None:
    """A sizes.json value as a count: an integer (not a float or boolean) in
    0..MAX_SHARD_SAMPLES; None for anything else."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 0 <= value <= MAX_SHARD_SAMPLES else None


def _parse_sizes(raw: bytes, index: str) -> dict[str, int]:
    """Shard name → count from a sizes.json's bytes; any bad value fails with one line."""
    try:
        sizes = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{index}: not a valid sizes.json ({detail})") from None
    if not isinstance(sizes, dict):
        raise DataError(
            f"{index}: not a valid sizes.json (a JSON object of shard name → sample count, "
            f"not a {type(sizes).__name__})"
        )
    for name, value in sizes.items():
        if sample_count(value) is None:
            raise DataError(
                f"{index}: shard {name[:100]!r} has sample count {describe_value(value)}: "
                f"expected an integer from 0 to {MAX_SHARD_SAMPLES}"
            )
    return sizes


def _sizes_json_for(url: str) -> dict[str, int]:
    directory = posixpath.dirname(url) if is_url(url) else str(Path(url).parent)
    index = (
        posixpath.join(directory, "sizes.json")
        if is_url(url)
        else str(Path(directory) / "sizes.json")
    )
    try:
        if is_url(index):
            import fsspec

            with fsspec.open(index, "rb") as f:
                raw = f.read()
        else:
            raw = Path(index).read_bytes()
    except (FileNotFoundError, OSError):
        return {}
    return _parse_sizes(raw, index)


@dataclass(frozen=True)
class ShardList:
    """Shard URLs with their sample counts and source index (for per-source weights)."""

    urls: tuple[str, ...]
    sizes: tuple[int, ...]
    source_of: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.sizes)


def shard_list(spec: str, key: str, allow_pipe: bool = False) -> ShardList:
    """Resolve ``spec`` and look up each shard's sample count (sizes.json, else counted)."""
    urls, sizes, source_of = [], [], []
    counted = 0
    for source, part in enumerate(split_sources(spec)):
        index_cache: dict[str, dict[str, int]] = {}
        part_urls = resolve_source(part, key, allow_pipe)
        index = TaskProgress("shard_index", f"shard index {key}", len(part_urls), "shards")
        for url in part_urls:
            index.update()
            directory = posixpath.dirname(url) if is_url(url) else str(Path(url).parent)
            if directory not in index_cache:
                index_cache[directory] = {} if url.startswith("pipe:") else _sizes_json_for(url)
            name = posixpath.basename(url) if is_url(url) else Path(url).name
            size = index_cache[directory].get(name)
            if size is None:
                if url.startswith("pipe:"):
                    raise DataError(f"{key}: pipe: shards need a sizes.json next to them ({url})")
                try:
                    size = count_samples(url)
                except Exception as err:  # a shard that cannot even be listed: name it
                    raise DataError(
                        f"{key}: cannot read shard {url}: {err}".splitlines()[0]
                    ) from None
                counted += 1
            urls.append(url)
            sizes.append(size)
            source_of.append(source)
        index.close()
    if counted:
        log.info(
            "%s: counted the samples of %d shard(s) that no sizes.json lists "
            "(write one with `python -m fne_dist.shards index DIR`)",
            key,
            counted,
        )
    if sum(sizes) == 0:
        raise DataError(f"{key}: the shards matching {spec!r} contain no samples")
    return ShardList(tuple(urls), tuple(sizes), tuple(source_of))

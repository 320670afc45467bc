"""The common shard writer: deterministic, atomic, resumable, with a size index and a summary.

Output in ``--out`` for ``--prefix P``:

* ``P-000000.tar``, ``P-000001.tar``, ... (``.tar.gz`` with gzip): at most ``shard_size``
  samples each; sample keys ``P-000000000``, ``P-000000001``, ... count across the whole
  output, one tar member ``<key>.<ext>`` per field;
* ``sizes.json``: shard file name → sample count (open_clip's format);
* ``_summary.json``: samples, pairs, shards and skipped pairs per reason;
* ``_progress.json``: the run's settings and, for every finished shard, its name, sample count,
  sha256 and the range of input items it covers.

Determinism: a shard's bytes depend only on its samples. Tar members get mtime 0, uid/gid 0,
empty user/group names and mode 0644 in the USTAR format (no PAX headers, which would carry
times); gzip gets header mtime 0, no file name and a fixed compression level.

Atomicity and resuming: a shard is written to ``NAME.tmp``, fsync-ed and renamed, then
recorded in ``_progress.json`` (also replaced atomically). Rerunning the same command keeps the
recorded shards whose sha256 still matches, deletes anything after them and goes on from the
first input item not covered, with the same keys and shard names a single run would have used,
so an interrupted-then-resumed output is byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import sys
import tarfile
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from tqdm import tqdm

from .entries import ShardError, file_sha256

FORMAT_VERSION = 1
PROGRESS_FILE = "_progress.json"
SUMMARY_FILE = "_summary.json"
SIZES_FILE = "sizes.json"
# Level 6 (zlib's default) instead of 9: images are already compressed, so 9 only costs time.
GZIP_LEVEL = 6
# No dot (webdataset cuts the key at the first dot of a member name), no slash, and short
# enough that "<prefix>-<9 digits>.img_feat.npy" fits USTAR's 100-character names.
_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class ShardOptions:
    """Where and how to write: output directory, names, shard size, compression."""

    out: Path
    prefix: str
    shard_size: int = 1000
    gzip: bool = False
    overwrite: bool = False
    progress: bool = True  # a tqdm bar on stderr


@dataclass(frozen=True)
class BuiltSample:
    """What the ``build`` callback makes of one input item.

    ``members`` are (extension, bytes) in member order, None when the item is skipped;
    ``pairs`` the image-caption pairs the sample carries; ``skipped`` pairs per reason (an
    image-layout sample may be written while some of its captions are skipped).
    """

    members: list[tuple[str, bytes]] | None
    pairs: int
    skipped: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ShardRecord:
    """One finished shard as recorded in ``_progress.json``."""

    name: str
    samples: int
    pairs: int
    sha256: str
    items: tuple[int, int]  # input items [start, end) this shard covers
    skipped: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        """The progress-file form."""
        return {
            "name": self.name,
            "samples": self.samples,
            "pairs": self.pairs,
            "sha256": self.sha256,
            "items": list(self.items),
            "skipped": dict(sorted(self.skipped.items())),
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> ShardRecord:
        """Parse the progress-file form (KeyError/TypeError/ValueError if malformed)."""
        start, end = obj["items"]
        return cls(
            name=str(obj["name"]),
            samples=int(obj["samples"]),
            pairs=int(obj["pairs"]),
            sha256=str(obj["sha256"]),
            items=(int(start), int(end)),
            skipped={str(k): int(v) for k, v in obj["skipped"].items()},
        )


@dataclass(frozen=True)
class ShardSummary:
    """What a run produced (the content of ``_summary.json``)."""

    out: str
    prefix: str
    samples: int
    pairs: int
    shards: int
    skipped: dict[str, int]
    input_items: int
    kept_shards: int  # shards found complete from an earlier, interrupted run
    settings: dict[str, Any]

    @property
    def skipped_pairs(self) -> int:
        """All skipped pairs, whatever the reason."""
        return sum(self.skipped.values())

    def to_json(self) -> dict[str, Any]:
        """The ``_summary.json`` form."""
        return {
            "out": self.out,
            "prefix": self.prefix,
            "samples": self.samples,
            "pairs": self.pairs,
            "shards": self.shards,
            "skipped": self.skipped,
            "skipped_pairs": self.skipped_pairs,
            "input_items": self.input_items,
            "kept_shards": self.kept_shards,
            "settings": self.settings,
        }


def shard_name(prefix: str, index: int, gzipped: bool) -> str:
    """``<prefix>-<6 digits>.tar`` or ``.tar.gz``."""
    return f"{prefix}-{index:06d}.tar{'.gz' if gzipped else ''}"


def sample_key(prefix: str, index: int) -> str:
    """``<prefix>-<9 digits>``: the key of the ``index``-th sample of the whole output."""
    return f"{prefix}-{index:09d}"


def check_prefix(prefix: str) -> str:
    """``prefix`` if usable in shard and key names, else a ShardError saying why."""
    if not _PREFIX_RE.match(prefix):
        raise ShardError(
            f"--prefix {prefix!r}: use 1-64 letters, digits, '_' or '-', starting with a letter "
            "or digit (no '.': webdataset cuts sample keys at the first dot)"
        )
    return prefix


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON via a temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# one shard


class _ShardFile:
    """A tar (or tar.gz) being written to ``NAME.tmp``; ``finish`` renames it into place."""

    def __init__(self, path: Path, gzipped: bool) -> None:
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self._raw: BinaryIO = self.tmp.open("wb")
        self._gz = (
            gzip.GzipFile(
                filename="", mode="wb", fileobj=self._raw, mtime=0, compresslevel=GZIP_LEVEL
            )
            if gzipped
            else None
        )
        stream = self._gz if self._gz is not None else self._raw
        # Closed by finish() or abort(): the shard stays open across many add() calls.
        self._tar = tarfile.open(  # noqa: SIM115
            fileobj=stream, mode="w", format=tarfile.USTAR_FORMAT
        )

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))

    def _close_streams(self) -> None:
        self._tar.close()
        if self._gz is not None:
            self._gz.close()

    def finish(self) -> str:
        """Close, fsync, rename into place; return the shard's sha256."""
        self._close_streams()
        self._raw.flush()
        # fsync before the rename: after a crash a shard under its final name is complete.
        os.fsync(self._raw.fileno())
        self._raw.close()
        os.replace(self.tmp, self.path)
        return file_sha256(self.path)

    def abort(self) -> None:
        """Drop the partial shard (on an error or interrupt)."""
        try:
            self._close_streams()
        finally:
            self._raw.close()
            self.tmp.unlink(missing_ok=True)


@dataclass
class _PendingShard:
    """The shard being filled: its file (opened with its first sample) and counts since
    input item ``start`` (skips before its first sample included)."""

    start: int
    samples: int = 0
    pairs: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    file: _ShardFile | None = None

    def finish(self, end: int) -> ShardRecord:
        """Close and rename the file; the record of the shard covering items [start, end)."""
        assert self.file is not None
        sha = self.file.finish()
        return ShardRecord(
            self.file.path.name,
            self.samples,
            self.pairs,
            sha,
            (self.start, end),
            dict(self.skipped),
        )


# ---------------------------------------------------------------------------------------------
# resuming


def _our_files(out: Path, prefix: str) -> list[Path]:
    """Shards (finished or .tmp) of ``prefix`` in ``out``, sorted by name."""
    pattern = re.compile(rf"^{re.escape(prefix)}-\d{{6,}}\.tar(\.gz)?(\.tmp)?$")
    return sorted(p for p in out.iterdir() if pattern.match(p.name))


def remove_outputs(out: Path, prefix: str) -> None:
    """Delete what a run with ``prefix`` writes into ``out`` (for ``--overwrite``).

    The shards of the prefix recorded in an existing progress file go too: overwriting with a
    new prefix must not leave the old shards behind for a loader's glob to find.
    """
    prefixes = {prefix}
    try:
        old = json.loads((out / PROGRESS_FILE).read_text(encoding="utf-8"))["settings"]["prefix"]
        if isinstance(old, str) and _PREFIX_RE.match(old):
            prefixes.add(old)
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no (readable) progress file: only this prefix is known
    for name in sorted(prefixes):
        for path in _our_files(out, name):
            path.unlink()
    for name in (PROGRESS_FILE, SUMMARY_FILE, SIZES_FILE):
        for path in (out / name, out / f"{name}.tmp"):
            path.unlink(missing_ok=True)


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key):
            continue
        if key == "input_sha256":
            diffs.append("the input differs (annotation file, image directory or --limit)")
        elif key.endswith("_sha256"):
            diffs.append(f"the {key.removesuffix('_sha256')} file differs")
        else:
            diffs.append(f"{key} was {old.get(key)!r}, now {new.get(key)!r}")
    return diffs


def _read_progress(path: Path) -> tuple[dict[str, Any], list[ShardRecord]]:
    try:
        progress = json.loads(path.read_text(encoding="utf-8"))
        return dict(progress["settings"]), [ShardRecord.from_json(r) for r in progress["shards"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ShardError(
            f"{path} is unreadable ({type(err).__name__}: {err}); pass --overwrite to start over"
        ) from None


def _resume_point(
    out: Path, options: ShardOptions, settings: Mapping[str, Any]
) -> list[ShardRecord]:
    """The shards of an earlier run of the same settings that are complete and unchanged.

    Anything of ``prefix`` after them (a shard renamed into place but not yet recorded, a
    ``.tmp`` left by a kill) is deleted: the resumed run writes those again, identically.
    """
    progress_path = out / PROGRESS_FILE
    ours = _our_files(out, options.prefix)
    if not progress_path.exists():
        finished = [p.name for p in ours if not p.name.endswith(".tmp")]
        if finished:
            raise ShardError(
                f"{out} already holds shards ({finished[0]}, ...) but no {PROGRESS_FILE}; "
                "pass --overwrite to replace them"
            )
        kept: list[ShardRecord] = []
    else:
        old_settings, records = _read_progress(progress_path)
        diffs = _differences(old_settings, settings)
        # Without a finished shard there is nothing to protect (e.g. a run that wrote nothing
        # because of a wrong option): start over instead of asking for --overwrite.
        if diffs and records:
            raise ShardError(
                f"{out} holds shards written with other settings ({'; '.join(diffs)}); "
                "rerun the original command to resume it, or pass --overwrite to start over"
            )
        kept = []
        next_item = 0
        for index, record in enumerate(records):
            path = out / record.name
            if (
                record.name != shard_name(options.prefix, index, options.gzip)
                or record.items[0] != next_item
                or not path.is_file()
                or file_sha256(path) != record.sha256
            ):
                break
            kept.append(record)
            next_item = record.items[1]
    kept_names = {record.name for record in kept}
    for path in ours:
        if path.name not in kept_names:
            path.unlink()
    return kept


# ---------------------------------------------------------------------------------------------
# the run


def write_shards(
    total_items: int,
    build: Callable[[int], BuiltSample],
    options: ShardOptions,
    settings: Mapping[str, Any],
) -> ShardSummary:
    """Write the samples that ``build(0..total_items-1)`` makes into shards in ``options.out``.

    ``settings`` (JSON-able) identify the run: resuming requires equal settings, so they must
    cover everything that changes the output (the caller adds a fingerprint of the input).
    Items are built in order; a shard is closed as soon as it holds ``shard_size`` samples.
    """
    out = options.out
    run_settings = _prepare_output(options, settings)
    records = _resume_point(out, options, run_settings)
    kept_shards = len(records)

    def save_progress(complete: bool) -> None:
        shards = [r.to_json() for r in records]
        state = {"settings": run_settings, "complete": complete, "shards": shards}
        write_json_atomic(out / PROGRESS_FILE, state)

    # A stale sizes.json would describe shards that are about to change; it returns at the end.
    (out / SIZES_FILE).unlink(missing_ok=True)
    save_progress(complete=False)
    skipped = _write_items(total_items, build, options, records, save_progress)
    for record in records:
        skipped.update(record.skipped)
    summary = ShardSummary(
        out=str(out),
        prefix=options.prefix,
        samples=sum(r.samples for r in records),
        pairs=sum(r.pairs for r in records),
        shards=len(records),
        skipped={k: v for k, v in sorted(skipped.items()) if v},
        input_items=total_items,
        kept_shards=kept_shards,
        settings=run_settings,
    )
    write_json_atomic(out / SIZES_FILE, {r.name: r.samples for r in records})
    write_json_atomic(out / SUMMARY_FILE, summary.to_json())
    save_progress(complete=True)
    return summary


def _prepare_output(options: ShardOptions, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Check the options, create ``--out`` (emptied with ``--overwrite``) and return the run's
    full settings: the caller's plus every option that changes the output."""
    check_prefix(options.prefix)
    if options.shard_size < 1:
        raise ShardError(f"--shard-size must be at least 1, got {options.shard_size}")
    out = options.out
    if out.exists() and not out.is_dir():
        raise ShardError(f"--out: {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    if options.overwrite:
        remove_outputs(out, options.prefix)
    return {
        "format_version": FORMAT_VERSION,
        **settings,
        "prefix": options.prefix,
        "shard_size": options.shard_size,
        "gzip": options.gzip,
    }


def _write_items(
    total_items: int,
    build: Callable[[int], BuiltSample],
    options: ShardOptions,
    records: list[ShardRecord],
    save_progress: Callable[[bool], None],
) -> Counter:
    """Build items from where ``records`` end and append each finished shard to ``records``
    (saving progress after each); returns what the items after the last shard skipped."""
    start = records[-1].items[1] if records else 0
    sample_index = sum(r.samples for r in records)
    pending = _PendingShard(start)
    bar = tqdm(
        total=total_items,
        initial=start,
        desc=options.prefix,
        unit="item",
        file=sys.stderr,
        disable=not options.progress,
        dynamic_ncols=True,
    )
    try:
        for item in range(start, total_items):
            built = build(item)
            pending.skipped.update(built.skipped)
            bar.update(1)
            if built.members is None:
                continue
            if pending.file is None:
                name = shard_name(options.prefix, len(records), options.gzip)
                pending.file = _ShardFile(options.out / name, options.gzip)
            key = sample_key(options.prefix, sample_index)
            for ext, data in built.members:
                pending.file.add(f"{key}.{ext}", data)
            sample_index += 1
            pending.samples += 1
            pending.pairs += built.pairs
            if pending.samples == options.shard_size:
                records.append(pending.finish(end=item + 1))
                save_progress(False)
                pending = _PendingShard(item + 1)
        if pending.file is not None:
            records.append(pending.finish(end=total_items))
            save_progress(False)
            pending = _PendingShard(total_items)
    except BaseException:
        # Also on KeyboardInterrupt: no partial shard survives; the progress file already
        # records every finished one, so the same command resumes from there.
        if pending.file is not None:
            pending.file.abort()
        raise
    finally:
        bar.close()
    return Counter(pending.skipped)  # items after the last shard skip, too


def format_summary(summary: ShardSummary) -> str:
    """Two human-readable lines: what was written, and what was skipped why."""
    resumed = f" ({summary.kept_shards} kept from an earlier run)" if summary.kept_shards else ""
    lines = [
        f"{summary.out}: wrote {summary.pairs} pairs in {summary.samples} samples, "
        f"{summary.shards} shard{'' if summary.shards == 1 else 's'}{resumed}"
    ]
    if summary.skipped:
        reasons = ", ".join(f"{reason} {n}" for reason, n in summary.skipped.items())
        lines.append(f"{summary.out}: skipped {summary.skipped_pairs} pairs: {reasons}")
    else:
        lines.append(f"{summary.out}: skipped 0 pairs")
    return "\n".join(lines)

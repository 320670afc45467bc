"""Read the annotation files users have (JSON, JSON Lines, CSV/TSV) with one-line errors.

Every failure (missing file, bad encoding, bad syntax, missing column) becomes a
:class:`~.entries.ShardError` naming the file and, where it helps, the line, so the CLI can exit
with status 2 and one ``error:`` line instead of a traceback.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .entries import ShardError


def require_file(path: Path, what: str) -> Path:
    """``path`` if it is a file, else a ShardError naming ``what`` (e.g. "--captions")."""
    if not path.is_file():
        raise ShardError(f"{what}: no such file: {path}")
    return path


def require_dir(path: Path, what: str) -> Path:
    """``path`` if it is a directory, else a ShardError naming ``what`` (e.g. "--images")."""
    if not path.is_dir():
        raise ShardError(f"{what}: no such directory: {path}")
    return path


def read_json(path: Path, what: str) -> Any:
    """The parsed JSON document in ``path``."""
    require_file(path, what)
    try:
        with path.open(encoding="utf-8-sig") as f:
            return json.load(f)
    except UnicodeDecodeError as err:
        raise ShardError(f"{what}: {path} is not UTF-8 text ({err.reason})") from None
    except json.JSONDecodeError as err:
        raise ShardError(
            f"{what}: {path} is not valid JSON (line {err.lineno}: {err.msg})"
        ) from None


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's dict, refusing a key given twice (``json`` keeps the last silently)."""
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


def read_jsonl(path: Path, what: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of a JSON Lines file."""
    require_file(path, what)
    try:
        with path.open(encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line, object_pairs_hook=_unique_keys)
                except _DuplicateKey as err:
                    raise ShardError(
                        f"{what}: {path} line {lineno} has the key {err.key!r} more than once"
                    ) from None
                except json.JSONDecodeError as err:
                    raise ShardError(
                        f"{what}: {path} line {lineno} is not valid JSON ({err.msg})"
                    ) from None
                if not isinstance(row, dict):
                    raise ShardError(f"{what}: {path} line {lineno} is not a JSON object")
                yield lineno, row
    except UnicodeDecodeError as err:
        raise ShardError(f"{what}: {path} is not UTF-8 text ({err.reason})") from None


def read_csv(
    path: Path, what: str, required: list[str], delimiter: str | None = None
) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) for every row of a CSV/TSV file with a header line.

    The delimiter defaults to a tab for ``.tsv`` files and a comma otherwise. Columns named in
    ``required`` must be in the header.
    """
    require_file(path, what)
    if delimiter is None:
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            header = reader.fieldnames or []
            # DictReader keeps the last of two equal column names: which caption (or image,
            # or id) is meant is the user's to say, not an accident of column order
            twice = sorted({name for name in header if name and header.count(name) > 1})
            if twice:
                raise ShardError(
                    f"{what}: {path} has the column {twice[0]!r} more than once; rename or "
                    "drop the one not meant"
                )
            for column in required:
                if column not in header:
                    raise ShardError(
                        f"{what}: {path} has no column {column!r} (columns: {', '.join(header)})"
                    )
            for row in reader:
                yield reader.line_num, row
    except UnicodeDecodeError as err:
        raise ShardError(f"{what}: {path} is not UTF-8 text ({err.reason})") from None
    except csv.Error as err:
        raise ShardError(f"{what}: {path} is not valid CSV ({err})") from None


def read_rows(
    path: Path, what: str, required: list[str], fmt: str | None = None, delimiter: str | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows of a CSV/TSV or JSON Lines file, chosen by ``fmt`` or else by the file suffix.

    For JSON Lines the ``required`` keys are not checked here: a row without one is reported by
    the caller with its line number.
    """
    if fmt is None:
        fmt = "jsonl" if path.suffix.lower() in (".jsonl", ".ndjson") else "csv"
    if fmt == "jsonl":
        return read_jsonl(path, what)
    if fmt == "csv":
        return read_csv(path, what, required, delimiter)
    raise ShardError(f"{what}: unknown format {fmt!r} (csv or jsonl)")

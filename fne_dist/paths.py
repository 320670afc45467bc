"""Launch-time checks of the places a run writes to: found before any worker starts, as one
line naming the setting, instead of a traceback at the first write (minutes or hours later).

The probe creates an anonymous temporary file (``O_TMPFILE`` where the file system has it,
else a file unlinked at once), so it leaves nothing behind, even when it fails.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from .config import ConfigError


def check_writable_dir(directory: Path, setting: str) -> None:
    """Refuse (``ConfigError``, one line starting with ``setting``, e.g. ``run.output_dir=x``)
    a directory that cannot be created or written to: a file in its place or above it, a
    dangling symlink or symlink loop, a read-only mount, missing permissions."""
    base = directory
    while not base.exists():  # what `mkdir -p` would create the directory in
        if base.is_symlink():
            raise ConfigError(f"{setting}: {base} is a dangling symlink or a symlink loop")
        if base.parent == base:
            break
        base = base.parent
    if not base.is_dir():
        raise ConfigError(f"{setting}: {base} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as err:
        raise ConfigError(f"{setting}: cannot write in {base} ({err.strerror or err})") from None


def check_writable_file(path: Path, setting: str) -> None:
    """Refuse a file path that is a directory or whose directory cannot be written to (the
    file is replaced through a temporary file next to it)."""
    if path.is_dir():
        raise ConfigError(f"{setting}: is a directory, not a file")
    check_writable_dir(path.parent, setting)

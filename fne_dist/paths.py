"""Launch-time checks of the places a run writes to: found before any worker starts, as one
line naming the setting, instead of a traceback at the first write (minutes or hours later).

The probe creates nothing that stays: it writes an anonymous temporary file (``O_TMPFILE``
where the file system has it, else a file unlinked at once) in the nearest existing directory,
so it leaves nothing behind, even when it fails, and creates no directory at launch.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from .config import ConfigError


def writable_dir_problem(directory: Path) -> str | None:
    """Why ``directory`` cannot be created (as ``mkdir -p`` would) and written into, or None:
    a file in its place or above it, a dangling symlink or symlink loop, a read-only mount,
    missing permissions. Probed by writing, since permission bits do not tell (root, ACLs,
    read-only mounts)."""
    base = directory
    while True:  # the nearest existing directory, where `mkdir -p` would start
        try:
            mode = os.stat(base).st_mode
        except (FileNotFoundError, NotADirectoryError):  # missing, or a file above it
            if os.path.islink(base):
                return f"{base} is a symlink to nothing"
            if base.parent == base:
                return f"{base} does not exist"
            base = base.parent
            continue
        except OSError as err:  # ELOOP: a symlink loop; EACCES: a parent not searchable
            return f"{base}: {err.strerror or err}"
        break
    if not stat.S_ISDIR(mode):
        if base == directory:
            return "a file is in its place, not a directory"
        return f"{base} is not a directory"
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as err:
        return f"cannot write in {base} ({err.strerror or err})"
    return None


def check_writable_dir(directory: Path, setting: str) -> None:
    """Refuse (``ConfigError``, one line starting with ``setting``, e.g. ``run.output_dir=x``)
    a directory that cannot be created or written to (``writable_dir_problem``)."""
    problem = writable_dir_problem(directory)
    if problem is not None:
        raise ConfigError(f"{setting}: {problem}")


def check_writable_file(path: Path, setting: str) -> None:
    """Refuse a file path that is a directory or whose directory cannot be written to (the
    file is replaced through a temporary file next to it)."""
    if path.is_dir():
        raise ConfigError(f"{setting}: is a directory, not a file")
    check_writable_dir(path.parent, setting)

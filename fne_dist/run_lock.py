"""The run directory's owner: one live run per run directory.

Rank 0 takes an exclusive ``flock`` on ``<run dir>/.run.lock`` before anything writes there and
holds it until the process ends; the file says who holds it (host, pid, start time) so that a
second run fails with one line naming the owner. The kernel drops the lock when its holder dies
(kill -9, OOM, node reboot), so a lock left behind is stale by construction: the next run takes
it over and warns, naming the dead owner. The file is emptied, never deleted, on release
(deleting a flock'ed file lets two processes lock two different inodes of the same name).

(Which run may resume a directory is ``run_identity``'s policy; this module only makes sure
that at most one process writes a run directory at a time.)
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from . import distributed as dist_ops
from .config import ConfigError

LOCK_NAME = ".run.lock"
log = logging.getLogger("fne_dist")


class RunDirBusy(ConfigError):
    """Another live run owns the run directory (one line, a user error)."""


def _owner() -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    return f"host={socket.gethostname()} pid={os.getpid()} started={started}"


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096).decode(errors="replace").strip()


def _pid_gone(holder: str) -> bool:
    """Whether the recorded holder is a process of this host that no longer exists (then a
    forked child of it, e.g. a data-loader worker, still holds the inherited lock)."""
    fields = dict(f.split("=", 1) for f in holder.split() if "=" in f)
    if fields.get("host") != socket.gethostname() or not fields.get("pid", "").isdigit():
        return False
    try:
        os.kill(int(fields["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class RunLock:
    """An exclusive lock on one run directory, held by this process."""

    def __init__(self, run_dir: Path, warn: Callable[[str], None] = log.warning) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / LOCK_NAME
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read(self.fd) or "owner unknown"
            os.close(self.fd)
            gone = " (that process is gone: a child of it still holds the lock)"
            raise RunDirBusy(
                f"run directory {run_dir} is in use by another run ({holder}"
                f"{gone if _pid_gone(holder) else ''}): wait for it to end or stop it, "
                "or pass another run.name"
            ) from None
        previous = _read(self.fd)
        if previous:  # emptied on release: its holder ended without releasing it
            warn(f"warning: took over the stale lock {self.path} of a run that died ({previous})")
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{_owner()}\n".encode(), 0)

    def release(self) -> None:
        """Empty the file and unlock (explicitly: forked children share the lock)."""
        if self.fd < 0:
            return
        os.ftruncate(self.fd, 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = -1


@contextlib.contextmanager
def owned(run_dir: Path, rank: int) -> Iterator[RunLock | None]:
    """Rank 0 owns ``run_dir`` for the block; every rank fails together (one all-reduce of
    an int) when another run holds it, so no rank waits in a collective for a rank 0 that
    has gone."""
    lock, error = None, None
    if rank == 0:
        try:
            lock = RunLock(run_dir)
        except RunDirBusy as err:
            error = err
    if dist_ops.all_min_int(0 if error else 1) == 0:
        raise error or RunDirBusy(f"run directory {run_dir} is in use by another run (see rank 0)")
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()

"""The owner of a run's directories: one live run per run directory and per checkpoint
directory.

Rank 0 locks the run directory and the (local) checkpoint.dir before anything writes there and
holds both until the process ends: two runs of different names sharing one checkpoint.dir would
otherwise each replace the other's ``step-N``. Each lock is an exclusive ``flock`` on the
directory itself (a directory in use cannot be swapped for another inode under the same name
the way a file can: deleting a lock file would let a second run lock a new file of the same
name) and on ``<dir>/.run.lock``, which says who holds it (host, pid, start time, run name) so
that a second run fails with one line naming the owner; where a filesystem cannot lock a
directory (some NFS mounts), the file's lock alone stands. The kernel drops the locks when their
holder dies (kill -9, OOM, node reboot), so a lock left behind is stale by construction: the
next run takes it over and warns, naming the dead owner. The file is emptied, never deleted, on
release.

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


def _owner(run_name: str | None) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    owner = f"host={socket.gethostname()} pid={os.getpid()} started={started}"
    return owner + (f" run.name={run_name}" if run_name else "")


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


def _lock_directory(directory: Path) -> int:
    """An fd of ``directory`` holding an exclusive flock on it; -1 where the filesystem cannot
    lock a directory. Raises BlockingIOError when another process holds it."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    except OSError:  # ENOLCK, EBADF: no directory locks here; the lock file still stands
        os.close(fd)
        return -1
    return fd


class RunLock:
    """An exclusive lock on one run directory (or checkpoint directory), held by this process.
    ``what`` names the directory in the busy message, ``way_out`` ends it."""

    def __init__(
        self,
        run_dir: Path,
        warn: Callable[[str], None] = log.warning,
        *,
        what: str = "run directory",
        way_out: str = "or pass another run.name",
        run_name: str | None = None,
    ) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / LOCK_NAME
        self.dir_fd = -1
        try:
            self.dir_fd = _lock_directory(run_dir)
            busy = False
        except BlockingIOError:
            busy = True
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        if not busy:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                busy = True
        if busy:
            holder = _read(self.fd) or "owner unknown"
            os.close(self.fd)
            if self.dir_fd >= 0:
                os.close(self.dir_fd)
            gone = " (that process is gone: a child of it still holds the lock)"
            raise RunDirBusy(
                f"{what} {run_dir} is in use by another run ({holder}"
                f"{gone if _pid_gone(holder) else ''}): wait for it to end or stop it, "
                f"{way_out}"
            ) from None
        previous = _read(self.fd)
        if previous:  # emptied on release: its holder ended without releasing it
            warn(f"warning: took over the stale lock {self.path} of a run that died ({previous})")
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{_owner(run_name)}\n".encode(), 0)

    def release(self) -> None:
        """Empty the file and unlock (explicitly: forked children share the locks)."""
        if self.fd < 0:
            return
        os.ftruncate(self.fd, 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = -1
        if self.dir_fd >= 0:
            fcntl.flock(self.dir_fd, fcntl.LOCK_UN)
            os.close(self.dir_fd)
            self.dir_fd = -1


def _same_dir(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one directory (locked once: a second lock of this process
    on it would find it busy)."""
    return a.exists() and b.exists() and os.path.samefile(a, b)


@contextlib.contextmanager
def owned(
    run_dir: Path, rank: int, checkpoint_dir: Path | None = None, run_name: str | None = None
) -> Iterator[list[RunLock]]:
    """Rank 0 owns ``run_dir`` and ``checkpoint_dir`` (a local checkpoint.dir; None for a URL)
    for the block; every rank fails together (one all-reduce of an int) when another run holds
    either, so no rank waits in a collective for a rank 0 that has gone."""
    locks: list[RunLock] = []
    error = None
    if rank == 0:
        try:
            locks.append(RunLock(run_dir, run_name=run_name))
            if checkpoint_dir is not None and not _same_dir(checkpoint_dir, run_dir):
                locks.append(
                    RunLock(
                        checkpoint_dir,
                        what="checkpoint.dir",
                        way_out="or pass another checkpoint.dir (one checkpoint.dir per run)",
                        run_name=run_name,
                    )
                )
        except RunDirBusy as err:
            error = err
            for lock in locks:
                lock.release()
            locks = []
    if dist_ops.all_min_int(0 if error else 1) == 0:
        raise error or RunDirBusy(f"run directory {run_dir} is in use by another run (see rank 0)")
    try:
        yield locks
    finally:
        for lock in reversed(locks):
            lock.release()

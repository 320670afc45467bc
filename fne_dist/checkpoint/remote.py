"""checkpoint.dir as an fsspec URL (s3://, gs://, file://, ...): checkpoints are written
locally, every rank uploads its part, rank 0 uploads meta.json last (object stores cannot
rename: a checkpoint without meta.json is incomplete and skipped), and they are downloaded
again to resume.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..progress import TaskProgress
from .format import META, CheckpointError
from .validation import newest_valid


def is_url(root: str | Path) -> bool:
    return "://" in str(root)


def _fs(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url)


def remote_path(root_url: str, name: str) -> tuple[Any, str]:
    fs, root = _fs(root_url)
    return fs, f"{root.rstrip('/')}/{name}"


def upload_files(local: Path, names: list[str], root_url: str) -> None:
    """Copy ``names`` (relative to the checkpoint directory ``local``, named step-N or
    step-N.tmp) to ``root_url``/step-N: one rank's part of a checkpoint."""
    fs, target = remote_path(root_url, local.name.removesuffix(".tmp"))
    with TaskProgress("checkpoint_upload", f"upload {local.name}", len(names), "files") as bar:
        for name in names:
            remote = f"{target}/{Path(name).as_posix()}"
            fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(str(local / name), remote)
            bar.update()


def publish_meta(local: Path, root_url: str, keep_last: int) -> str:
    """meta.json last (every rank's part is up), then prune the oldest remote checkpoints."""
    fs, target = remote_path(root_url, local.name)
    fs.makedirs(target, exist_ok=True)
    fs.put_file(str(local / META), f"{target}/{META}")
    if keep_last > 0:
        for old in remote_checkpoints(root_url)[:-keep_last]:
            fs.rm(remote_path(root_url, old)[1], recursive=True)
    return target


def fetch_missing(local: Path, root_url: str) -> list[str]:
    """Complete a local copy of a finished checkpoint (``local``, with meta.json) from
    ``root_url``: with node-local scratch directories, rank 0's copy lacks the files only other
    nodes wrote (they uploaded them). Ray registers rank 0's copy as the run's checkpoint, so
    it must hold every rank's part. Returns the names fetched."""
    files = json.loads((local / META).read_text())["files"]
    missing = [name for name in files if not (local / name).is_file()]
    fs, remote = remote_path(root_url, local.name)
    for name in missing:
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(f"{remote}/{Path(name).as_posix()}", str(local / name))
    return missing


def remote_checkpoints(root_url: str) -> list[str]:
    """Names of the step-N directories under ``root_url``, oldest first."""
    fs, root = _fs(root_url)
    if not fs.exists(root):
        return []
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    return sorted(n for n in names if n.startswith("step-") and not n.endswith(".tmp"))


def download(root_url: str, name: str, local_root: Path) -> Path:
    """Fetch ``root_url``/``name`` into ``local_root``/``name`` (replacing an older copy)."""
    fs, root = _fs(root_url)
    src = f"{root.rstrip('/')}/{name}"
    dest = local_root / name
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for remote in fs.find(src):  # paths in the filesystem's own form, like ``src``
        rel = remote[len(src) :].lstrip("/")
        # an object name in the store is data: "step-8/../../.bashrc" must not be written
        # outside this copy (validate() checks meta.json's names only after the download)
        if ".." in Path(rel).parts:
            raise CheckpointError(f"{root_url}: object {remote!r} lies outside {name}: refused")
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(remote, str(dest / rel))
    return dest


def find_resumable_remote(
    root_url: str, local_root: Path, warn, run_id: str | None = None
) -> tuple[Path, dict[str, Any]]:
    """Like ``find_resumable('latest')`` for a URL: the newest valid checkpoint, downloaded
    (one at a time, newest first, until one validates)."""
    names = reversed(remote_checkpoints(root_url))
    found = newest_valid((download(root_url, n, local_root) for n in names), warn, run_id)
    if found is None:
        raise CheckpointError(f"checkpoint.resume=latest: no valid checkpoint under {root_url}")
    return found

"""Which checkpoints are usable: the list under checkpoint.dir, a checkpoint's meta.json and
hashes checked before anything is loaded, the newest valid one to resume from, and the memory's
shape read from its header.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .format import FORMAT, META, CheckpointError, sha256_of


def list_checkpoints(root: Path) -> list[Path]:
    """Complete-looking checkpoint directories, oldest first (by step)."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")]
    return sorted(found, key=lambda p: p.name)


def _files_table_error(files: Any) -> str | None:
    """Why meta.json's ``files`` is not a table of relative name → {size: int, sha256: str}
    (None if it is): a meta.json of another shape is an invalid checkpoint, not a KeyError."""
    if not isinstance(files, dict):
        return "no 'files' table"
    for name, info in files.items():
        if not isinstance(info, dict) or not isinstance(info.get("size"), int):
            return f"'files' entry {name[:80]!r} has no integer size"
        if not isinstance(info.get("sha256"), str):
            return f"'files' entry {name[:80]!r} has no sha256"
        if Path(name).is_absolute() or ".." in Path(name).parts:
            return f"'files' entry {name[:80]!r} lies outside the checkpoint"
    return None


def validate(directory: Path) -> dict[str, Any]:
    """meta.json, then every listed file's size and sha256; returns the meta or raises."""
    try:
        meta = json.loads((directory / META).read_text())
    except (OSError, ValueError, RecursionError) as err:
        raise CheckpointError(f"{directory}: no readable {META} ({err})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{directory}: {META} is not a JSON object")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{directory}: checkpoint format {meta.get('format')}, need {FORMAT}")
    problem = _files_table_error(meta.get("files"))
    if problem is not None:
        raise CheckpointError(f"{directory}: {META} is malformed ({problem})")
    world = meta.get("world_size")
    for r in range(world if isinstance(world, int) else 0):  # every rank's part, or invalid
        for name in (f"rank-{r:05d}.json", f"rank-{r:05d}.safetensors"):
            if name not in meta["files"]:
                raise CheckpointError(
                    f"{directory}: incomplete: {META} lists no {name} (world size {world})"
                )
    shards = meta.get("memory_shards")
    for r in range(shards if isinstance(shards, int) else 0):  # a sharded memory: every shard
        if memory_shard_file(r) not in meta["files"]:
            raise CheckpointError(
                f"{directory}: incomplete: {META} lists no {memory_shard_file(r)} (the memory "
                f"is sharded over {shards} ranks)"
            )
    for name, info in meta["files"].items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{directory}: {name} is missing")
        if path.stat().st_size != info["size"]:
            raise CheckpointError(f"{directory}: {name} is truncated or changed (size)")
        if sha256_of(path) != info["sha256"]:
            raise CheckpointError(f"{directory}: {name} is corrupt (sha256 mismatch)")
    return meta


def newest_valid(paths, warn, run_id: str | None) -> tuple[Path, dict[str, Any]] | None:
    """The first of ``paths`` (newest first, possibly fetched lazily) that validates and, if
    ``run_id`` is given, was written by that run; a warning for each invalid one."""
    for path in paths:
        try:
            meta = validate(path)
        except CheckpointError as err:
            warn(f"warning: skipping invalid checkpoint: {err}")
            continue
        if run_id is None or meta.get("run_id") == run_id:
            return path, meta
    return None


def find_resumable(
    spec: str, root: Path, warn, run_id: str | None = None
) -> tuple[Path, dict[str, Any]]:
    """``latest`` → the newest valid checkpoint under ``root`` (warning about each invalid
    newer one; only those of ``run_id`` if given); a path → that checkpoint, which must be
    valid."""
    if spec != "latest":
        path = Path(spec)
        return path, validate(path)
    candidates = list_checkpoints(root)
    found = newest_valid(reversed(candidates), warn, run_id)
    if found is None:
        raise CheckpointError(
            f"checkpoint.resume=latest: no valid checkpoint under {root}"
            + (f" ({len(candidates)} invalid)" if candidates else "")
        )
    return found


def memory_shard_file(rank: int) -> str:
    """The file holding rank ``rank``'s slots of a sharded memory."""
    return f"memory-rank-{rank:05d}.safetensors"


def _memory_files(directory: Path, meta: dict[str, Any]) -> list[tuple[Path, int, int]]:
    """(file, first slot, end slot) of every file holding the memory: the whole memory, or
    one shard per rank (each records its slot range)."""
    shards = meta.get("memory_shards")
    if not isinstance(shards, int):
        path = directory / "memory.safetensors"
        return [(path, 0, _rows_of(path))]
    out = []
    for r in range(shards):
        path = directory / memory_shard_file(r)
        try:
            with safe_open(str(path), framework="pt") as f:
                lo, hi, _ = (int(v) for v in f.get_tensor("shard").tolist())
        except (OSError, SafetensorError, KeyError, ValueError) as err:
            raise CheckpointError(f"{path}: no readable memory shard ({err})") from None
        out.append((path, lo, hi))
    return out


def _rows_of(path: Path) -> int:
    try:
        with safe_open(str(path), framework="pt") as f:
            return int(f.get_slice("img").get_shape()[0])
    except (OSError, SafetensorError, KeyError) as err:  # validate() checked hashes, not names
        raise CheckpointError(f"{path}: no readable memory embeddings ({err})") from None


def memory_state(directory: Path, meta: dict[str, Any], shard: Any) -> dict[str, torch.Tensor]:
    """The memory state of slots [shard.lo, shard.hi), read from the files that hold them (the
    whole memory's, or the shards': the rows of each that overlap, nothing more), with the
    ring pointer. A sharded run resumes a whole-memory checkpoint and back."""
    parts: dict[str, list[torch.Tensor]] = {}
    ptr_writes = None
    for path, lo, hi in _memory_files(directory, meta):
        a = min(max(lo, shard.lo), hi)
        b = max(a, min(hi, shard.hi))  # an empty overlap reads an empty slice of the shape
        with safe_open(str(path), framework="pt") as f:
            ptr_writes = f.get_tensor("ptr_writes")
            for key in ("img", "txt", "ids", "groups", "seq"):
                parts.setdefault(key, []).append(f.get_slice(key)[a - lo : b - lo])
    state = {k: torch.cat(v) for k, v in parts.items()}
    assert ptr_writes is not None
    state["ptr_writes"] = ptr_writes
    return state


def check_memory_shape(
    directory: Path, size: int, dim: int, meta: dict[str, Any] | None = None
) -> None:
    """The checkpoint's memory is ``size``×``dim`` (memory.size × model.embed_dim), else one
    CheckpointError naming the setting: read from the files' headers, before anything loads."""
    files = _memory_files(directory, meta or {})
    path = files[0][0]
    try:
        with safe_open(str(path), framework="pt") as f:
            saved = (max(hi for _, _, hi in files), int(f.get_slice("img").get_shape()[1]))
    except (OSError, SafetensorError, KeyError) as err:  # validate() checked hashes, not names
        raise CheckpointError(f"{path}: no readable memory embeddings ({err})") from None
    if len(saved) != 2:
        raise CheckpointError(f"{path}: memory embeddings of shape {saved}, not 2-D")
    for name, old, new in (("memory.size", saved[0], size), ("model.embed_dim", saved[1], dim)):
        if old == new:
            continue
        raise CheckpointError(
            f"checkpoint {directory} was written with {name}={old}, this run has {name}={new}: "
            f"resume with the same setting (the memory and the weights have that shape), or "
            f"export its weights (python -m fne_dist.export) and start a new run from them"
        )

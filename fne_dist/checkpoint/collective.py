"""A run's checkpoint, written by every rank together and restored on every rank.

Atomicity: every rank writes into ``step-N.tmp/``; after a barrier every rank lists what it
sees, the files are shared out (each to one rank that sees it) and hashed, the hashes are
gathered (JSON over the process group), and rank 0 writes meta.json, listing every rank's files,
and renames the directory into place. A failed write on any rank is agreed on by every rank
(one line each, the partial directory removed, earlier checkpoints untouched).
"""

from __future__ import annotations

import json
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..distributed import all_gather_json
from ..distributed.launch import rank_env
from ..engine import full_weights, partitioned_optimizer
from .elastic import (
    check_elastic,
    elastic_rank_state,
    load_whole_optimizer,
    save_whole_optimizer,
    whole_optimizer,
)
from .format import (
    ENGINE_TAG,
    FORMAT,
    META,
    CheckpointError,
    RankState,
    data_files,
    hash_files,
    one_line,
    read_rank_files,
    save_tensors,
    step_dir,
    write_error,
    write_rank_files,
)
from .pickle_safety import check_engine_files_safe
from .remote import publish_meta, remote_path, upload_files
from .validation import check_memory_shape, list_checkpoints, memory_shard_file, memory_state


@dataclass
class Parts:
    """The run's stateful objects a checkpoint saves and restores besides the per-rank state."""

    engine: Any  # DeepSpeed's engine or the plain-DDP twin
    momentum: torch.nn.Module
    memory: Any  # MomentumMemory
    stats: Any  # SimilarityStats


@dataclass
class Target:
    """Where and how this run writes checkpoints (the same on every rank but the ranks)."""

    root: Path  # written here (node-local with a URL checkpoint.dir: uploaded from here)
    config_yaml: str
    layout: dict[str, Any]  # world size, loader workers, batch size, ...: must match on resume
    run_id: str | None
    keep_last: int  # of checkpoint.dir (a URL's local scratch copy keeps only the newest)
    rank: int
    barrier: Callable[[], None]
    url: str | None = None  # a URL checkpoint.dir: every rank uploads its part, meta.json last
    data: dict[str, Any] | None = None  # the training shards' identity (resume compares it)
    deepspeed: dict[str, Any] | None = None  # the DeepSpeed settings the engine state needs
    gather: Callable[[Any], list[Any]] = field(default=all_gather_json)  # every rank's JSON
    local_rank: int = field(default_factory=lambda: rank_env().local_rank)


def assign_files(listings: list[list[str]]) -> list[list[str]]:
    """Split the hashing (and uploading) among ranks: ``listings[r]`` are the files rank r
    sees; every file goes to exactly one rank that sees it, spread round-robin over those.
    A shared directory spreads the work; node-local directories give each file to a rank of
    the node that wrote it."""
    seen_by: dict[str, list[int]] = {}
    for r, names in enumerate(listings):
        for name in names:
            seen_by.setdefault(name, []).append(r)
    mine: list[list[str]] = [[] for _ in listings]
    for i, name in enumerate(sorted(seen_by)):
        owners = seen_by[name]
        mine[owners[i % len(owners)]].append(name)
    return mine


def finalize(tmp: Path, final: Path, meta: dict[str, Any], keep_last: int, files=None) -> None:
    """Rank 0, after every rank has written: write meta.json last (with ``files``, every
    rank's hashes; hashed here when not given), rename into place, drop the oldest
    checkpoints beyond ``keep_last``."""
    if files is None:
        files = hash_files(tmp, [str(p.relative_to(tmp)) for p in data_files(tmp)])
    table = dict(sorted(files.items()))
    (tmp / META).write_text(json.dumps({"format": FORMAT, **meta, "files": table}, indent=1))
    if final.exists():  # a previous attempt at the same step (after a restart)
        shutil.rmtree(final)
    tmp.rename(final)
    if keep_last > 0:
        for old in list_checkpoints(final.parent)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def _write_parts(target: Target, parts: Parts, state: RankState, tmp: Path) -> None:
    """Every rank writes its files into ``tmp`` (on its own node when not shared)."""
    weights = full_weights(parts.engine)  # a collective under ZeRO-3: before any rank writes
    whole = whole_optimizer(parts.engine)  # collectives under ZeRO 1-3 (None otherwise)
    if target.local_rank == 0:  # one rank per node: a stale attempt on a node-local disk too
        shutil.rmtree(tmp, ignore_errors=True)
    if target.rank == 0 and target.url is not None:  # an earlier attempt's remote step-N
        fs, remote = remote_path(target.url, f"{tmp.name.removesuffix('.tmp')}/{META}")
        if fs.exists(remote):
            fs.rm(remote)
    target.barrier()
    tmp.mkdir(parents=True, exist_ok=True)
    parts.engine.save_checkpoint(str(tmp), tag=ENGINE_TAG, save_latest=False)  # collective
    if getattr(parts.memory, "sharded", False):  # every rank its own slots
        save_tensors(tmp, memory_shard_file(target.rank), parts.memory.state_dict())
    if target.rank == 0:
        save_tensors(tmp, "momentum.safetensors", parts.momentum.state_dict())
        if not getattr(parts.memory, "sharded", False):
            save_tensors(tmp, "memory.safetensors", parts.memory.state_dict())
        save_tensors(tmp, "stats.safetensors", parts.stats.state_dict())
        save_tensors(tmp, "model.safetensors", weights)  # for export: no DeepSpeed needed
        if whole is not None:  # for a resume on another world size
            save_whole_optimizer(tmp, whole)
        (tmp / "config.yaml").write_text(target.config_yaml)
    write_rank_files(tmp, target.rank, state)


def _hash_and_upload(target: Target, tmp: Path) -> dict[str, dict[str, Any]]:
    """After every rank wrote: each rank hashes (and, to a URL, uploads) its share of the
    files it can see; rank 0 gets every rank's hashes, so meta.json covers files that only
    another node holds. Returns the merged table (on every rank)."""
    target.barrier()
    visible = [str(p.relative_to(tmp)) for p in data_files(tmp)]
    mine = assign_files(target.gather(visible))[target.rank]
    hashes = hash_files(tmp, mine)
    if target.url is not None:
        upload_files(tmp, mine, target.url)
    files: dict[str, dict[str, Any]] = {}
    for part in target.gather(hashes):  # every rank has hashed and uploaded its share
        files.update(part)
    return files


def save_run_checkpoint(target: Target, parts: Parts, state: RankState) -> Path:
    """Every rank calls this at the same optimizer step (``state.counters["opt_step"]``);
    returns the final (local) directory. Valid only once meta.json, written last by rank 0,
    lists every rank's files."""
    c = state.counters
    final = step_dir(target.root, c["opt_step"])
    tmp = final.with_name(final.name + ".tmp")
    _agree_written(target, tmp, write_error(_write_parts, target, parts, state, tmp))
    files = _hash_and_upload(target, tmp)
    error = None
    if target.rank == 0:
        meta = {
            **target.layout,
            **(
                {"memory_shards": target.layout["world_size"]}
                if getattr(parts.memory, "sharded", False)
                else {}
            ),
            "run_id": target.run_id,
            "step": c["opt_step"],
            "micro": c["micro"],
            "epoch": c["epoch"],
            "samples_seen": c["samples_seen"],
        }
        if target.data is not None:
            meta["data"] = target.data
        if target.deepspeed is not None:
            meta["deepspeed"] = target.deepspeed
        keep = 1 if target.url else target.keep_last
        error = write_error(finalize, tmp, final, meta, keep, files)
        if target.url is not None and error is None:  # last: no meta.json, no checkpoint
            publish_meta(final, target.url, target.keep_last)
    elif target.local_rank == 0 and target.url is not None:
        shutil.rmtree(tmp, ignore_errors=True)  # another node's scratch copy: uploaded
    _agree_written(target, tmp, error)  # also the barrier: every rank is done
    return final


def _agree_written(target: Target, tmp: Path, error: str | None) -> None:
    """Every rank learns whether any rank failed to write (a gather, so no rank waits in a
    later collective for one that gave up); then the partial ``tmp`` is removed and every rank
    raises the same one-line CheckpointError. Earlier checkpoints are untouched."""
    failed = [(r, e) for r, e in enumerate(target.gather(error)) if e is not None]
    if not failed:
        return
    if target.local_rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    rank, first = failed[0]
    raise CheckpointError(
        f"cannot write checkpoint {tmp} (rank {rank}: {first}); removed the partial "
        f"{tmp.name}, earlier checkpoints are intact"
    )


def check_shared_dir(
    root: Path, rank: int, node_rank: int, gather: Callable[[Any], list[Any]] = all_gather_json
) -> None:
    """Every rank, at launch: a local ``checkpoint.dir`` must be one directory for all nodes
    (each node writes its ranks' files there, rank 0 hashes and renames them). Rank 0 writes
    a marker with a fresh random name; every rank must see it, else every rank fails with one
    line naming the directory and the nodes that do not see it."""
    token = None
    if rank == 0:
        token = f".shared-check-{secrets.token_hex(8)}"
        try:
            root.mkdir(parents=True, exist_ok=True)
            (root / token).write_text("written by rank 0 to check that every node sees it\n")
        except OSError as err:
            token = f"error: {err.strerror or err}"
    token = gather(token)[0]
    if token.startswith("error: "):
        raise CheckpointError(f"checkpoint.dir={root} is not writable by rank 0 ({token[7:]})")
    seen = gather([node_rank, (root / token).is_file()])
    if rank == 0:
        (root / token).unlink(missing_ok=True)
    blind = sorted({node for node, ok in seen if not ok})
    if blind:
        raise CheckpointError(
            f"checkpoint.dir={root} is not shared between nodes: node(s) "
            f"{', '.join(map(str, blind))} do not see what rank 0 (node {seen[0][0]}) wrote "
            "there; use a directory every node mounts, or a URL (s3://, gs://, ...)"
        )


# What a resume at the same world size must keep (the data positions, per-rank RNG states and
# ZeRO partitions belong to that layout); at another world size ``check_elastic`` decides.
LAYOUT_KEYS = ("world_size", "loader_workers", "batch_size", "grad_accum")


def load_run_checkpoint(
    directory: Path,
    meta: dict[str, Any],
    expect: dict[str, Any],
    parts: Parts,
    rank: int,
    allow_batch_change: bool = False,
) -> RankState:
    """Restore everything ``save_run_checkpoint`` wrote; ``expect`` is this run's layout
    (``LAYOUT_KEYS``). At the checkpoint's world size the layout must match and everything is
    restored exactly; at another one the state is re-planned (``checkpoint.elastic``; the
    returned state's ``note`` says how the epoch goes on) if the global batch is kept or
    ``allow_batch_change``."""
    elastic = "world_size" in expect and meta.get("world_size") != expect["world_size"]
    keep = True
    if elastic:
        keep = check_elastic(directory, meta, expect, allow_batch_change)
    for key in () if elastic else [k for k in LAYOUT_KEYS if k in expect]:
        if meta.get(key) != expect[key]:
            raise CheckpointError(
                f"checkpoint {directory} was written with {key}={meta.get(key)}, this run has "
                f"{key}={expect[key]}: resume with the same setting (data positions, per-rank "
                f"RNG states and ZeRO partitions belong to that layout), or export its weights "
                f"(python -m fne_dist.export) and start a new run from them"
            )
    check_memory_shape(directory, parts.memory.capacity, parts.memory.dim, meta)
    check_engine_files_safe(directory)
    if elastic and partitioned_optimizer(parts.engine):
        _fitting(
            directory,
            "the whole optimizer state",
            lambda: load_whole_optimizer(parts.engine, directory),
        )
    else:
        _load_engine(directory, parts)
    restored = (("momentum", parts.momentum), ("stats", parts.stats))
    for name, part in restored:
        tensors = load_file(str(directory / f"{name}.safetensors"))
        _fitting(directory, f"{name}.safetensors", lambda p=part, t=tensors: p.load_state_dict(t))
    # The memory's slots this rank holds, read from whichever layout wrote them (whole or
    # sharded, any world size): a resume on another world size reshards it here.
    memory = memory_state(directory, meta, parts.memory.shard)
    _fitting(directory, "the memory", lambda: parts.memory.load_state_dict(memory))
    if elastic:
        return elastic_rank_state(directory, meta, expect, rank, keep)
    return read_rank_files(directory, rank, meta.get("step"))


def _load_engine(directory: Path, parts: Parts) -> None:
    """DeepSpeed's (or the DDP twin's) own files: partitions of the same world size, or
    whole state (ZeRO-0, DDP) at any."""
    load_path, _ = _fitting(
        directory,
        "the engine state",
        lambda: parts.engine.load_checkpoint(
            str(directory),
            tag=ENGINE_TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        ),
    )
    if load_path is None:
        raise CheckpointError(f"{directory}: found no engine state under {ENGINE_TAG}/")


def _fitting(directory: Path, what: str, load: Callable[[], Any]) -> Any:
    """``load()``; a state that does not fit this run's objects (another architecture: torch's
    "Error(s) in loading state_dict", a missing entry) as one CheckpointError line."""
    try:
        return load()
    except (RuntimeError, KeyError) as err:
        raise CheckpointError(
            f"checkpoint {directory}: {what} does not fit this run's model "
            f"({one_line(err)}); resume with the checkpoint's model settings"
        ) from None

"""Checkpoints: one layout, written atomically, validated before anything is loaded.

Layout of ``<checkpoint.dir>/step-<optimizer step, 8 digits>/``:

    meta.json             written last: step, micro step, epoch, samples seen, world size,
                          loader workers, ZeRO stage, the training shards (pattern and
                          fingerprint), and size + sha256 of every file below
    config.yaml           the resolved config of the run that wrote it
    model.safetensors     the model's fp32 weights, gathered (what `fne_dist.export` copies)
    engine/ ...           the engine's state, written by ``engine.save_checkpoint``: DeepSpeed's
                          own files (model, optimizer, lr scheduler, every ZeRO partition), or
                          for the plain-DDP twin state.safetensors + state.json (``save_state``)
    momentum.safetensors  the momentum encoders (identical on every rank)
    memory.safetensors    the memory: embeddings, ids, groups, write order, pointer
    stats.safetensors     the FNE sufficient statistics (all-reduced: identical on every rank)
    rank-<r>.json         per rank: its rank and step, data position, Python/NumPy RNG
                          states, loop counters
    rank-<r>.safetensors  per rank: torch RNG state(s); its rank and step in the header

The project's own state is safetensors + JSON, never pickled. DeepSpeed 0.19 writes and reads
its files with pickle (``torch.load(weights_only=False)``), so before DeepSpeed may load them
each is opened with ``torch.load(weights_only=True)`` plus the few DeepSpeed/python types its
files legitimately hold; a file that needs anything else is refused, naming the file.

Atomicity: every rank writes into ``step-N.tmp/``; after a barrier every rank lists what it
sees, the files are shared out (each to one rank that sees it) and hashed, the hashes are
gathered (JSON over the process group), and rank 0 writes meta.json, listing every rank's files,
and renames the directory into place. A checkpoint is valid only when meta.json lists
``rank-<r>.*`` of every rank and every listed file matches its hash. A crash at any point leaves
either no ``step-N`` or a complete one; a later truncation or corruption is caught by the hashes,
and resume falls back to the newest valid checkpoint with a warning naming the bad one. Rank
files moved to another rank or step (meta.json re-hashed) are refused on load, and so is state
that does not fit this run's objects: one line each, never a traceback.

Several nodes: a local checkpoint.dir must be one directory that every node sees
(``check_shared_dir`` fails at launch otherwise); with a URL checkpoint.dir each node writes to
its own scratch directory, every rank uploads its share, and rank 0 uploads meta.json last.
"""

from __future__ import annotations

import hashlib
import json
import random
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .progress import TaskProgress

FORMAT = 1
META = "meta.json"
ENGINE_TAG = "engine"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (none valid, wrong world size, unsafe file): one line."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != META)


def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Python and NumPy generator states (JSON) and torch's (tensors)."""
    py = random.getstate()
    np_state = np.random.get_state()
    as_json = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    return as_json, tensors


def set_rng_state(as_json: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    py = as_json["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = as_json["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])


@dataclass
class RankState:
    """What one rank adds to a checkpoint besides the engine: counters, position, RNG."""

    counters: dict[str, Any]  # micro, opt_step, epoch, samples_seen, staleness sums, ...
    data_position: dict[str, Any] | None


def write_rank_files(directory: Path, rank: int, state: RankState) -> None:
    """``rank-<r>.json`` and ``rank-<r>.safetensors``, each naming its rank and optimizer step
    (checked on load: a rank's file renamed to another rank, or one of another step, is
    refused even with a re-hashed meta.json)."""
    rng_json, rng_tensors = rng_state()
    step = state.counters["opt_step"]
    doc = {
        "rank": rank,
        "step": step,
        "counters": state.counters,
        "data_position": state.data_position,
        "rng": rng_json,
    }
    (directory / f"rank-{rank:05d}.json").write_text(json.dumps(doc))
    binding = {"rank": str(rank), "step": str(step)}
    save_file(rng_tensors, str(directory / f"rank-{rank:05d}.safetensors"), metadata=binding)


def read_rank_files(directory: Path, rank: int, step: int) -> RankState:
    """This rank's state at optimizer ``step`` (meta.json's), after checking that both files
    say they are this rank's at this step; anything else is one CheckpointError line."""
    json_path = directory / f"rank-{rank:05d}.json"
    rng_path = directory / f"rank-{rank:05d}.safetensors"
    try:
        doc = json.loads(json_path.read_text())
        with safe_open(str(rng_path), framework="pt") as f:
            binding = f.metadata() or {}
    except (OSError, ValueError, RecursionError, SafetensorError) as err:
        raise CheckpointError(f"{json_path.parent}: unreadable rank {rank} files ({err})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("counters"), dict):
        raise CheckpointError(f"{json_path}: not a rank file (no 'counters')")
    for path, saved_rank, saved_step in (
        (json_path, doc.get("rank"), doc.get("step")),
        (rng_path, binding.get("rank"), binding.get("step")),
    ):
        if str(saved_rank) != str(rank) or str(saved_step) != str(step):
            raise CheckpointError(
                f"{path}: holds rank {saved_rank}'s state at step {saved_step}, but meta.json "
                f"puts it at rank {rank}, step {step}: the checkpoint's rank files were moved "
                "or mixed; resume from an intact checkpoint"
            )
    if doc["counters"].get("opt_step") != step:
        raise CheckpointError(
            f"{json_path}: its counters are of step {doc['counters'].get('opt_step')}, not {step}"
        )
    try:
        set_rng_state(doc["rng"], load_file(str(rng_path)))
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as err:
        raise CheckpointError(f"{json_path}: malformed RNG state ({_one_line(err)})") from None
    return RankState(doc["counters"], doc.get("data_position"))


def _one_line(err: BaseException) -> str:
    """``err`` in one line of at most 300 characters (torch's state-dict errors span many)."""
    text = " ".join(str(err).split())
    if isinstance(err, KeyError):
        return f"no {text}"
    return (text[:297] + "...") if len(text) > 300 else text or type(err).__name__


def save_tensors(directory: Path, name: str, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(directory / name))


def save_state(directory: Path, stem: str, state: Any) -> None:
    """A nested torch state (dicts, lists, tuples, JSON scalars, tensors; e.g. an optimizer's
    ``state_dict()``) as ``stem.safetensors`` (every tensor, under its path) and ``stem.json``
    (the structure, each tensor replaced by its path). Key and container types survive: an
    optimizer's integer parameter ids stay integers."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any, path: str) -> Any:
        if torch.is_tensor(value):
            tensors[path] = value.detach().cpu().contiguous()
            return {"tensor": path}
        if isinstance(value, dict):
            return {"dict": [[k, encode(v, f"{path}.{k}")] for k, v in value.items()]}
        if isinstance(value, list | tuple):
            kind = "tuple" if isinstance(value, tuple) else "list"
            return {kind: [encode(v, f"{path}.{i}") for i, v in enumerate(value)]}
        return {"value": value}

    directory.mkdir(parents=True, exist_ok=True)
    doc = encode(state, stem)
    save_file(tensors, str(directory / f"{stem}.safetensors"))
    (directory / f"{stem}.json").write_text(json.dumps(doc))


def load_state(directory: Path, stem: str) -> Any:
    """What ``save_state`` wrote."""
    tensors = load_file(str(directory / f"{stem}.safetensors"))

    def decode(node: dict[str, Any]) -> Any:
        ((kind, value),) = node.items()
        if kind == "tensor":
            if value not in tensors:
                raise CheckpointError(
                    f"{directory / stem}.json names tensor {str(value)[:80]!r}, which "
                    f"{stem}.safetensors does not hold"
                )
            return tensors[value]
        if kind == "dict":
            return {k: decode(v) for k, v in value}
        if kind in ("list", "tuple"):
            items = [decode(v) for v in value]
            return tuple(items) if kind == "tuple" else items
        return value

    try:
        return decode(json.loads((directory / f"{stem}.json").read_text()))
    except (ValueError, TypeError, AttributeError, RecursionError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{directory / stem}.json: malformed ({_one_line(err)})") from None


def hash_files(directory: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """Size and sha256 of each of ``names`` (relative to ``directory``)."""
    return {
        name: {"size": (directory / name).stat().st_size, "sha256": _sha256(directory / name)}
        for name in names
    }


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
        files = hash_files(tmp, [str(p.relative_to(tmp)) for p in _files(tmp)])
    table = dict(sorted(files.items()))
    (tmp / META).write_text(json.dumps({"format": FORMAT, **meta, "files": table}, indent=1))
    if final.exists():  # a previous attempt at the same step (after a restart)
        shutil.rmtree(final)
    tmp.rename(final)
    if keep_last > 0:
        for old in list_checkpoints(final.parent)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


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
    for name, info in meta["files"].items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{directory}: {name} is missing")
        if path.stat().st_size != info["size"]:
            raise CheckpointError(f"{directory}: {name} is truncated or changed (size)")
        if _sha256(path) != info["sha256"]:
            raise CheckpointError(f"{directory}: {name} is corrupt (sha256 mismatch)")
    return meta


def _newest_valid(paths, warn, run_id: str | None) -> tuple[Path, dict[str, Any]] | None:
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
    found = _newest_valid(reversed(candidates), warn, run_id)
    if found is None:
        raise CheckpointError(
            f"checkpoint.resume=latest: no valid checkpoint under {root}"
            + (f" ({len(candidates)} invalid)" if candidates else "")
        )
    return found


# Types DeepSpeed 0.19's own checkpoint files hold besides tensors and containers.
def _deepspeed_safe_globals() -> list:
    import argparse
    import collections

    safe: list = [argparse.Namespace, collections.OrderedDict, collections.defaultdict]
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

        safe += [LossScaler, DynamicLossScaler]
    except ImportError:
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address

        safe.append(fragment_address)
    except ImportError:
        pass
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum

        safe.append(ZeroStageEnum)
    except ImportError:
        pass
    return safe


def check_engine_files_safe(directory: Path) -> None:
    """Open every DeepSpeed file with ``weights_only=True`` (plus DeepSpeed's own types) so
    that a pickle that would run code or build other objects is refused before DeepSpeed
    unpickles it with ``weights_only=False``."""
    safe = _deepspeed_safe_globals()
    for path in sorted((directory / ENGINE_TAG).rglob("*.pt")):
        try:
            with torch.serialization.safe_globals(safe):
                torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(
                f"{path}: refused to load: it holds more than tensors and DeepSpeed's own "
                f"types ({first})"
            ) from None


@dataclass
class Parts:
    """The run's stateful objects a checkpoint saves and restores besides the per-rank state."""

    engine: Any  # DeepSpeed's engine or the plain-DDP twin
    momentum: torch.nn.Module
    memory: Any  # MomentumMemory
    stats: Any  # SimilarityStats


def _gather_json(value: Any) -> list[Any]:
    from .distributed import all_gather_json

    return all_gather_json(value)


def _local_rank() -> int:
    from .distributed.launch import rank_env

    return rank_env().local_rank


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
    gather: Callable[[Any], list[Any]] = field(default=_gather_json)  # every rank's JSON
    local_rank: int = field(default_factory=_local_rank)


def _write_parts(target: Target, parts: Parts, state: RankState, tmp: Path) -> None:
    """Every rank writes its files into ``tmp`` (on its own node when not shared)."""
    from .engine import full_weights

    weights = full_weights(parts.engine)  # a collective under ZeRO-3: before any rank writes
    if target.local_rank == 0:  # one rank per node: a stale attempt on a node-local disk too
        shutil.rmtree(tmp, ignore_errors=True)
    if target.rank == 0 and target.url is not None:  # an earlier attempt's remote step-N
        fs, remote = _remote_dir(target.url, f"{tmp.name.removesuffix('.tmp')}/{META}")
        if fs.exists(remote):
            fs.rm(remote)
    target.barrier()
    tmp.mkdir(parents=True, exist_ok=True)
    parts.engine.save_checkpoint(str(tmp), tag=ENGINE_TAG, save_latest=False)  # collective
    if target.rank == 0:
        save_tensors(tmp, "momentum.safetensors", parts.momentum.state_dict())
        save_tensors(tmp, "memory.safetensors", parts.memory.state_dict())
        save_tensors(tmp, "stats.safetensors", parts.stats.state_dict())
        save_tensors(tmp, "model.safetensors", weights)  # for export: no DeepSpeed needed
        (tmp / "config.yaml").write_text(target.config_yaml)
    write_rank_files(tmp, target.rank, state)


def _hash_and_upload(target: Target, tmp: Path) -> dict[str, dict[str, Any]]:
    """After every rank wrote: each rank hashes (and, to a URL, uploads) its share of the
    files it can see; rank 0 gets every rank's hashes, so meta.json covers files that only
    another node holds. Returns the merged table (on every rank)."""
    target.barrier()
    visible = [str(p.relative_to(tmp)) for p in _files(tmp)]
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
            "run_id": target.run_id,
            "step": c["opt_step"],
            "micro": c["micro"],
            "epoch": c["epoch"],
            "samples_seen": c["samples_seen"],
        }
        if target.data is not None:
            meta["data"] = target.data
        keep = 1 if target.url else target.keep_last
        error = write_error(finalize, tmp, final, meta, keep, files)
        if target.url is not None and error is None:  # last: no meta.json, no checkpoint
            publish_meta(final, target.url, target.keep_last)
    elif target.local_rank == 0 and target.url is not None:
        shutil.rmtree(tmp, ignore_errors=True)  # another node's scratch copy: uploaded
    _agree_written(target, tmp, error)  # also the barrier: every rank is done
    return final


def write_error(write: Callable[..., Any], *args: Any) -> str | None:
    """``write(*args)``; a failed write (disk full, quota, permissions: OSError, safetensors'
    or torch's writer errors) as one line, else None. Anything else is a bug and propagates."""
    try:
        write(*args)
    except (OSError, SafetensorError, RuntimeError) as err:
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        torch_writer = "writ" in text.lower()  # torch.save: "... failed writing file ..."
        if type(err) is RuntimeError and not torch_writer:
            raise
        return text
    return None


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
    root: Path, rank: int, node_rank: int, gather: Callable[[Any], list[Any]] = _gather_json
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


def check_memory_shape(directory: Path, size: int, dim: int) -> None:
    """The checkpoint's memory is ``size``×``dim`` (memory.size × model.embed_dim), else one
    CheckpointError naming the setting: read from the file's header, before anything loads."""
    path = directory / "memory.safetensors"
    try:
        with safe_open(str(path), framework="pt") as f:
            saved = tuple(f.get_slice("img").get_shape())
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


def load_run_checkpoint(
    directory: Path, meta: dict[str, Any], expect: dict[str, Any], parts: Parts, rank: int
) -> RankState:
    """Restore everything ``save_run_checkpoint`` wrote; ``expect`` holds this run's world size,
    loader workers, batch size and ZeRO stage, which must match (a different world size would
    silently mis-assign data positions, RNG states and ZeRO partitions)."""
    for key, value in expect.items():
        if meta.get(key) != value:
            raise CheckpointError(
                f"checkpoint {directory} was written with {key}={meta.get(key)}, this run has "
                f"{key}={value}: resume with the same setting (data positions, per-rank RNG "
                f"states and ZeRO partitions belong to that layout), or export its weights "
                f"(python -m fne_dist.export) and start a new run from them"
            )
    check_memory_shape(directory, parts.memory.capacity, parts.memory.dim)
    check_engine_files_safe(directory)
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
    restored = (("momentum", parts.momentum), ("memory", parts.memory), ("stats", parts.stats))
    for name, part in restored:
        tensors = load_file(str(directory / f"{name}.safetensors"))
        _fitting(directory, f"{name}.safetensors", lambda p=part, t=tensors: p.load_state_dict(t))
    return read_rank_files(directory, rank, meta.get("step"))


def _fitting(directory: Path, what: str, load: Callable[[], Any]) -> Any:
    """``load()``; a state that does not fit this run's objects (another architecture: torch's
    "Error(s) in loading state_dict", a missing entry) as one CheckpointError line."""
    try:
        return load()
    except (RuntimeError, KeyError) as err:
        raise CheckpointError(
            f"checkpoint {directory}: {what} does not fit this run's model "
            f"({_one_line(err)}); resume with the checkpoint's model settings"
        ) from None


# ------------------------------------------------------------------ checkpoint.dir as a URL
# checkpoint.dir may be an fsspec URL (s3://, gs://, file://, ...): checkpoints are written
# locally as above, then uploaded by rank 0 with meta.json last (object stores cannot rename:
# a checkpoint without meta.json is incomplete and skipped), and downloaded again to resume.


def is_url(root: str | Path) -> bool:
    return "://" in str(root)


def _fs(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url)


def _remote_dir(root_url: str, name: str) -> tuple[Any, str]:
    fs, root = _fs(root_url)
    return fs, f"{root.rstrip('/')}/{name}"


def upload_files(local: Path, names: list[str], root_url: str) -> None:
    """Copy ``names`` (relative to the checkpoint directory ``local``, named step-N or
    step-N.tmp) to ``root_url``/step-N: one rank's part of a checkpoint."""
    fs, target = _remote_dir(root_url, local.name.removesuffix(".tmp"))
    with TaskProgress("checkpoint_upload", f"upload {local.name}", len(names), "files") as bar:
        for name in names:
            remote = f"{target}/{Path(name).as_posix()}"
            fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(str(local / name), remote)
            bar.update()


def publish_meta(local: Path, root_url: str, keep_last: int) -> str:
    """meta.json last (every rank's part is up), then prune the oldest remote checkpoints."""
    fs, target = _remote_dir(root_url, local.name)
    fs.makedirs(target, exist_ok=True)
    fs.put_file(str(local / META), f"{target}/{META}")
    if keep_last > 0:
        for old in remote_checkpoints(root_url)[:-keep_last]:
            fs.rm(_remote_dir(root_url, old)[1], recursive=True)
    return target


def fetch_missing(local: Path, root_url: str) -> list[str]:
    """Complete a local copy of a finished checkpoint (``local``, with meta.json) from
    ``root_url``: with node-local scratch directories, rank 0's copy lacks the files only other
    nodes wrote (they uploaded them). Ray registers rank 0's copy as the run's checkpoint, so
    it must hold every rank's part. Returns the names fetched."""
    files = json.loads((local / META).read_text())["files"]
    missing = [name for name in files if not (local / name).is_file()]
    fs, remote = _remote_dir(root_url, local.name)
    for name in missing:
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(f"{remote}/{Path(name).as_posix()}", str(local / name))
    return missing


def upload(local: Path, root_url: str, keep_last: int) -> str:
    """Copy a finished local checkpoint to ``root_url``/step-N (meta.json last); prune."""
    upload_files(local, [str(p.relative_to(local)) for p in _files(local)], root_url)
    return publish_meta(local, root_url, keep_last)


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
    found = _newest_valid((download(root_url, n, local_root) for n in names), warn, run_id)
    if found is None:
        raise CheckpointError(f"checkpoint.resume=latest: no valid checkpoint under {root_url}")
    return found

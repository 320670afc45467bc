"""A checkpoint resumed on another world size: what is whole is loaded whole, what is per rank
is re-planned.

- Engine: ZeRO-0 and the DDP twin keep the optimizer state whole in their engine files, which
  load at any world size. Under ZeRO 1-3 the engine files hold one partition per rank, so each
  checkpoint also holds the state whole by parameter name (``optimizer.safetensors``: fp32
  master weights, Adam's two moments; ``optimizer.json``: step, lr schedule, engine counters),
  which every rank of the new world loads and keeps its own partition of.
- Momentum encoders, memory and statistics are whole in every checkpoint: loaded as they are.
- Data: the epoch in progress goes on with the old layout's plan (every old rank's position
  is read from its rank file; ``data.stream.Replay`` takes each new rank's slice of every
  global batch), so with the global batch kept no sample of the epoch is repeated or
  skipped. With another global batch (``checkpoint.allow_batch_change``) the rest of the epoch
  is dropped, counted, and the run goes on from the next epoch with the new layout's plan.
- Counters and RNG: new rank r takes old rank r's (rank 0's counters, its own seeded RNG, when
  there was no rank r).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from ..engine import full_optimizer_state, load_full_state, partitioned_optimizer
from .format import CheckpointError, RankState, read_rank_files, save_tensors

OPTIMIZER = "optimizer"  # optimizer.safetensors + optimizer.json, under ZeRO 1-3


def whole_optimizer(engine) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Every rank (collectives under ZeRO 1-3): the optimizer state whole; None where the
    engine's own files hold it whole (ZeRO-0, the DDP twin)."""
    return full_optimizer_state(engine) if partitioned_optimizer(engine) else None


def save_whole_optimizer(directory: Path, whole: tuple[dict[str, Any], dict[str, Any]]) -> None:
    """Rank 0: ``whole_optimizer``'s state as ``optimizer.safetensors`` + ``optimizer.json``."""
    tensors, meta = whole
    save_tensors(directory, f"{OPTIMIZER}.safetensors", tensors)
    (directory / f"{OPTIMIZER}.json").write_text(json.dumps(meta))


def load_whole_optimizer(engine, directory: Path) -> None:
    """Every rank: the whole weights and optimizer state into this world's partitions."""
    tensors_path = directory / f"{OPTIMIZER}.safetensors"
    if not tensors_path.is_file():
        raise CheckpointError(
            f"checkpoint {directory} holds no whole optimizer state ({tensors_path.name}, "
            "written by checkpoints of this version on): resume it with its own world size"
        )
    weights = load_file(str(directory / "model.safetensors"))
    tensors = load_file(str(tensors_path))
    meta = json.loads((directory / f"{OPTIMIZER}.json").read_text())
    load_full_state(engine, weights, tensors, meta)


def check_elastic(
    directory: Path, meta: dict[str, Any], here: dict[str, Any], allow_batch_change: bool
) -> bool:
    """Whether a resume on another world size keeps the global batch; one line (a
    CheckpointError) for what it cannot change."""
    if meta.get("grad_accum") != here["grad_accum"]:
        raise CheckpointError(
            f"checkpoint {directory} was written with grad_accum={meta.get('grad_accum')}, "
            f"this run has grad_accum={here['grad_accum']}: resume with "
            f"engine.grad_accum={meta.get('grad_accum')}"
        )
    old_w, old_b = int(meta["world_size"]), int(meta["batch_size"])
    new_w, new_b = here["world_size"], here["batch_size"]
    if old_w * old_b == new_w * new_b:
        return True
    if not allow_batch_change:
        g = old_w * old_b
        raise CheckpointError(
            f"checkpoint {directory} was written with a global batch of {old_w} ranks × "
            f"{old_b} = {g}, this run's is {new_w} × {new_b} = {new_w * new_b}: set "
            f"train.global_batch_size={g} to keep it, or checkpoint.allow_batch_change=true "
            "to change it (the rest of the interrupted epoch is then dropped)"
        )
    return False


def elastic_rank_state(
    directory: Path, meta: dict[str, Any], here: dict[str, Any], rank: int, keep: bool
) -> RankState:
    """This rank's counters and data position in the new world (its RNG states set when the
    old world had this rank), and a note for the resume's log line: how the epoch goes on."""
    old_w = int(meta["world_size"])
    step = meta.get("step")
    olds = [read_rank_files(directory, q, step, set_rng=(q == rank)) for q in range(old_w)]
    mine = olds[rank] if rank < old_w else olds[0]
    counters = dict(mine.counters)
    if rank >= old_w:  # diagnostics of anchors this rank did not have
        counters["stale"] = [0.0, 0.0]
    positions = [o.data_position for o in olds]
    first = positions[0]
    if first is None:
        return RankState(counters, None, "no data position")
    fresh = [{"consumer": c} for c in range(here["loader_workers"])]
    position = {
        "epoch": first["epoch"],
        "step": first["step"],
        "mode": first.get("mode", "exact"),
        "shard_order_seed": first.get("shard_order_seed", 0),
        "consumers": fresh,
    }
    old_b = int(meta["batch_size"])
    if keep:
        replay = first.get("replay") or {
            "world": old_w,
            "batch": old_b,
            "consumers": len(first["consumers"]),
            "positions": positions,
        }
        replay = {**replay, "reads": []}
        position["replay"] = replay
        note = (
            f"the rest of epoch {first['epoch']} (from batch {first['step']}) follows the "
            f"{replay['world']}-rank data plan, each rank taking its rows of every global batch"
        )
        return RankState(counters, position, note)
    replay = first.get("replay")
    g_old = replay["world"] * replay["batch"] if replay else old_w * old_b
    steps_old = int(meta.get("steps_per_epoch") or 0)
    dropped = max(0, steps_old - first["step"]) * g_old
    position.update(epoch=first["epoch"] + 1, step=0)
    note = (
        f"the global batch changed: the rest of epoch {first['epoch']} is dropped "
        f"({dropped} samples), training goes on from epoch {first['epoch'] + 1}"
    )
    return RankState(counters, position, note)

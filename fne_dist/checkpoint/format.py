"""The checkpoint's file format: names, hashes, the project's own state as safetensors + JSON
(never pickled), and each rank's files bound to its rank and step. The bottom of the house:
it imports nothing of the project, so the engine (its plain-DDP twin writes through
``save_state``) and everything above it can import it.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

FORMAT = 1
META = "meta.json"
ENGINE_TAG = "engine"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (none valid, wrong world size, unsafe file): one line."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != META)


def hash_files(directory: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """Size and sha256 of each of ``names`` (relative to ``directory``)."""
    return {
        name: {"size": (directory / name).stat().st_size, "sha256": sha256_of(directory / name)}
        for name in names
    }


def one_line(err: BaseException) -> str:
    """``err`` in one line of at most 300 characters (torch's state-dict errors span many)."""
    text = " ".join(str(err).split())
    if isinstance(err, KeyError):
        return f"no {text}"
    return (text[:297] + "...") if len(text) > 300 else text or type(err).__name__


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
        raise CheckpointError(f"{directory / stem}.json: malformed ({one_line(err)})") from None


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
    note: str | None = None  # a resume on another world size: how the epoch goes on


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


def read_rank_files(directory: Path, rank: int, step: int, set_rng: bool = True) -> RankState:
    """Rank ``rank``'s state at optimizer ``step`` (meta.json's), after checking that both files
    say they are that rank's at this step; anything else is one CheckpointError line. Its RNG
    states become this process's when ``set_rng``."""
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
        if set_rng:
            set_rng_state(doc["rng"], load_file(str(rng_path)))
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as err:
        raise CheckpointError(f"{json_path}: malformed RNG state ({one_line(err)})") from None
    return RankState(doc["counters"], doc.get("data_position"))

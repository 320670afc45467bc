"""The project's only collectives (docs/algorithm.md §5): identities at world size 1.

Legend: B local batch, G = W·B gathered batch.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@torch.no_grad()
def all_gather_no_grad(x_B: Tensor) -> Tensor:
    """Concatenate every rank's ``x_B`` in rank order (G rows); no gradient flows back.

    All ranks must pass the same shape (the data path equalises batches per rank).
    """
    if not _active():
        return x_B
    parts = [torch.empty_like(x_B) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x_B.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def all_gather_rows(*xs_B: Tensor) -> tuple[Tensor, ...]:
    """``all_gather_no_grad`` of each tensor, in one collective: every tensor's rows (same
    first dim B, any dtypes) are packed as bytes into one B×bytes buffer, gathered, and
    unpacked bit for bit. One gather of a few KiB costs about what one of a few bytes does
    (gloo's latency dominates), so the step's embeddings, ids and groups travel together."""
    if not _active():
        return xs_B
    return unpack_rows(all_gather_no_grad(pack_rows(xs_B)), xs_B)


def pack_rows(xs_B: tuple[Tensor, ...]) -> Tensor:
    """B×bytes uint8: row i holds row i of every tensor, as its raw bytes, in order."""
    b = xs_B[0].shape[0]
    return torch.cat([x.detach().contiguous().reshape(b, -1).view(torch.uint8) for x in xs_B], 1)


def unpack_rows(packed_NY: Tensor, like_B: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The inverse of ``pack_rows`` for any number of rows N, dtypes and row shapes taken from
    ``like_B`` (tensors shaped like the packed ones)."""
    out, start = [], 0
    for x in like_B:
        width = x[:1].numel() * x.element_size()
        part = packed_NY[:, start : start + width].contiguous().view(x.dtype)
        out.append(part.reshape(-1, *x.shape[1:]))
        start += width
    return tuple(out)


def all_reduce_sum(x: Tensor) -> Tensor:
    """Elementwise sum over ranks (a new tensor; ``x`` is left untouched)."""
    if not _active():
        return x
    out = x.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_max(x: Tensor) -> Tensor:
    """Elementwise maximum over ranks (a new tensor; ``x`` is left untouched)."""
    if not _active():
        return x
    out = x.clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


@torch.no_grad()
def all_to_all_rows(x_N: Tensor, send_counts: list[int], recv_counts: list[int]) -> Tensor:
    """Rank r sends its rows ``x_N`` in runs of ``send_counts[q]`` to each rank q (in rank
    order) and receives ``recv_counts[q]`` rows from each: the received rows, by source rank."""
    if not _active():
        return x_N
    out = x_N.new_empty((sum(recv_counts), *x_N.shape[1:]))
    dist.all_to_all_single(out, x_N.contiguous(), recv_counts, send_counts)
    return out


def barrier() -> None:
    """Every rank waits for the others, at most the collective timeout."""
    if _active():
        dist.barrier()


_LONG_GROUP: dict[str, object] = {}


def set_long_barrier_group(group: object | None) -> None:
    """Installed by ``launch.init_process_group``: a gloo group with the long-barrier timeout."""
    _LONG_GROUP.clear()
    if group is not None:
        _LONG_GROUP["group"] = group


def long_barrier() -> None:
    """A barrier around long one-rank work (a feature-cache build, an upload): it waits
    dist.barrier_timeout_s, not the per-step collective timeout. A plain barrier when no long
    group was installed (e.g. a process group made by someone else)."""
    if not _active():
        return
    group = _LONG_GROUP.get("group")
    if group is None:
        dist.barrier()
    else:
        dist.barrier(group=group)


@torch.no_grad()
def all_gather_varlen(x_N: Tensor) -> Tensor:
    """Concatenate every rank's rows in rank order when ranks hold different row counts
    (evaluation shares); pads to the longest and strips the padding again."""
    if not _active():
        return x_N
    world = dist.get_world_size()
    n = torch.tensor([x_N.shape[0]], dtype=torch.long, device=x_N.device)
    counts = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(counts, n)
    longest = int(max(int(c) for c in counts))
    padded = x_N.new_zeros((longest, *x_N.shape[1:]))
    padded[: x_N.shape[0]] = x_N
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[: int(c)] for p, c in zip(parts, counts, strict=True)])


_CPU_GROUP: dict[str, object] = {}


def _cpu_group():
    """A gloo group for small host-side agreements when the default backend is NCCL (None:
    the default group is already gloo). Created on first use, which every rank reaches at the
    same point (the first step)."""
    if dist.get_backend() == "gloo":
        return None
    if "gloo" not in _CPU_GROUP:
        _CPU_GROUP["gloo"] = dist.new_group(backend="gloo")
    return _CPU_GROUP["gloo"]


def all_min_int(value: int) -> int:
    """The smallest of every rank's ``value`` (e.g. "I have a batch" = 1, "I am out" = 0,
    "my data failed" = -1): ranks agree before anyone enters the step's collectives.

    On the host (gloo), never on a CUDA tensor: reading a CUDA result would wait for all the
    GPU work queued so far and stall the CPU/GPU overlap once per step.
    """
    if not _active():
        return value
    t = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_cpu_group())
    return int(t)


def all_gather_json(value: Any) -> list[Any]:
    """Every rank's small JSON-serialisable ``value``, in rank order (a list of one at world
    size 1). Sent as JSON bytes over the long-barrier (else a gloo) group, never pickled:
    ranks may arrive after long one-rank work (hashing, uploading a checkpoint part)."""
    if not _active():
        return [value]
    group = _LONG_GROUP.get("group") or _cpu_group()
    data = torch.tensor(list(json.dumps(value).encode()), dtype=torch.uint8)
    world = dist.get_world_size()
    n = torch.tensor([data.numel()], dtype=torch.long)
    counts = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(counts, n, group=group)
    padded = torch.zeros(max(int(c) for c in counts), dtype=torch.uint8)
    padded[: data.numel()] = data
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return [json.loads(bytes(p[: int(c)].tolist())) for p, c in zip(parts, counts, strict=True)]

"""Ring buffer of momentum embeddings: the candidates beyond the batch (docs/algorithm.md §1, §5).

Legend: K capacity, D embedding dim, G rows enqueued per step (the gathered global batch).

The buffer never communicates: in a distributed run every rank enqueues the same gathered
block, and identical seeded initialisation keeps the copies bit-identical without a broadcast.
Storage is float32 whatever the training precision (the momentum side must not lose the small
EMA increments), or bf16 by choice (``memory.dtype``: half the bytes; docs/sharded-memory.md
says what it changes).

Sharded (``memory.sharded``): rank r of W holds slots [⌊rK/W⌋, ⌊(r+1)K/W⌋) of the same ring
(``ShardRange``), initialised to the same values the whole memory holds there; every rank still
advances the same pointer by G per enqueue and writes only the part of the gathered block that
lands in its slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .fne import Candidates

EMPTY_ID = -100  # id of a never-written slot: never equal to a real (non-negative) id
INIT_CHUNK_ELEMENTS = 1 << 22  # rows generated at a time when only a shard is kept


@dataclass(frozen=True)
class ShardRange:
    """The slots [lo, hi) of a K-slot ring that one of W ranks holds (contiguous, rank order;
    K not a multiple of W gives shards that differ by one slot)."""

    lo: int
    hi: int
    capacity: int

    @classmethod
    def of(cls, capacity: int, rank: int = 0, world: int = 1) -> ShardRange:
        return cls(rank * capacity // world, (rank + 1) * capacity // world, capacity)

    @property
    def size(self) -> int:
        return self.hi - self.lo

    def pieces(self, start: int, count: int) -> list[tuple[int, int, int]]:
        """Where ``count`` (≤ K) rows written at ring slot ``start`` (mod K) land in this shard:
        (first row, first local slot, length) runs, at most two (a write wraps at most once)."""
        first = start % self.capacity
        runs = [(0, first, min(count, self.capacity - first))]
        if count > self.capacity - first:
            runs.append((self.capacity - first, 0, count - (self.capacity - first)))
        out = []
        for row, slot, n in runs:
            lo, hi = max(slot, self.lo), min(slot + n, self.hi)
            if lo < hi:
                out.append((row + lo - slot, lo - self.lo, hi - lo))
        return out


def _unit_rows(gen: torch.Generator, capacity: int, dim: int, keep: ShardRange) -> torch.Tensor:
    """Rows keep.lo..keep.hi of ``normalize(randn(capacity, dim, generator=gen))``, generated a
    chunk at a time so a shard never holds the whole memory, and consuming ``gen`` exactly as the
    whole tensor would: torch fills normals from uniforms in runs of 16 values, so chunks of a
    multiple of 16 values (and a last chunk of at least 16) give the same numbers."""
    if keep.lo == 0 and keep.hi == capacity:
        return F.normalize(torch.randn(capacity, dim, generator=gen), dim=1)
    step = max(1, INIT_CHUNK_ELEMENTS // dim) * (16 // math.gcd(16, dim))
    tail = -(-16 // dim)  # rows that make a last chunk of at least 16 values
    rows = torch.empty(keep.size, dim)
    row = 0
    while row < capacity:
        n = step if capacity - row >= step + tail else capacity - row
        chunk = torch.randn(n, dim, generator=gen)
        lo, hi = max(row, keep.lo), min(row + n, keep.hi)
        if lo < hi:
            rows[lo - keep.lo : hi - keep.lo] = chunk[lo - row : hi - row]
        row += n
    # F.normalize's x / max(‖x‖, eps), in place: the same values without a second shard
    return rows.div_(rows.norm(dim=1, keepdim=True).clamp_min(1e-12))


class MomentumMemory:
    """K aligned slots of (image embedding, text embedding, image id, group id).

    Initialised with random unit vectors from ``seed`` (same seed ⇒ same memory on every rank)
    and ids ``EMPTY_ID``. ``enqueue`` writes any number of rows at the pointer with wrap-around;
    when more than K rows arrive at once only the last K are kept, exactly as if they had been
    enqueued one at a time. ``shard``: hold only those slots (the tensors then have
    ``shard.size`` rows; ``capacity`` stays K); ``dtype``: the embeddings' storage.
    """

    def __init__(
        self,
        capacity: int,
        dim: int,
        seed: int = 0,
        device: torch.device | str | None = None,
        shard: ShardRange | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if capacity < 0 or dim <= 0:
            raise ValueError(f"memory needs capacity >= 0 and dim > 0, got K={capacity} D={dim}")
        gen = torch.Generator().manual_seed(seed)
        self.capacity, self.dim = capacity, dim
        self.sharded = shard is not None  # a checkpoint then stores one file per rank
        self.shard = shard or ShardRange.of(capacity)
        n = self.shard.size
        self.img_KD = _unit_rows(gen, capacity, dim, self.shard).to(device=device, dtype=dtype)
        self.txt_KD = _unit_rows(gen, capacity, dim, self.shard).to(device=device, dtype=dtype)
        self.ids_K = torch.full((n,), EMPTY_ID, dtype=torch.long, device=device)
        self.groups_K = torch.full((n,), EMPTY_ID, dtype=torch.long, device=device)
        # Write counter per slot (-1 = never written): picks the newest slot of a repeated id.
        self.seq_K = torch.full((n,), -1, dtype=torch.long, device=device)
        self.ptr = 0  # next slot to write (host int: the pointer depends only on sizes)
        self.writes = 0  # rows written so far

    def __len__(self) -> int:
        return min(self.writes, self.capacity)

    @torch.no_grad()
    def enqueue(
        self, img_GD: Tensor, txt_GD: Tensor, ids_G: Tensor, groups_G: Tensor | None = None
    ) -> None:
        """Write G rows at the pointer, wrapping around; advances the pointer by G mod K."""
        G, K = img_GD.shape[0], self.capacity
        if K == 0 or G == 0:
            return
        first = max(0, G - K)  # rows that would be overwritten within this very call
        # the slots are a ring range known on the host: plain slice copies, no index tensors
        for row, slot, n in self.shard.pieces(self.ptr + first, G - first):
            rows, slots = slice(first + row, first + row + n), slice(slot, slot + n)
            self.img_KD[slots] = img_GD[rows].to(self.img_KD)
            self.txt_KD[slots] = txt_GD[rows].to(self.txt_KD)
            self.ids_K[slots] = ids_G[rows].to(self.ids_K)
            self.groups_K[slots] = EMPTY_ID if groups_G is None else groups_G[rows].to(self.ids_K)
            start = self.writes + first + row
            self.seq_K[slots] = torch.arange(start, start + n, device=self.seq_K.device)
        self.ptr = (self.ptr + G) % K
        self.writes += G

    def candidates(self) -> Candidates:
        """The memory as a candidate block (its rows follow the batch block in the loss)."""
        return Candidates(self.img_KD, self.txt_KD, self.ids_K, 0, self.groups_K)

    @torch.no_grad()
    def after_batch(self, batch: Candidates) -> Candidates:
        """[batch ; memory] as one candidate block, the same values as ``Candidates.concat(batch,
        self.candidates())`` without copying the K memory rows each step: the memory's tensors
        are the tail of (G + K)-row buffers whose first G rows take the batch block here (at
        K = 16,384, D = 256, the copy was 2 × 16 MB a step; at a GPU's K = 10⁶, 2 GB). The
        block aliases the memory: it is valid until the next ``after_batch`` or ``enqueue``
        (autograd's version check fails loudly if a backward reads it after either). Falls back
        to the copy when the batch's dtype or device differs from the memory's (a bf16 memory
        next to an fp32 batch: the copy promotes, the buffer would round the batch)."""
        g = batch.img_ND.shape[0]
        same = (
            batch.groups_N is not None
            and batch.img_ND.dtype == batch.txt_ND.dtype == self.img_KD.dtype
            and batch.img_ND.device == self.img_KD.device
        )
        if not same or self.ids_K.numel() == 0:
            return Candidates.concat(batch, self.candidates())
        bufs = self._front_buffers(g)
        heads = (batch.img_ND, batch.txt_ND, batch.ids_N, batch.groups_N)
        for buf, head in zip(bufs, heads, strict=True):
            buf[:g].copy_(head)
        return Candidates(bufs[0], bufs[1], bufs[2], g, bufs[3])

    def _front_buffers(self, g: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The (g + K)-row buffers whose tails are the memory's tensors; allocated (and the
        memory moved into them, once) when g changes or a tensor was replaced from outside."""
        bufs = getattr(self, "_fronts", None)
        tails = (self.img_KD, self.txt_KD, self.ids_K, self.groups_K)
        if bufs is None or not all(_is_tail(t, b, g) for t, b in zip(tails, bufs, strict=True)):
            bufs = tuple(t.new_empty((g + t.shape[0], *t.shape[1:])) for t in tails)
            for buf, tail in zip(bufs, tails, strict=True):
                buf[g:].copy_(tail)
            self.img_KD, self.txt_KD, self.ids_K, self.groups_K = (b[g:] for b in bufs)
            self._fronts = bufs
        return bufs  # type: ignore[return-value]

    @torch.no_grad()
    def slots_of(self, ids_B: Tensor) -> Tensor:
        """Newest slot holding each id, or -1: the id → slot index of the staleness metric.

        Vectorised (a sort of the K ids and a binary search), no host sync.
        """
        by_recency = torch.argsort(self.seq_K, descending=True, stable=True)
        order = by_recency[torch.argsort(self.ids_K[by_recency], stable=True)]
        sorted_ids = self.ids_K[order]
        pos_B = torch.searchsorted(sorted_ids, ids_B).clamp_max(max(self.shard.size - 1, 0))
        if self.shard.size == 0:
            return torch.full_like(ids_B, -1)
        found_B = (sorted_ids[pos_B] == ids_B) & (ids_B != EMPTY_ID)
        return torch.where(found_B, order[pos_B], -1)

    @torch.no_grad()
    def staleness(self, ids_B: Tensor, img_BD: Tensor) -> tuple[Tensor, Tensor]:
        """cos(memory image entry, current momentum image embedding) for anchors whose id is in
        the memory: (sum of cosines, count) so ranks can all-reduce before dividing."""
        slots_B = self.slots_of(ids_B)
        hit_B = slots_B >= 0
        cos_B = (self.img_KD[slots_B.clamp_min(0)] * img_BD.to(self.img_KD)).sum(1)
        return (cos_B * hit_B).sum().to(torch.float64), hit_B.sum().to(torch.float64)

    def state_dict(self) -> dict[str, Tensor]:
        """This rank's slots (all of them unless sharded) and the ring's pointer."""
        return {
            "img": self.img_KD.clone(),
            "txt": self.txt_KD.clone(),
            "ids": self.ids_K.clone(),
            "groups": self.groups_K.clone(),
            "seq": self.seq_K.clone(),
            "ptr_writes": torch.tensor([self.ptr, self.writes], dtype=torch.long),
            "shard": torch.tensor([self.shard.lo, self.shard.hi, self.capacity], dtype=torch.long),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if tuple(state["img"].shape) != (self.shard.size, self.dim):
            raise ValueError(
                f"memory state has shape {tuple(state['img'].shape)}, this memory is "
                f"(K={self.shard.size}, D={self.dim})"
            )
        self.img_KD.copy_(state["img"])
        self.txt_KD.copy_(state["txt"])
        self.ids_K.copy_(state["ids"])
        self.groups_K.copy_(state["groups"])
        self.seq_K.copy_(state["seq"])
        self.ptr, self.writes = (int(v) for v in state["ptr_writes"].tolist())


def _is_tail(tail: Tensor, buf: Tensor, g: int) -> bool:
    """``tail`` is ``buf[g:]`` (the same storage, offset and rows)."""
    return (
        tail.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
        and tail.storage_offset() == buf.storage_offset() + g * buf.stride(0)
        and tail.shape[0] == buf.shape[0] - g
        and tail.is_contiguous()
    )


def build_memory(cfg, device: torch.device | str | None, rank: int, world: int) -> MomentumMemory:
    """The run's memory (``memory.size`` × ``model.embed_dim``, seeded by ``run.seed``): this
    rank's shard when ``memory.sharded``, stored in ``memory.dtype``."""
    shard = ShardRange.of(cfg.memory.size, rank, world) if cfg.memory.sharded else None
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.memory.dtype]
    return MomentumMemory(
        cfg.memory.size, cfg.model.embed_dim, cfg.run.seed, device, shard=shard, dtype=dtype
    )

"""Ring buffer of momentum embeddings: the candidates beyond the batch (docs/algorithm.md §1, §5).

Legend: K capacity, D embedding dim, G rows enqueued per step (the gathered global batch).

The buffer never communicates: in a distributed run every rank enqueues the same gathered
block, and identical seeded initialisation keeps the copies bit-identical without a broadcast.
Storage is float32 whatever the training precision (the momentum side must not lose the small
EMA increments).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .fne import Candidates

EMPTY_ID = -100  # id of a never-written slot: never equal to a real (non-negative) id


class MomentumMemory:
    """K aligned slots of (image embedding, text embedding, image id, group id).

    Initialised with random unit vectors from ``seed`` (same seed ⇒ same memory on every rank)
    and ids ``EMPTY_ID``. ``enqueue`` writes any number of rows at the pointer with wrap-around;
    when more than K rows arrive at once only the last K are kept, exactly as if they had been
    enqueued one at a time.
    """

    def __init__(
        self,
        capacity: int,
        dim: int,
        seed: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        if capacity < 0 or dim <= 0:
            raise ValueError(f"memory needs capacity >= 0 and dim > 0, got K={capacity} D={dim}")
        gen = torch.Generator().manual_seed(seed)
        self.capacity, self.dim = capacity, dim
        self.img_KD = F.normalize(torch.randn(capacity, dim, generator=gen), dim=1).to(device)
        self.txt_KD = F.normalize(torch.randn(capacity, dim, generator=gen), dim=1).to(device)
        self.ids_K = torch.full((capacity,), EMPTY_ID, dtype=torch.long, device=device)
        self.groups_K = torch.full((capacity,), EMPTY_ID, dtype=torch.long, device=device)
        # Write counter per slot (-1 = never written): picks the newest slot of a repeated id.
        self.seq_K = torch.full((capacity,), -1, dtype=torch.long, device=device)
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
        slots_g = (self.ptr + first + torch.arange(G - first, device=self.ids_K.device)) % K
        self.img_KD[slots_g] = img_GD[first:].to(self.img_KD)
        self.txt_KD[slots_g] = txt_GD[first:].to(self.txt_KD)
        self.ids_K[slots_g] = ids_G[first:].to(self.ids_K)
        if groups_G is not None:
            self.groups_K[slots_g] = groups_G[first:].to(self.groups_K)
        else:
            self.groups_K[slots_g] = EMPTY_ID
        self.seq_K[slots_g] = self.writes + first + torch.arange(G - first, device=slots_g.device)
        self.ptr = (self.ptr + G) % K
        self.writes += G

    def candidates(self) -> Candidates:
        """The memory as a candidate block (its rows follow the batch block in the loss)."""
        return Candidates(self.img_KD, self.txt_KD, self.ids_K, 0, self.groups_K)

    @torch.no_grad()
    def slots_of(self, ids_B: Tensor) -> Tensor:
        """Newest slot holding each id, or -1: the id → slot index of the staleness metric.

        Vectorised (a sort of the K ids and a binary search), no host sync.
        """
        by_recency = torch.argsort(self.seq_K, descending=True, stable=True)
        order = by_recency[torch.argsort(self.ids_K[by_recency], stable=True)]
        sorted_ids = self.ids_K[order]
        pos_B = torch.searchsorted(sorted_ids, ids_B).clamp_max(max(self.capacity - 1, 0))
        if self.capacity == 0:
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
        return {
            "img": self.img_KD.clone(),
            "txt": self.txt_KD.clone(),
            "ids": self.ids_K.clone(),
            "groups": self.groups_K.clone(),
            "seq": self.seq_K.clone(),
            "ptr_writes": torch.tensor([self.ptr, self.writes], dtype=torch.long),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if tuple(state["img"].shape) != (self.capacity, self.dim):
            raise ValueError(
                f"memory state has shape {tuple(state['img'].shape)}, this memory is "
                f"(K={self.capacity}, D={self.dim})"
            )
        self.img_KD.copy_(state["img"])
        self.txt_KD.copy_(state["txt"])
        self.ids_K.copy_(state["ids"])
        self.groups_K.copy_(state["groups"])
        self.seq_K.copy_(state["seq"])
        self.ptr, self.writes = (int(v) for v in state["ptr_writes"].tolist())

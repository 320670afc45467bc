"""The collectives of the sharded memory (docs/sharded-memory.md): every rank scores the gathered
anchors against its shard, the per-segment summaries are all-gathered and combined, the owners
draw, and the picked candidates travel to the anchors' ranks.

Legend: W ranks, B local batch, G = W·B gathered batch, K memory slots, D embedding dim,
k negatives per anchor, P = 1 + W segments (the gathered batch, then the shards in rank order).

The FNE math is ``fne.sharded``'s (pure); this module only moves tensors. At W = 1 with the
whole memory it computes what ``fne.loss`` does, through the same segment functions.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from ..fne.loss import Anchors, Candidates, LossOutput, retrieval_loss
from ..fne.params import FneConfig
from ..fne.posteriors import fit_of
from ..fne.selection import Picks
from ..fne.sharded import (
    Segment,
    SegmentRows,
    SegmentSummary,
    choose_segments,
    combine_fallback,
    draw_in_segment,
    pack,
    segment_pass,
    unpack,
)
from ..fne.stats import Gaussians
from . import collectives


class Comm(Protocol):
    """The two collectives the sharded sampler needs, over some group of ranks."""

    rank: int
    world: int

    def all_gather(self, x: Tensor) -> Tensor:
        """Every rank's ``x`` (same shape everywhere), concatenated in rank order."""
        ...

    def all_reduce_sum(self, x: Tensor) -> Tensor:
        """The element-wise sum over ranks (a new tensor)."""
        ...


class DefaultComm:
    """The default process group (identities at world size 1)."""

    def __init__(self) -> None:
        self.rank, self.world = collectives.rank(), collectives.world_size()

    def all_gather(self, x: Tensor) -> Tensor:
        return collectives.all_gather_no_grad(x)

    def all_reduce_sum(self, x: Tensor) -> Tensor:
        return collectives.all_reduce_sum(x)


class GlooComm:
    """A gloo group of its own (ranks as threads of one process share an in-process store):
    what the equivalence tests run W ranks with, without a launcher."""

    def __init__(self, store: dist.Store, rank: int, world: int, timeout_s: float = 60.0) -> None:
        self.rank, self.world = rank, world
        self.group = dist.ProcessGroupGloo(
            store, rank, world, datetime.timedelta(seconds=timeout_s)
        )

    def all_gather(self, x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(self.world)]
        self.group.allgather([parts], [x.contiguous()]).wait()
        return torch.cat(parts)

    def all_reduce_sum(self, x: Tensor) -> Tensor:
        out = x.clone().contiguous()
        self.group.allreduce([out]).wait()
        return out


@dataclass
class ShardStep:
    """One step's inputs to the sharded selection, as every rank holds them."""

    anchors: Anchors  # this rank's B anchors (online embeddings, positives at rank·B + i)
    gathered: Candidates  # the gathered batch block (G momentum rows)
    memory: object  # this rank's MomentumMemory shard (``shard``, ``img_KD``, ``txt_KD``, …)
    u_2Gk: Tensor  # the step's uniforms for every anchor of the global batch (both directions)


@dataclass
class ShardedPicks:
    """What the loss of this rank's anchors needs: a small candidate block [gathered batch ;
    each anchor's picks] and the picks of both directions as columns of that block."""

    candidates: Candidates
    i2t: Picks
    t2i: Picks
    columns: tuple[Tensor, Tensor]  # the picks' columns in [gathered batch ; memory] (b×k each)


def _memory_segment(memory, G: int, dtype: torch.dtype, ctx: dict) -> Segment:
    """This rank's shard as a segment; the fallback is not sought there when its scope is the
    batch block (``fne.fallback_scope``; the hardest rule ignores the scope)."""
    scope = ctx["cfg"].fallback_scope != "batch" or ctx["rule"] == "hardest"
    return Segment(
        G + memory.shard.lo, memory.ids_K, memory.groups_K, memory.img_KD.to(dtype), scope
    )


def _rows(
    sim: Tensor, idx: Tensor, ctx: dict, img_XD: Tensor, groups_X: Tensor | None
) -> SegmentRows:
    return SegmentRows(
        sim,
        ctx["pos_sim"][idx],
        ctx["ids"][idx],
        ctx["pos_col"][idx],
        img_XD[idx],
        None if ctx["mask_groups"] is None else ctx["mask_groups"][idx],
        None if groups_X is None else groups_X[idx],
    )


def _passes(anchor_XD: Tensor, rows_X: Tensor, seg_emb: Tensor, seg: Segment, ctx: dict) -> list:
    """``segment_pass`` over the anchors ``rows_X`` (indices into the gathered anchors) against
    one segment, in matmuls of ``block_rows`` anchors (as the whole-row sampler)."""
    cfg = ctx["cfg"]
    out = []
    for b0 in range(0, rows_X.shape[0], cfg.block_rows):
        idx = rows_X[b0 : b0 + cfg.block_rows]
        sim = anchor_XD[idx] @ seg_emb.T
        rows = _rows(sim, idx, ctx, ctx["img_G"], ctx["detect_groups"])
        out.append((idx, sim, segment_pass(rows, seg, ctx["g"], cfg, ctx["rule"], ctx["fit"])))
    return out


def _cat_summaries(parts: list) -> SegmentSummary:
    return SegmentSummary(*(torch.cat(x) for x in zip(*(p[2].summary for p in parts), strict=True)))


def _direction(step: ShardStep, d: int, ctx: dict, comm: Comm) -> dict:
    """The picks of every gathered anchor in direction d (0: image→text, 1: text→image)."""
    cfg, G, B = ctx["cfg"], step.gathered.n_batch, step.anchors.ids_B.shape[0]
    anchor_GD = ctx["img_G"] if d == 0 else ctx["txt_G"]
    which = "txt" if d == 0 else "img"
    batch_emb = getattr(step.gathered, f"{which}_ND")
    dtype = anchor_GD.dtype
    mine_B = comm.rank * B + torch.arange(B, device=anchor_GD.device)
    # s⁺ of this rank's anchors from their batch-block row, as the whole-row sampler
    pos_B = torch.cat(
        [
            (anchor_GD[mine_B[b0 : b0 + cfg.block_rows]] @ batch_emb.T).gather(
                1, ctx["pos_col"][mine_B[b0 : b0 + cfg.block_rows], None]
            )[:, 0]
            for b0 in range(0, B, cfg.block_rows)
        ]
    )
    ctx["pos_sim"] = comm.all_gather(pos_B)
    batch_seg = Segment(0, step.gathered.ids_N, _groups(step.gathered), step.gathered.img_ND, True)
    mem_seg = _memory_segment(step.memory, G, dtype, ctx)
    mem_emb = getattr(step.memory, f"{which}_KD").to(dtype)
    every_G = torch.arange(G, device=anchor_GD.device)
    batch_parts = _passes(anchor_GD, mine_B, batch_emb, batch_seg, ctx)
    mem_parts = _passes(anchor_GD, every_G, mem_emb, mem_seg, ctx) if ctx["use_memory"] else []
    # all-gather the summaries: the batch segment's B rows per rank, the shards' G rows each
    ints_b, floats_b = (comm.all_gather(x) for x in pack(_cat_summaries(batch_parts)))
    segs = [unpack(ints_b, floats_b, dtype)]
    if ctx["use_memory"]:
        ints_m, floats_m = pack(_cat_summaries(mem_parts))
        ints_m, floats_m = comm.all_gather(ints_m), comm.all_gather(floats_m)
        for r in range(comm.world):
            segs.append(unpack(ints_m[r * G : (r + 1) * G], floats_m[r * G : (r + 1) * G], dtype))
    units_GP = torch.stack([s.units_b for s in segs], 1)
    fb = combine_fallback(
        torch.stack([s.best_b for s in segs], 1),
        torch.stack([s.best_col_b for s in segs], 1),
        ctx["pos_sim"],
        cfg.margin,
    )
    counts_G3 = sum(s.counts_b3 for s in segs)
    detect_GF = sum(s.detect_bF for s in segs)
    if ctx["rule"] == "hardest":
        index_Gk, sim_Gk = fb.col_b[:, None], fb.best_b[:, None]
        valid_Gk = fb.has_violator_b[:, None]
        fallback_G = torch.zeros_like(fb.has_violator_b)
        no_violator_G = ~fb.has_violator_b
        counts_G3 = torch.zeros_like(counts_G3)
    else:
        owned = [(0, mine_B, batch_emb, batch_seg)]
        if ctx["use_memory"]:
            owned.append((1 + comm.rank, every_G, mem_emb, mem_seg))
        index_Gk, sim_Gk, valid_Gk, empty_G = _draws(step, d, units_GP, owned, ctx, comm)
        valid_Gk[:, 0] = ~empty_G | fb.has_violator_b
        index_Gk[:, 0] = torch.where(empty_G, fb.col_b, index_Gk[:, 0])
        sim_Gk[:, 0] = torch.where(empty_G, fb.best_b, sim_Gk[:, 0])
        fallback_G = empty_G & fb.has_violator_b
        no_violator_G = empty_G & ~fb.has_violator_b
    return dict(
        index=index_Gk, sim=sim_Gk, valid=valid_Gk, fallback=fallback_G,
        no_violator=no_violator_G, counts=counts_G3, detect=detect_GF, pos_sim=ctx["pos_sim"],
    )  # fmt: skip


def _groups(c: Candidates) -> Tensor:
    return c.groups_N if c.groups_N is not None else torch.full_like(c.ids_N, -1)


def _draws(step: ShardStep, d: int, units_GP: Tensor, owned: list, ctx: dict, comm: Comm):
    """k rounds: every rank finds each row's segment, the owner draws there, the picks (global
    column, units, similarity) are summed across ranks (one owner per row), and the drawn
    weight leaves its segment's total before the next round."""
    G, k = units_GP.shape[0], step.u_2Gk.shape[2]
    dtype = ctx["img_G"].dtype
    index, sims, valids = [], [], []
    units_GP = units_GP.clone()
    empty_G = units_GP.sum(1) <= 0
    for t in range(k):
        choice = choose_segments(units_GP, step.u_2Gk[d, :, t].to(units_GP.device))
        pick_i = torch.zeros(G, 3, dtype=torch.long, device=units_GP.device)  # col+1, units, seg
        pick_s = torch.zeros(G, dtype=dtype, device=units_GP.device)
        for seg_id, rows_X, emb, seg in owned:
            rows_X = rows_X[choice.segment_b[rows_X] == seg_id]
            if rows_X.numel() == 0:
                continue
            for idx, sim, p in _passes(ctx["anchor_G"][d], rows_X, emb, seg, ctx):
                assert p.units_bS is not None
                prev = torch.stack(index, 1)[idx] - seg.offset if index else None
                if prev is not None:
                    prev = torch.where((prev >= 0) & (prev < sim.shape[1]), prev, -1)
                local = draw_in_segment(p.units_bS, choice.target_b[idx], prev)
                pick_i[idx, 0] = local + seg.offset + 1
                pick_i[idx, 1] = p.units_bS.gather(1, local[:, None])[:, 0]
                pick_s[idx] = sim.gather(1, local[:, None])[:, 0]
        pick_i, pick_s = comm.all_reduce_sum(pick_i), comm.all_reduce_sum(pick_s)
        index.append(pick_i[:, 0] - 1)
        sims.append(pick_s)
        valids.append((choice.total_b > 0) & ~empty_G)  # the first draw's: see _direction
        units_GP.scatter_add_(1, choice.segment_b[:, None], -pick_i[:, 1:2])
    return torch.stack(index, 1), torch.stack(sims, 1), torch.stack(valids, 1), empty_G


@torch.no_grad()
def fetch_memory_rows(memory, cols_X: Tensor, G: int, comm: Comm) -> Candidates:
    """The candidates at global columns ``cols_X`` (the same on every rank; columns < G are
    left zero: the batch block is on every rank already) from the shards that hold them: each
    owner writes its rows, the rest are zero, and a sum across ranks copies them exactly."""
    slot_X = cols_X - G - memory.shard.lo
    mine_X = (cols_X >= G) & (slot_X >= 0) & (slot_X < memory.shard.size)
    at_X = slot_X.clamp(0, max(memory.shard.size - 1, 0))
    emb = torch.zeros(cols_X.shape[0], 2, memory.dim, dtype=torch.float32, device=cols_X.device)
    labels = torch.zeros(cols_X.shape[0], 2, dtype=torch.long, device=cols_X.device)
    if memory.shard.size:
        emb[:, 0] = torch.where(mine_X[:, None], memory.img_KD[at_X].float(), 0.0)
        emb[:, 1] = torch.where(mine_X[:, None], memory.txt_KD[at_X].float(), 0.0)
        labels[:, 0] = torch.where(mine_X, memory.ids_K[at_X], 0)
        labels[:, 1] = torch.where(mine_X, memory.groups_K[at_X], 0)
    emb, labels = comm.all_reduce_sum(emb), comm.all_reduce_sum(labels)
    return Candidates(emb[:, 0], emb[:, 1], labels[:, 0], 0, labels[:, 1])


def _with_batch_rows(rows: Candidates, cols_X: Tensor, gathered: Candidates) -> Candidates:
    """``rows`` with the batch-block columns (< G) filled from the gathered batch, in the
    gathered block's dtype."""
    G = gathered.n_batch
    in_batch = cols_X < G
    at = cols_X.clamp_max(G - 1)
    dtype = gathered.img_ND.dtype

    def pick(batch: Tensor, fetched: Tensor) -> Tensor:
        return torch.where(
            in_batch.view(-1, *([1] * (batch.dim() - 1))), batch[at], fetched.to(batch.dtype)
        )

    return Candidates(
        pick(gathered.img_ND, rows.img_ND.to(dtype)),
        pick(gathered.txt_ND, rows.txt_ND.to(dtype)),
        pick(gathered.ids_N, rows.ids_N),
        0,
        pick(_groups(gathered), rows.groups_N),
    )


def sharded_selection(
    step: ShardStep, cfg: FneConfig, g: Gaussians | None, rule: str, comm: Comm
) -> ShardedPicks:
    """The picks of this rank's anchors over [gathered batch ; every rank's shard], the same as
    the whole-memory sampler's (``fne.loss``), and the candidate block the loss indexes."""
    a, gathered = step.anchors, step.gathered
    G, B = gathered.n_batch, a.ids_B.shape[0]
    img_G, txt_G = comm.all_gather(a.img_BD.detach()), comm.all_gather(a.txt_BD.detach())
    groups_G = None if a.groups_B is None else comm.all_gather(a.groups_B)
    measure = groups_G is not None and gathered.groups_N is not None and rule != "hardest"
    ctx = dict(
        cfg=cfg, g=g, rule=rule, img_G=img_G, txt_G=txt_G, anchor_G=(img_G, txt_G),
        ids=comm.all_gather(a.ids_B), pos_col=comm.all_gather(a.pos_col_B),
        mask_groups=groups_G if cfg.mask_groups else None,
        detect_groups=groups_G if measure else None,
        fit=None if rule != "fne" or g is None else fit_of(g, cfg.prior),
        use_memory=rule != "hardest" or cfg.vse_pp_memory,
    )  # fmt: skip
    out = [_direction(step, d, ctx, comm) for d in (0, 1)]
    k = out[0]["index"].shape[1]
    cols_X = torch.cat([o["index"].reshape(-1) for o in out])  # (direction, anchor, draw)
    rows = _with_batch_rows(fetch_memory_rows(step.memory, cols_X, G, comm), cols_X, gathered)
    mine = slice(comm.rank * B, (comm.rank + 1) * B)
    block = Candidates.concat(
        gathered,
        Candidates(
            *(torch.cat([x.view(2, G, k, *x.shape[1:])[d, mine].flatten(0, 1) for d in (0, 1)])
              for x in (rows.img_ND, rows.txt_ND, rows.ids_N)),
            0,
            torch.cat([rows.groups_N.view(2, G, k)[d, mine].flatten() for d in (0, 1)]),
        ),
    )  # fmt: skip
    picks = [_picks_of(o, mine, G + d * B * k, ctx, cfg) for d, o in enumerate(out)]
    columns = (out[0]["index"][mine], out[1]["index"][mine])
    return ShardedPicks(block, picks[0], picks[1], columns)


def _picks_of(o: dict, mine: slice, first: int, ctx: dict, cfg: FneConfig) -> Picks:
    """This rank's rows of one direction's picks, as ``fne.selection.Picks`` whose columns
    index the block [gathered batch ; picks] (starting at column ``first``)."""
    valid_bk, sim_bk = o["valid"][mine], o["sim"][mine]
    b, k = valid_bk.shape
    index_bk = first + torch.arange(b * k, device=valid_bk.device).view(b, k)
    pos_sim_b = o["pos_sim"][mine]
    counts_bC = torch.cat(
        [torch.stack([o["fallback"][mine], o["no_violator"][mine]], 1).double(), o["counts"][mine]],
        1,
    )
    return Picks(
        index_bk=index_bk,
        valid_bk=valid_bk,
        prob_bN=sim_bk.new_zeros(b, 0),
        sim_bk=sim_bk,
        zero_hinge_bk=(cfg.margin + sim_bk - pos_sim_b[:, None]) <= 0,
        counts_bC=counts_bC,
        detect_bF=o["detect"][mine],
    )


RULES = {"fne": "fne", "window": "window", "vse_pp": "hardest"}


def sharded_retrieval_loss(
    step: ShardStep, cfg: FneConfig, g: Gaussians | None, temperature: Tensor | None, comm: Comm
) -> LossOutput:
    """``fne.loss.retrieval_loss`` of this rank's anchors over [gathered batch ; every shard]:
    the picks made across ranks, the hinges (with gradient) and diagnostics on this rank."""
    B = step.anchors.ids_B.shape[0]
    u_2Bk = step.u_2Gk[:, comm.rank * B : (comm.rank + 1) * B]
    if cfg.loss not in RULES:  # vse0 reads the batch block only (infonce is refused by config)
        return retrieval_loss(step.anchors, step.gathered, cfg, g, u_2Bk, temperature)
    p = sharded_selection(step, cfg, g, RULES[cfg.loss], comm)
    return retrieval_loss(
        step.anchors, p.candidates, cfg, g, u_2Bk, temperature, picks=(p.i2t, p.t2i)
    )

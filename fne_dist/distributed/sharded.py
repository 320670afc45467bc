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
import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from ..fne.loss import Anchors, Candidates, LossOutput, retrieval_loss
from ..fne.params import FneConfig
from ..fne.posteriors import fit_of
from ..fne.rules import RULE_OF_LOSS, Rule
from ..fne.selection import Picks
from ..fne.sharded import (
    Fallback,
    Segment,
    SegmentRows,
    SegmentSummary,
    choose_segments,
    draw_in_segment,
    merge_summaries,
    segment_pass,
    units_at,
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

    def all_reduce_max(self, x: Tensor) -> Tensor:
        """The element-wise maximum over ranks (a new tensor)."""
        ...

    def all_to_all(self, x: Tensor, send_counts: list[int], recv_counts: list[int]) -> Tensor:
        """Runs of ``send_counts[q]`` rows to each rank q; the rows received, by source rank."""
        ...


class DefaultComm:
    """The default process group (identities at world size 1)."""

    def __init__(self) -> None:
        self.rank, self.world = collectives.rank(), collectives.world_size()

    def all_gather(self, x: Tensor) -> Tensor:
        return collectives.all_gather_no_grad(x)

    def all_reduce_sum(self, x: Tensor) -> Tensor:
        return collectives.all_reduce_sum(x)

    def all_reduce_max(self, x: Tensor) -> Tensor:
        return collectives.all_reduce_max(x)

    def all_to_all(self, x: Tensor, send_counts: list[int], recv_counts: list[int]) -> Tensor:
        return collectives.all_to_all_rows(x, send_counts, recv_counts)


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

    def all_reduce_max(self, x: Tensor) -> Tensor:
        out = x.clone().contiguous()
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MAX
        self.group.allreduce([out], opts).wait()
        return out

    def all_to_all(self, x: Tensor, send_counts: list[int], recv_counts: list[int]) -> Tensor:
        out = x.new_empty((sum(recv_counts), *x.shape[1:]))
        self.group.alltoall_base(out, x.contiguous(), recv_counts, send_counts).wait()
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
    scope = ctx["cfg"].fallback_scope != "batch" or not ctx["rule"].draws
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


def _passes(
    anchor_XD: Tensor, rows_X: Tensor, seg_emb: Tensor, seg: Segment, ctx: dict, draw: bool = False
) -> list:
    """``segment_pass`` over the anchors ``rows_X`` (indices into the gathered anchors) against
    one segment, in matmuls of ``block_rows`` anchors (as the whole-row sampler). ``draw``:
    only the weights are needed (no detection sums)."""
    cfg = ctx["cfg"]
    out = []
    for b0 in range(0, rows_X.shape[0], cfg.block_rows):
        idx = rows_X[b0 : b0 + cfg.block_rows]
        sim = anchor_XD[idx] @ seg_emb.T
        rows = _rows(sim, idx, ctx, ctx["img_G"], None if draw else ctx["detect_groups"])
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
    # Only the segments' totals are all-gathered (W·G integers); the fallback and the counts
    # are one maximum and one sum over ranks of each rank's own segments.
    batch_sum = _cat_summaries(batch_parts)
    units = [comm.all_gather(batch_sum.units_b)[:, None]]
    local = _spread(batch_sum, mine_B, G)
    if ctx["use_memory"]:
        mem_sum = _cat_summaries(mem_parts)
        units.append(comm.all_gather(mem_sum.units_b).view(comm.world, G).T)
        local = merge_summaries(local, mem_sum)
    units_GP = torch.cat(units, 1)
    best_G = comm.all_reduce_max(local.best_b)
    # the first column holding the maximum: the smallest of every rank's first column there
    first_G = torch.where(local.best_b == best_G, local.best_col_b, NO_COLUMN)
    fb = Fallback(
        -comm.all_reduce_max(-first_G), best_G, (cfg.margin + best_G - ctx["pos_sim"]) > 0
    )
    counts_G3 = comm.all_reduce_sum(local.counts_b3)
    detect_GF = comm.all_reduce_sum(local.detect_bF)
    if not ctx["rule"].draws:
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


NO_COLUMN = 2**62  # larger than any column: "this rank does not hold the maximum"


def _spread(s: SegmentSummary, rows_b: Tensor, G: int) -> SegmentSummary:
    """A summary of some anchors (``rows_b``) as G rows: nothing (−inf, no column, 0) elsewhere."""
    best = s.best_b.new_full((G,), -math.inf).index_copy(0, rows_b, s.best_b)
    col = torch.full((G,), NO_COLUMN, dtype=torch.long, device=rows_b.device)
    col = col.index_copy(0, rows_b, s.best_col_b)
    counts = s.counts_b3.new_zeros(G, 3).index_copy(0, rows_b, s.counts_b3)
    detect = s.detect_bF.new_zeros(G, s.detect_bF.shape[1]).index_copy(0, rows_b, s.detect_bF)
    return SegmentSummary(s.units_b.new_zeros(G), best, col, counts, detect)


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
            for idx, sim, p in _passes(ctx["anchor_G"][d], rows_X, emb, seg, ctx, draw=True):
                prev = torch.stack(index, 1)[idx] - seg.offset if index else None
                if prev is not None:
                    prev = torch.where((prev >= 0) & (prev < sim.shape[1]), prev, -1)
                local = draw_in_segment(p, choice.target_b[idx], prev)
                pick_i[idx, 0] = local + seg.offset + 1
                pick_i[idx, 1] = units_at(p, local)
                pick_s[idx] = sim.gather(1, local[:, None])[:, 0]
        pick_i, pick_s = comm.all_reduce_sum(pick_i), comm.all_reduce_sum(pick_s)
        index.append(pick_i[:, 0] - 1)
        sims.append(pick_s)
        valids.append((choice.total_b > 0) & ~empty_G)  # the first draw's: see _direction
        units_GP.scatter_add_(1, choice.segment_b[:, None], -pick_i[:, 1:2])
    return torch.stack(index, 1), torch.stack(sims, 1), torch.stack(valids, 1), empty_G


@torch.no_grad()
def rows_for_anchors(memory, cols_AGr: Tensor, G: int, comm: Comm) -> Candidates:
    """The candidates at global columns ``cols_AGr`` (A lists of r columns per gathered anchor,
    the same on every rank) for this rank's anchors: (A, B, r) rows, flattened. Memory rows
    come from their shard's owner in one all-to-all each for embeddings and labels (every rank
    knows who sends what: the columns are known everywhere); batch columns (< G) are left zero
    for ``_with_batch_rows``. Each owner sends only the rows of other ranks' anchors."""
    A, _, r = cols_AGr.shape
    W, me, K = comm.world, comm.rank, memory.capacity
    B = G // W
    device = cols_AGr.device
    his = torch.tensor([(q + 1) * K // W for q in range(W)], device=device)
    slot = cols_AGr - G
    owner = torch.where(slot >= 0, torch.searchsorted(his, slot, right=True), -1).flatten()
    dest = (torch.arange(G, device=device) // B)[None, :, None].expand(A, G, r).flatten()
    send = (owner == me).nonzero().squeeze(1)
    send = send[torch.argsort(dest[send], stable=True)]
    recv = ((dest == me) & (owner >= 0)).nonzero().squeeze(1)
    recv = recv[torch.argsort(owner[recv], stable=True)]
    send_counts = torch.bincount(dest[send], minlength=W).tolist()
    recv_counts = torch.bincount(owner[recv], minlength=W).tolist()
    local = slot.flatten()[send] - memory.shard.lo
    # bf16 storage travels upcast (as the whole-row sampler scores it); float64 stays float64
    wide = torch.promote_types(memory.img_KD.dtype, torch.float32)
    emb = torch.cat([memory.img_KD[local].to(wide), memory.txt_KD[local].to(wide)], 1)
    labels = torch.stack([memory.ids_K[local], memory.groups_K[local]], 1)
    got_emb = comm.all_to_all(emb, send_counts, recv_counts)
    got_labels = comm.all_to_all(labels, send_counts, recv_counts)
    # place the received rows at this rank's anchors' positions of (A, G, r)
    at = (recv // (G * r)) * (B * r) + (recv % (G * r)) - me * B * r
    n = A * B * r
    out_emb = got_emb.new_zeros(n, 2 * memory.dim).index_copy(0, at, got_emb)
    out_labels = got_labels.new_zeros(n, 2).index_copy(0, at, got_labels)
    D = memory.dim
    return Candidates(out_emb[:, :D], out_emb[:, D:], out_labels[:, 0], 0, out_labels[:, 1])


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
    step: ShardStep, cfg: FneConfig, g: Gaussians | None, rule: Rule, comm: Comm
) -> ShardedPicks:
    """The picks of this rank's anchors over [gathered batch ; every rank's shard], the same as
    the whole-memory sampler's (``fne.loss``), and the candidate block the loss indexes."""
    a, gathered = step.anchors, step.gathered
    G, B = gathered.n_batch, a.ids_B.shape[0]
    img_G, txt_G = comm.all_gather(a.img_BD.detach()), comm.all_gather(a.txt_BD.detach())
    groups_G = None if a.groups_B is None else comm.all_gather(a.groups_B)
    measure = groups_G is not None and gathered.groups_N is not None and rule.draws
    ctx = dict(
        cfg=cfg, g=g, rule=rule, img_G=img_G, txt_G=txt_G, anchor_G=(img_G, txt_G),
        ids=comm.all_gather(a.ids_B), pos_col=comm.all_gather(a.pos_col_B),
        mask_groups=groups_G if cfg.mask_groups else None,
        detect_groups=groups_G if measure else None,
        fit=None if not rule.uses_posterior or g is None else fit_of(g, cfg.prior),
        use_memory=rule.draws or cfg.vse_pp_memory,
    )  # fmt: skip
    out = [_direction(step, d, ctx, comm) for d in (0, 1)]
    k = out[0]["index"].shape[1]
    mine = slice(comm.rank * B, (comm.rank + 1) * B)
    cols_2Gk = torch.stack([o["index"] for o in out])
    rows = rows_for_anchors(step.memory, cols_2Gk, G, comm)  # (direction, anchor, draw)
    block = Candidates.concat(
        gathered, _with_batch_rows(rows, cols_2Gk[:, mine].flatten(), gathered)
    )
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


def sharded_retrieval_loss(
    step: ShardStep, cfg: FneConfig, g: Gaussians | None, temperature: Tensor | None, comm: Comm
) -> LossOutput:
    """``fne.loss.retrieval_loss`` of this rank's anchors over [gathered batch ; every shard]:
    the picks made across ranks, the hinges (with gradient) and diagnostics on this rank."""
    B = step.anchors.ids_B.shape[0]
    u_2Bk = step.u_2Gk[:, comm.rank * B : (comm.rank + 1) * B]
    if (
        cfg.loss not in RULE_OF_LOSS
    ):  # vse0 reads the batch block only (infonce is refused by config)
        return retrieval_loss(step.anchors, step.gathered, cfg, g, u_2Bk, temperature)
    p = sharded_selection(step, cfg, g, RULE_OF_LOSS[cfg.loss], comm)
    return retrieval_loss(
        step.anchors, p.candidates, cfg, g, u_2Bk, temperature, picks=(p.i2t, p.t2i)
    )


@torch.no_grad()
def sharded_staleness(memory, gathered: Candidates, B: int, comm: Comm) -> Tensor:
    """``MomentumMemory.staleness`` of this rank's anchors when the memory is sharded: each
    shard finds the gathered ids among its slots, the newest write (largest write counter)
    over the shards wins, and its owner scores the cosine. (sum of cosines, count), float64."""
    slot_G = memory.slots_of(gathered.ids_N)
    hit = slot_G >= 0
    at = slot_G.clamp_min(0)
    seq_G = torch.where(hit, memory.seq_K[at], -1) if memory.shard.size else slot_G
    newest_G = comm.all_reduce_max(seq_G)
    owner_G = hit & (seq_G == newest_G)
    cos_G = torch.zeros(slot_G.shape[0], dtype=memory.img_KD.dtype, device=slot_G.device)
    if memory.shard.size:
        cos = (memory.img_KD[at] * gathered.img_ND.to(memory.img_KD)).sum(1)
        cos_G = torch.where(owner_G, cos, 0.0)
    cos_G = comm.all_reduce_sum(cos_G)
    mine = slice(comm.rank * B, (comm.rank + 1) * B)
    cos_B, hit_B = cos_G[mine], newest_G[mine] >= 0
    return torch.stack([(cos_B * hit_B).sum().to(torch.float64), hit_B.sum().to(torch.float64)])


@torch.no_grad()
def sampled_block(memory, gathered: Candidates, cols_2Gr: Tensor, comm: Comm):
    """The step's random candidate sample (``fne.estimators.sample_columns`` of every gathered
    anchor, columns of [gathered batch ; memory]) as a small block holding this rank's anchors'
    sampled rows, and their columns in it: ``random_candidate_sims`` and the posteriors' sums
    over (block, columns) equal those over the whole candidates and the original columns."""
    B = gathered.n_batch // comm.world
    mine = slice(comm.rank * B, (comm.rank + 1) * B)
    rows = rows_for_anchors(memory, cols_2Gr, gathered.n_batch, comm)
    block = _with_batch_rows(rows, cols_2Gr[:, mine].flatten(), gathered)
    cols_2Br = torch.arange(block.ids_N.shape[0], device=cols_2Gr.device).view(2, B, -1)
    return block, cols_2Br

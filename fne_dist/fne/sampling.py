"""The weighted negative draw and its fallbacks (docs/algorithm.md §2 steps 5 and 7).

Legend: B anchors, N candidates, k negatives per anchor, G global batch.

Draws are by inverse CDF from caller-supplied uniforms, so the same uniforms give the same
negatives in any implementation (a plain loop in a test reproduces them exactly), and the
uniforms of a step depend only on (seed, step), not on the world size (``step_uniforms``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


def step_uniforms(
    seed: int,
    step: int,
    global_batch: int,
    negatives: int = 1,
    rank: int = 0,
    local_batch: int | None = None,
) -> Tensor:
    """Uniforms in [0, 1) for one step, shape (2 directions, B, k), for rank ``rank``.

    They are drawn for the whole global batch from a generator seeded by (seed, step) and rank r
    takes rows r·B .. (r+1)·B − 1, so W ranks × B draw exactly what 1 rank × W·B draws.
    Returned on the CPU: the caller moves them (16·B·k bytes) to its device.
    """
    B = global_batch if local_batch is None else local_batch
    assert rank >= 0 and (rank + 1) * B <= global_batch, (rank, B, global_batch)
    # A fixed odd multiplier mixes seed and step; any injective-in-practice map would do.
    gen = torch.Generator().manual_seed((seed * 0x9E3779B97F4A7C15 + step) % (2**63 - 1))
    u_2Gk = torch.rand((2, global_batch, negatives), generator=gen, dtype=torch.float64)
    return u_2Gk[:, rank * B : (rank + 1) * B]


DRAW_BLOCK = 128
"""Columns per block of the two-level draw: the full-row pass is a block-sum reduction (it fuses
with the weight computation), and only one block per row is ever scanned."""


def block_reduce(x_BN: Tensor, block: int, op: str) -> Tensor:
    """Per-row reduction over consecutive column blocks of ``block``: "sum" (float64; int64 for
    int64 input) or "max".

    A last partial block (N not a multiple of ``block``) is reduced on its own, so nothing is
    padded or copied.
    """
    n = x_BN.shape[1]
    full = (n // block) * block

    def reduce(t: Tensor, dim: int, keepdim: bool = False) -> Tensor:
        if op == "sum":  # floats summed in float64 (exact for whole-number units, see
            # ``float_units``); integer units stay int64: exact
            if t.is_floating_point():
                return t.sum(dim, keepdim=keepdim, dtype=torch.float64)
            return t.sum(dim, keepdim=keepdim)
        return t.amax(dim, keepdim=keepdim)

    parts = [reduce(x_BN[:, :full].unflatten(1, (-1, block)), -1)] if full else []
    if full < n:
        parts.append(reduce(x_BN[:, full:], -1, keepdim=True))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def block_columns(x_BN: Tensor, block_B: Tensor, block: int, fill: float) -> Tensor:
    """The ``block`` columns of block ``block_B[i]`` of each row (B × block); ``fill`` past N."""
    n = x_BN.shape[1]
    cols_Bc = block_B[:, None] * block + torch.arange(block, device=x_BN.device)
    inside_Bc = cols_Bc < n
    return x_BN.gather(1, cols_Bc.clamp_max(n - 1)).masked_fill_(~inside_Bc, fill)


WEIGHT_UNIT_BITS = 38
"""The draw's cumulative sums are exact integers: a weight w ≥ 0 counts as ⌈w·2^38⌉ units.

Integer sums are associative, so the cdf is the same whatever the summation order: the dense
and the window-compacted forms, a plain loop, and a memory split into shards that are summed
separately and then added (``fne.sharded``) all draw the same column from the same uniform.
Every float32 weight ≥ 2^-15 is a whole number of units (its ulp is ≥ 2^-38), so in float32 the
cdf is the exact sum of the weights; in float64 a weight moves by < 2^-38 (a draw's odds by
~1e-11). ⌈·⌉ keeps every positive weight positive. Rows of up to 2^25 candidates cannot overflow
int64 (the weights are ≤ 1).
"""

MAX_DRAW_COLUMNS = 2**25


def weight_units(w_BN: Tensor) -> Tensor:
    """The weights as int64 units of 2^-38 (``WEIGHT_UNIT_BITS``), rounded up."""
    return torch.ceil(w_BN.to(torch.float64) * float(2**WEIGHT_UNIT_BITS)).to(torch.int64)


def float_units(w_BN: Tensor) -> Tensor:
    """``weight_units`` as whole numbers in float32 when w is float32 (else int64 units).

    The same integers: w·2^38 is exact in float32 (a power-of-two scale, w ≤ 1), and so is its
    ceil. A block of ``DRAW_BLOCK`` of them sums exactly in float64 (< 2^46), so the draw
    never widens a b×N chunk to 8 bytes per weight (measured: 50× faster on our CPU for a
    chunk of 8 × 65,664 weights)."""
    if w_BN.dtype != torch.float32:
        return weight_units(w_BN)
    return torch.mul(w_BN, float(2**WEIGHT_UNIT_BITS)).ceil_()


def draw_target(u_B: Tensor, total_B: Tensor) -> Tensor:
    """The inverse-CDF target ⌊u·total⌋ in units, in [0, total − 1] (0 for an empty row): the
    first column whose cdf exceeds it is drawn. Computed from the integer total alone, so
    every rank and every form that knows the total gets the same target."""
    target_B = (u_B.to(torch.float64) * total_B.to(torch.float64)).floor().to(torch.int64)
    return torch.minimum(target_B, (total_B - 1).clamp_min(0))


def unit_cdf(q_BN: Tensor, block: int = DRAW_BLOCK) -> Tensor:
    """Cumulative sums of the column blocks of ``q_BN`` (units: int64, or whole-number
    floats from ``float_units``), in int64; the last is the total."""
    assert q_BN.shape[1] < MAX_DRAW_COLUMNS, q_BN.shape
    return block_reduce(q_BN, block, "sum").to(torch.int64).cumsum(dim=1)


def draw_in_units(
    q_BN: Tensor, target_B: Tensor, cdf_Bb: Tensor | None = None, block: int = DRAW_BLOCK
) -> Tensor:
    """The first column whose cumulative sum of ``q_BN`` (units, as ``unit_cdf``) exceeds
    ``target_B``.

    Two levels, so no B×N cumulative sum is written: the block cdf (``unit_cdf``, computed
    here if not given), the first block whose cdf exceeds the target, then the cumulative sum
    inside that block. A zero-weight column is never returned while target < total (its cdf
    equals its left neighbour's). A row with target ≥ total returns an arbitrary column.
    """
    n = q_BN.shape[1]
    if cdf_Bb is None:
        cdf_Bb = unit_cdf(q_BN, block)
    blk_B = torch.searchsorted(cdf_Bb, target_B[:, None], right=True).squeeze(1)
    blk_B = blk_B.clamp_max(cdf_Bb.shape[1] - 1)
    before_B = torch.where(
        blk_B > 0, cdf_Bb.gather(1, (blk_B - 1).clamp_min(0)[:, None]).squeeze(1), 0
    )
    q_Bc = block_columns(q_BN, blk_B, block, 0).to(torch.int64)
    cdf_Bc = torch.cat([before_B[:, None], q_Bc], dim=1).cumsum(dim=1)[:, 1:]
    j_B = torch.searchsorted(cdf_Bc.contiguous(), target_B[:, None], right=True).squeeze(1)
    return (blk_B * block + j_B.clamp_max(block - 1)).clamp_max(n - 1)


def inverse_cdf_draw(w_BN: Tensor, u_B: Tensor, block: int = DRAW_BLOCK) -> tuple[Tensor, Tensor]:
    """Draw j ~ Categorical(w_i / Σ_j w_ij) per row: the first j with cdf_j > ⌊u·total⌋, the cdf
    in exact integer units (``WEIGHT_UNIT_BITS``), so the summation order does not matter.

    Returns (index_B, total_B in units, int64); a row with total 0 returns an arbitrary index
    and must use the fallback.
    """
    q_BN = float_units(w_BN)
    cdf_Bb = unit_cdf(q_BN, block)
    total_B = cdf_Bb[:, -1]
    return draw_in_units(q_BN, draw_target(u_B, total_B), cdf_Bb, block), total_B


def first_argmax(x_BN: Tensor, block: int = DRAW_BLOCK) -> tuple[Tensor, Tensor]:
    """(max, index of its first occurrence) per row, like ``x.max(dim=1)``, in two levels: block
    maxima (a plain reduction that fuses with the pass producing x) and one block scanned."""
    bmax_Bb = block_reduce(x_BN, block, "max")
    best_B = bmax_Bb.amax(dim=1)
    blk_B = (bmax_Bb == best_B[:, None]).to(torch.uint8).argmax(dim=1)
    x_Bc = block_columns(x_BN, blk_B, block, -math.inf)
    j_B = (x_Bc == best_B[:, None]).to(torch.uint8).argmax(dim=1)
    return best_B, (blk_B * block + j_B).clamp_max(x_BN.shape[1] - 1)


def hardest_violator(
    masked_sim_BN: Tensor, pos_sim_B: Tensor, margin: float
) -> tuple[Tensor, Tensor]:
    """Fallback h_i = argmax_j C_ij over unmasked columns (masked ones hold −inf), and whether
    C_ih > 0.

    The hinge C_ij = max(0, m + s_ij − s⁺_i) is increasing in s_ij within a row, so the hardest
    violator is the first most similar unmasked candidate: no B×N hinge matrix is needed. Found
    in two levels (``first_argmax``). A row with every column masked has no violator.
    """
    best_B, idx_B = first_argmax(masked_sim_BN)
    return idx_B, (margin + best_B - pos_sim_B) > 0


class Draw(NamedTuple):
    index_Bk: Tensor  # drawn candidate columns
    valid_Bk: Tensor  # False where nothing could be drawn (no violator, or window exhausted)
    fallback_B: Tensor  # the first draw used the hardest violator (weights summed to 0)
    no_violator_B: Tensor  # weights summed to 0 and no unmasked candidate violates the margin


def draw_negatives(
    w_BN: Tensor,
    u_Bk: Tensor,
    hardest_B: Tensor,
    has_violator_B: Tensor,
    columns_BN: Tensor | None = None,
) -> Draw:
    """k draws per anchor without replacement, by inverse CDF, with the fallback rule.

    First draw: from w; if the row sums to 0, all weight goes on the hardest unmasked violator
    (if there is none, the anchor is counted as "no violator" and contributes 0). Draws 2..k
    remove the previous picks and are invalid once the row's weight is exhausted.
    hardest_B, has_violator_B: from ``hardest_violator``; columns_BN: the candidate column of
    each weight when w is compacted (``window_weights``), None when w spans all candidates.
    """
    k = u_Bk.shape[1]
    pos_B, total_B = inverse_cdf_draw(w_BN, u_Bk[:, 0])
    empty_B = total_B <= 0
    positions, valids = [pos_B], [~empty_B | has_violator_B]
    if k > 1:
        w_BN = w_BN.clone()
        for t in range(1, k):  # a loop over k (small), never over anchors
            w_BN.scatter_(1, positions[-1][:, None], 0.0)
            pos_B, total_B = inverse_cdf_draw(w_BN, u_Bk[:, t])
            positions.append(pos_B)
            valids.append((total_B > 0) & ~empty_B)
    index_Bk = torch.stack(positions, dim=1)
    if columns_BN is not None:
        index_Bk = columns_BN.gather(1, index_Bk)
    index_Bk[:, 0] = torch.where(empty_B, hardest_B, index_Bk[:, 0])
    return Draw(
        index_Bk=index_Bk,
        valid_Bk=torch.stack(valids, dim=1),
        fallback_B=empty_B & has_violator_B,
        no_violator_B=empty_B & ~has_violator_B,
    )


def listed_draw(
    w_W: Tensor,
    flat_W: Tensor,
    starts_B1: Tensor,
    n: int,
    u_B: Tensor,
    hardest_B: Tensor,
    has_violator_B: Tensor,
) -> Draw:
    """``draw_negatives`` with one draw per anchor, from weights listed row by row: w_W at the
    sorted flat positions ``flat_W`` of a B × n matrix, row i's entries from ``starts_B1[i]``
    to ``starts_B1[i + 1]`` (the hard-cut window's, ``weights.window_entries``).

    The same negatives as the dense draw: one int64 running sum of the units over the list,
    and each row's target searched in its segment, is the first column whose exact cdf exceeds
    ⌊u·total⌋, as ``draw_in_units`` finds it; nothing is packed into B × m rows (measured:
    packing cost more than the rest of the draw)."""
    b = starts_B1.shape[0] - 1
    zero = torch.zeros(1, dtype=torch.int64, device=w_W.device)
    cdf_W1 = torch.cat([zero, float_units(w_W).to(torch.int64).cumsum(0)])
    base_B = cdf_W1[starts_B1[:-1]]
    total_B = cdf_W1[starts_B1[1:]] - base_B
    target_B = draw_target(u_B, total_B)
    # the first entry whose cdf exceeds base + target (an empty row: any, replaced below)
    entry_B = torch.searchsorted(cdf_W1, base_B + target_B, right=True) - 1
    entry_B = entry_B.clamp(0, max(flat_W.shape[0] - 1, 0))
    row_start_B = torch.arange(b, device=w_W.device) * n
    index_B = (flat_W.take(entry_B) - row_start_B) if flat_W.numel() else row_start_B * 0
    empty_B = total_B <= 0
    index_B = torch.where(empty_B, hardest_B, index_B)
    return Draw(
        index_Bk=index_B[:, None],
        valid_Bk=(~empty_B | has_violator_B)[:, None],
        fallback_B=empty_B & has_violator_B,
        no_violator_B=empty_B & ~has_violator_B,
    )

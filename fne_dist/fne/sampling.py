"""The weighted negative draw and its fallbacks (fne-algorithm.md §2 steps 5 and 7).

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


def inverse_cdf_draw(w_BN: Tensor, u_B: Tensor) -> tuple[Tensor, Tensor]:
    """Draw j ~ Categorical(w_i / Σ_j w_ij) per row: the first j with cdf_j > u·total.

    A zero-weight column is never returned while the row total is positive: its cdf equals its
    left neighbour's, so it can never be the first to exceed the target. Returns (index_B,
    total_B); a row with total 0 returns an arbitrary index and must use the fallback.
    """
    cdf_BN = w_BN.cumsum(dim=1)
    total_B = cdf_BN[:, -1]
    # Keep the target strictly below the total: u·total can round up to it for u near 1, and
    # then no cdf entry would exceed it.
    target_B = torch.minimum(u_B.to(cdf_BN.dtype) * total_B, torch.nextafter(total_B, 0 * total_B))
    idx_B = torch.searchsorted(cdf_BN, target_B[:, None], right=True).squeeze(1)
    return idx_B.clamp_max(w_BN.shape[1] - 1), total_B


def hardest_violator(
    sim_BN: Tensor, mask_BN: Tensor, pos_sim_B: Tensor, margin: float
) -> tuple[Tensor, Tensor]:
    """Fallback h_i = argmax_j C_ij over unmasked columns, and whether C_ih > 0.

    The hinge C_ij = max(0, m + s_ij − s⁺_i) is increasing in s_ij within a row, so the hardest
    violator is the most similar unmasked candidate: no B×N hinge matrix is needed. A row with
    every column masked gets −inf and no violator.
    """
    best_B, idx_B = sim_BN.masked_fill(mask_BN, -math.inf).max(dim=1)
    return idx_B, (margin + best_B - pos_sim_B) > 0


class Draw(NamedTuple):
    index_Bk: Tensor  # drawn candidate columns
    valid_Bk: Tensor  # False where nothing could be drawn (no violator, or window exhausted)
    fallback_B: Tensor  # the first draw used the hardest violator (weights summed to 0)
    no_violator_B: Tensor  # weights summed to 0 and no unmasked candidate violates the margin


def draw_negatives(w_BN: Tensor, u_Bk: Tensor, hardest_B: Tensor, has_violator_B: Tensor) -> Draw:
    """k draws per anchor without replacement, by inverse CDF, with the fallback rule.

    First draw: from w; if the row sums to 0, all weight goes on the hardest unmasked violator
    (if there is none, the anchor is counted as "no violator" and contributes 0). Draws 2..k
    remove the previous picks and are invalid once the row's weight is exhausted.
    hardest_B, has_violator_B: from ``hardest_violator``.
    """
    k = u_Bk.shape[1]
    idx_B, total_B = inverse_cdf_draw(w_BN, u_Bk[:, 0])
    empty_B = total_B <= 0
    indices, valids = [torch.where(empty_B, hardest_B, idx_B)], [~empty_B | has_violator_B]
    if k > 1:
        w_BN = w_BN.clone()
        for t in range(1, k):  # a loop over k (small), never over anchors
            w_BN.scatter_(1, indices[-1][:, None], 0.0)
            idx_B, total_B = inverse_cdf_draw(w_BN, u_Bk[:, t])
            indices.append(idx_B)
            valids.append((total_B > 0) & ~empty_B)
    return Draw(
        index_Bk=torch.stack(indices, dim=1),
        valid_Bk=torch.stack(valids, dim=1),
        fallback_B=empty_B & has_violator_B,
        no_violator_B=empty_B & ~has_violator_B,
    )

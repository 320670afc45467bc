"""``fne.fn_signal: tail``: a false negative is a candidate far in the upper tail of *its
anchor's own* image-image similarities (a per-anchor robust z-score), for rare false negatives.

Legend: B anchors, N candidates [batch ; memory].

Why: ``fn_signal: intra`` fits one two-component mixture to image-image similarities pooled
over random (anchor, candidate) pairs. Where false negatives are rare (emoji: family mates
are 0.6 % of the candidates) the few that a random sample holds cannot form a component, EM
absorbs part of the bulk instead (fitted π 0.16), and P_fn > ε had precision and recall 0.12.
Yet the family mates sit at 0.96 ± 0.03 against 0.57 ± 0.12 for the rest: far out in the
upper tail of each anchor's candidates. When false negatives are rare the bulk of an anchor's
N candidates *is* the null, so the anchor's own candidates define it, with no fit at all:

    x_ij = img_i · img_j                                   (the intra signal)
    m_i  = median_j x_ij,   d_i = 1.4826 · median_j |x_ij − m_i|     (over valid candidates)
    z_ij = (x_ij − m_i) / max(d_i, D_MIN)
    L_ij = k · (z_ij − z₀),   P_fn = sigmoid(L_ij)          (k = fne.tail_slope, z₀ = fne.tail_z)

Median and scaled MAD rather than mean and sd: they estimate the null's centre and scale even
when a sizeable share of the candidates are false negatives (the breakdown point is 50 %), so
the same rule still works where false negatives are dense (bench synthetic set, ~10 %); the
1.4826 makes d the sd of a Gaussian null. With ε = 0.5, P_fn > ε ⇔ z > z₀. Under a Gaussian
null, P(z > 3) = 0.13 %: about 1.4 false alarms among ~1,000 candidates against ~6 emoji
family mates. Per anchor, so an anchor in a dense region of the image space (high median) is
not flagged wholesale, as one pooled threshold would. Per row over the candidates every rank
holds identically, so nothing crosses ranks; never-written memory slots and the anchor's own
id (its image is the anchor's) are left out of m and d.

``fn_signal: tail_both``: z_ij = max(z_ij(image-image), z_ij(text-text)), each robust z as
above. Why (measured, emoji, fne_tail): P_fn > ε caught 0.6-0.75 of the family mates, yet they
stayed ~47 % of the drawn negatives, also with flagged candidates eliminated (τ_fn 20). Family
mates share the anchor's caption, so in i2t their cross-modal similarity equals s⁺ exactly and
the kernel weight exp(−τ_k (s − s⁺)²) is at its maximum; the hypothesis was that the mates the
image test misses take the draws. A duplicate (or near-duplicate) caption is a false negative
whatever the images look like, and its text-text similarity is an extreme outlier of the
anchor's row. The max is an OR of the two tail tests. Measured: recall rose (68 → 81 %) but
the drawn share did not; the cause was the empty-window fallback (``fne.fallback``).
"""

from __future__ import annotations

import torch
from torch import Tensor

MAD_TO_SD = 1.4826  # sd / MAD of a Gaussian: d estimates the null's sd
D_MIN = 1e-3  # scale floor: a row of identical similarities must not divide by 0


def robust_z(intra_bN: Tensor, null_bN: Tensor) -> Tensor:
    """z_ij = (x_ij − median_i) / (1.4826 · MAD_i) per row, the median and MAD over the entries
    where ``null_bN`` holds (float64; a row with none: z = 0). No host sync."""
    x = intra_bN.detach().to(torch.float64)
    masked = torch.where(null_bN, x, torch.nan)
    med_b = masked.nanmedian(dim=1, keepdim=True).values
    mad_b = (masked - med_b).abs().nanmedian(dim=1, keepdim=True).values
    scale_b = (MAD_TO_SD * mad_b).nan_to_num(1.0).clamp_min(D_MIN)
    return ((x - med_b.nan_to_num(0.0)) / scale_b).nan_to_num(0.0)


def tail_log_odds(
    intra_bN: Tensor, null_bN: Tensor, z0: float, slope: float, text_bN: Tensor | None = None
) -> Tensor:
    """L = slope · (z − z0) of every pair (module doc), float64; with ``text_bN``
    (``tail_both``), z is the larger of the image-image and the text-text robust z."""
    z = robust_z(intra_bN, null_bN)
    if text_bN is not None:
        z = torch.maximum(z, robust_z(text_bN, null_bN))
    return slope * (z - z0)

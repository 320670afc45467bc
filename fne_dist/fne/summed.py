"""FN elimination over every negative (``fne.loss: fne_sum``): vse0's sum of hinges, each
candidate weighted by the posterior's probability of being a true negative.

Legend: b anchors, N candidates ([gathered batch ; memory], or the batch block with
``fne.sum_scope: batch``).

    t_ij = 1 − P_fn(i, j)                 sum_weight one_minus (the probability of a true negative)
         = exp(−τ_fn P_fn(i, j))          sum_weight exp (FNE's FN weight, in [e^−τ_fn, 1])
         = 1[P_fn(i, j) ≤ ε]              sum_weight hard (drop the flagged candidates)
    t_ij = 1 while the gate is closed (the posterior is not trusted yet, as in FNE's sampler)
    w_ij = t_ij · k_ij · c_ij,   k_ij = exp(−τ_k (s_ij − s⁺_i)²) if sum_kernel else 1,
                                 c_ij = 1[s_ij > μ⁺ − margin] if sum_cut else 1
    loss = mean_i Σ_j w_ij · max(0, m + s_ij − s⁺_i)   over unmasked candidates, per direction

Why: a sampled loss learns from one negative per anchor, so one false negative drawn is the
whole gradient of that anchor; vse0 learns from every violator and the false negatives wash
out when they are a small share of the sum. Weighting the sum by P(true negative) keeps vse0's
many-violator signal and removes the false negatives' share of it. The weights carry no
gradient (computed under no_grad, like the sampler's); the hinges are differentiated through
the b×N similarity matrix, as vse0's.

``fne.reference_sum`` (in the tests) writes the same loss one candidate at a time.
Pure tensor functions: no collectives, no host syncs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .detection import dense_detection
from .groups import labelled, same_group
from .params import FneConfig
from .posterior import fn_log_odds_threshold
from .posteriors import PairSims, fit_of
from .selection import negative_mask
from .stats import Gaussians
from .weights import cut_threshold


@dataclass(frozen=True)
class SumSide:
    """One direction's candidates and what the weights read: the candidates' embeddings in the
    other modality (with gradient through the anchors only), their ids and groups, and the
    images of anchors and candidates (a posterior of the image-image similarity)."""

    cand_ND: Tensor
    ids_N: Tensor
    groups_N: Tensor | None
    anchor_img_BD: Tensor
    cand_img_ND: Tensor


def true_negative_weights(
    sim_BN: Tensor, pos_sim_B: Tensor, log_odds_BN: Tensor, g: Gaussians, cfg: FneConfig
) -> Tensor:
    """w_BN of the module docstring before masking (no gradient; any shape that broadcasts)."""
    p_fn = log_odds_BN.sigmoid()
    flagged = log_odds_BN > fn_log_odds_threshold(cfg.eps)
    if cfg.sum_weight == "one_minus":
        t = 1.0 - p_fn
    elif cfg.sum_weight == "exp":
        t = torch.exp(-cfg.tau_fn * p_fn)
    else:  # hard
        t = (~flagged).to(sim_BN.dtype)
    w = torch.where(g.gate_open, t, torch.ones_like(t))
    if cfg.sum_kernel:
        w = w * torch.exp(-cfg.tau_kernel * (sim_BN - pos_sim_B[:, None]).square())
    if cfg.sum_cut:
        w = w.masked_fill(sim_BN <= cut_threshold(g, cfg.cut_margin, sim_BN.dtype), 0.0)
    return w


def weighted_sum_of_hinges(
    anchor_BD: Tensor,
    side: SumSide,
    ids_B: Tensor,
    pos_col_B: Tensor,
    groups_B: Tensor | None,
    g: Gaussians,
    cfg: FneConfig,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One direction: mean over anchors of Σ_j w_ij hinge_ij, and diagnostic sums (0-dim)."""
    sim_BN = anchor_BD @ side.cand_ND.T
    pos_B = sim_BN.gather(1, pos_col_B[:, None]).squeeze(1)
    oracle_groups = groups_B if cfg.mask_groups else None
    mask_BN = negative_mask(ids_B, pos_col_B, side.ids_N, oracle_groups, side.groups_N)
    with torch.no_grad():
        s_BN, p_B = sim_BN.detach(), pos_B.detach()
        fit = fit_of(g, cfg.prior)
        pairs = PairSims(s_BN, side.anchor_img_BD.detach(), side.cand_img_ND.detach())
        odds_BN = fit.log_odds(pairs).to(s_BN.dtype)
        w_BN = true_negative_weights(s_BN, p_B, odds_BN, g, cfg).masked_fill(mask_BN, 0.0)
    hinge_BN = F.relu(cfg.margin + sim_BN - pos_B[:, None])
    loss = (hinge_BN * w_BN).sum(1).mean()
    with torch.no_grad():
        f64 = torch.float64
        unmasked = ~mask_BN
        violator = (hinge_BN.detach() > 0) & unmasked
        sums = {
            "fn": ((odds_BN > fn_log_odds_threshold(cfg.eps)) & unmasked).sum().to(f64),
            "unmasked": unmasked.sum().to(f64),
            "violators": violator.sum().to(f64),
            "weight": (w_BN * violator).sum().to(f64),
        }
        if groups_B is not None and side.groups_N is not None:
            same = same_group(groups_B[:, None], side.groups_N[None, :])
            known = labelled(groups_B)[:, None] & labelled(side.groups_N)[None, :]
            vw = (w_BN * violator).to(f64)
            sums["same_group"] = (vw * same).sum()  # weighted violators that are group mates
            sums["labelled"] = (vw * known).sum()
            window = (
                s_BN > cut_threshold(g, cfg.cut_margin, s_BN.dtype)
                if cfg.sum_cut
                else torch.ones_like(mask_BN)
            )
            labels = (groups_B, side.groups_N)
            det = dense_detection(s_BN, mask_BN, labels, window, g, cfg, True, odds_BN)
            sums["detection"] = det.sum(0)
    return loss, sums


def summed_diagnostics(s: dict[str, Tensor], columns: tuple[str, ...]) -> dict[str, Tensor]:
    """The two directions' sums (already added) as the loss's diagnostics."""
    diag = {
        "frac_pfn_gt_eps": s["fn"] / s["unmasked"].clamp_min(1.0),
        # mean weight of a violating candidate: how much of vse0's sum the posterior keeps
        "mean_violator_weight": s["weight"] / s["violators"].clamp_min(1.0),
    }
    if "same_group" in s:
        n = s["labelled"]
        share = s["same_group"] / n.clamp_min(1e-12)
        diag["frac_neg_same_group"] = torch.where(n > 0, share, math.nan)
        diag["neg_same_group"], diag["neg_labelled"] = s["same_group"], n
        for i, key in enumerate(columns):
            diag[f"fnd_{key}"] = s["detection"][i]
    return diag

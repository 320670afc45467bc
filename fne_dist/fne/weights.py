"""Sampling weights of FNE and of the "window" ablation (fne-algorithm.md §4).

Legend: B anchors, N candidates.

    k(s)  = exp(−τ_k (s − s⁺)²)          kernel weight: largest for negatives as similar as s⁺
    f(s)  = exp(−τ_fn P_fn(s))            FN weight, in [e^−τ_fn, 1]: down-weights, never removes
    w     = f  where gate open and P_fn > ε   (the cut-down strategy, the paper's Figure 2)
          = k  elsewhere
    w     = 0  where s ≤ μ⁺ − margin_cut (hard cut; only once a μ⁺ exists), and on positives.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .params import FneConfig
from .stats import Gaussians


def kernel_weight(sim_BN: Tensor, pos_sim_B: Tensor, tau: float) -> Tensor:
    """exp(−τ (s − s⁺)²) per candidate."""
    return torch.exp(-tau * (sim_BN - pos_sim_B[:, None]).square())


def fn_weight(p_fn: Tensor, tau: float) -> Tensor:
    """exp(−τ P_fn) per candidate."""
    return torch.exp(-tau * p_fn)


def hard_cut_mask(sim_BN: Tensor, g: Gaussians, cut_margin: float) -> Tensor:
    """True where the hard cut zeroes a candidate: s ≤ μ⁺ − margin, once a μ⁺ exists."""
    # "no μ⁺ yet" folded into the threshold: −inf cuts nothing.
    threshold = torch.where(g.has_mu_pos, g.mu_pos - cut_margin, -math.inf).to(sim_BN.dtype)
    return sim_BN <= threshold


class Weights(NamedTuple):
    w_BN: Tensor
    n_fn_B: Tensor  # per anchor: unmasked candidates with P_fn > ε (0 for the window rule)


def sampling_weights(
    sim_BN: Tensor,
    pos_sim_B: Tensor,
    mask_BN: Tensor,
    g: Gaussians,
    cfg: FneConfig,
    rule: str = "fne",
) -> Weights:
    """Unnormalised sampling weights over candidates; rule "fne" (the paper) or "window".

    "window" is FNE without the Bayes part: uniform weight inside the hard-cut window.
    sim_BN: anchor-candidate similarities (no gradient needed); pos_sim_B: s⁺ per anchor;
    mask_BN: candidates that are never negatives (positives, and the oracle's group mates).

    This is the hot path of the sampler (about 20 passes over B×N): it works in place on its own
    temporaries, folds the gate and "no μ⁺ yet" into scalar thresholds, and evaluates the
    log-odds as one quadratic αs² + βs + γ. The plain formulas are ``kernel_weight``,
    ``fn_posterior`` and ``fn_weight`` above; the tests hold this function equal to them.
    """
    n_fn_B = torch.zeros(sim_BN.shape[0], dtype=torch.long, device=sim_BN.device)
    if rule == "window":
        exponent_BN = torch.zeros_like(sim_BN)
    elif rule == "fne":
        exponent_BN = sim_BN - pos_sim_B[:, None]
        exponent_BN.mul_(exponent_BN).mul_(-cfg.tau_kernel)  # kernel weight = exp(this)
        p_fn_BN = _log_odds_quadratic(sim_BN, g, cfg.prior)
        p_fn_BN.masked_fill_(mask_BN, -math.inf).sigmoid_()  # masked → P = 0, not counted
        is_fn_BN = p_fn_BN > cfg.eps
        n_fn_B = is_fn_BN.count_nonzero(dim=1)
        is_fn_BN &= g.gate_open
        # FN weight = exp(−τ P): one exp for both weights, through the exponent.
        exponent_BN = torch.where(is_fn_BN, p_fn_BN.mul_(-cfg.tau_fn), exponent_BN)
    else:
        raise ValueError(f"unknown sampling rule {rule!r} (valid: fne, window)")
    if cfg.hard_cut:
        exponent_BN.masked_fill_(hard_cut_mask(sim_BN, g, cfg.cut_margin), -math.inf)
    return Weights(exponent_BN.masked_fill_(mask_BN, -math.inf).exp_(), n_fn_B)


def _log_odds_quadratic(sim_BN: Tensor, g: Gaussians, prior: float) -> Tensor:
    """``fn_log_odds`` expanded to αs² + βs + γ (3 passes instead of 8); a new tensor.

    The expansion loses a few float32 ulps of the largest term when σ² is tiny; P_fn saturates
    long before that matters.
    """
    dt = sim_BN.dtype
    inv_p, inv_n = 1.0 / g.var_pos, 1.0 / g.var_neg
    log_prior_odds = math.log(prior) - math.log1p(-prior)
    beta = (g.mu_pos * inv_p - g.mu_neg * inv_n).to(dt)
    gamma = log_prior_odds + 0.5 * (torch.log(g.var_neg) - torch.log(g.var_pos))
    gamma = (gamma - 0.5 * g.mu_pos.square() * inv_p + 0.5 * g.mu_neg.square() * inv_n).to(dt)
    if g.variance == "pooled":  # α = 0 exactly, so P_fn stays monotone under rounding
        return torch.addcmul(gamma, sim_BN, beta)
    alpha = (0.5 * (inv_n - inv_p)).to(dt)
    # Horner form (αs + β)s + γ with 0-dim tensor coefficients: no host sync.
    out_BN = torch.addcmul(beta, sim_BN, alpha)
    out_BN.mul_(sim_BN).add_(gamma)
    return out_BN

"""The false-negative posterior P_fn(s) by Bayes' rule, in log space (fne-algorithm.md §4).

    P_fn(s) = π p⁺(s) / (π p⁺(s) + (1 − π) p⁻(s)) = sigmoid(L(s)),
    L(s)    = log π − log(1 − π) + log N(s; μ⁺, σ⁺²) − log N(s; μ⁻, σ⁻²).

L is computed directly (never the densities, which underflow in the tails), so far tails give
P = 0 or 1 and never NaN. With separate variances L is quadratic in s and P_fn is not monotone;
with a pooled variance the quadratic terms cancel and L is written as the linear function it is,
so P_fn is exactly monotone in s even under rounding.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .stats import Gaussians


def gaussian_log_density(s: Tensor, mu: Tensor, var: Tensor) -> Tensor:
    """log N(s; μ, σ²), elementwise."""
    return -0.5 * ((s - mu).square() / var + torch.log(2 * math.pi * var))


def fn_log_odds(sim: Tensor, g: Gaussians, prior: float) -> Tensor:
    """L(s) = logit P_fn(s), in sim's dtype; the Gaussians' float64 scalars are cast once."""
    dt = sim.dtype
    log_prior_odds = math.log(prior) - math.log1p(-prior)
    if g.variance == "pooled":
        v = g.var_pos
        slope = ((g.mu_pos - g.mu_neg) / v).to(dt)
        bias = (log_prior_odds - (g.mu_pos.square() - g.mu_neg.square()) / (2 * v)).to(dt)
        return sim * slope + bias
    bias = (log_prior_odds + 0.5 * (torch.log(g.var_neg) - torch.log(g.var_pos))).to(dt)
    inv2p = (0.5 / g.var_pos).to(dt)
    inv2n = (0.5 / g.var_neg).to(dt)
    mu_p, mu_n = g.mu_pos.to(dt), g.mu_neg.to(dt)
    return (sim - mu_n).square() * inv2n - (sim - mu_p).square() * inv2p + bias


def fn_posterior(sim: Tensor, g: Gaussians, prior: float) -> Tensor:
    """P_fn(s) in [0, 1] for every similarity in ``sim``."""
    return torch.sigmoid(fn_log_odds(sim, g, prior))

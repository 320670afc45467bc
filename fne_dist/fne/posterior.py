"""The false-negative posterior P_fn(s) by Bayes' rule, in log space (docs/algorithm.md §4).

    P_fn(s) = π p⁺(s) / (π p⁺(s) + (1 − π) p⁻(s)) = sigmoid(L(s)),
    L(s)    = log π − log(1 − π) + log N(s; μ⁺, σ⁺²) − log N(s; μ⁻, σ⁻²)
            = αs² + βs + γ.

The package's one form of L is the expanded quadratic (3 passes over the similarities instead
of 8); ``fne.reference`` states L as written above, and the tests hold the two equal. L is
computed directly (never the densities, which underflow in the tails), so far tails give P = 0
or 1 and never NaN. With separate variances P_fn is not monotone in s; with a pooled variance
α = 0 exactly, so P_fn is exactly monotone even under rounding.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .stats import Gaussians


def log_odds_coefficients(g: Gaussians, prior: float) -> tuple[Tensor, Tensor, Tensor]:
    """(α, β, γ) of L(s) = αs² + βs + γ as float64 0-dim tensors (no host sync); α = 0 if pooled.

    π is ``g.prior`` when the Gaussians carry an estimated one, else ``prior``."""
    mu_p, var_p, mu_n, var_n = (
        (g.mu_pos, g.var_pos, g.mu_neg, g.var_neg) if g.mixture is None else g.mixture
    )  # fn_model: mixture: the candidates' FN / TN components (fne.mixture)
    inv_p, inv_n = 1.0 / var_p, 1.0 / var_n
    if g.prior is None:
        log_prior_odds = math.log(prior) - math.log1p(-prior)
    else:  # a data-estimated π (prior_mode: em) replaces the configured one
        log_prior_odds = torch.log(g.prior) - torch.log1p(-g.prior)
    beta = mu_p * inv_p - mu_n * inv_n
    gamma = log_prior_odds + 0.5 * (torch.log(var_n) - torch.log(var_p))
    gamma = gamma - 0.5 * mu_p.square() * inv_p + 0.5 * mu_n.square() * inv_n
    alpha = torch.zeros_like(beta) if g.variance == "pooled" else 0.5 * (inv_n - inv_p)
    return alpha, beta, gamma


def fn_log_odds(sim: Tensor, g: Gaussians, prior: float) -> Tensor:
    """L(s) = logit P_fn(s) for every similarity, in sim's dtype; a new tensor.

    The expansion loses a few float32 ulps of the largest term when σ² is tiny; P_fn saturates
    long before that matters.
    """
    dt = sim.dtype
    alpha, beta, gamma = (t.to(dt) for t in log_odds_coefficients(g, prior))
    if g.variance == "pooled":  # α = 0 exactly, so P_fn stays monotone under rounding
        return torch.addcmul(gamma, sim, beta)
    # Horner form (αs + β)s + γ with 0-dim tensor coefficients: no host sync.
    out = torch.addcmul(beta, sim, alpha)
    return out.mul_(sim).add_(gamma)


def fn_posterior(sim: Tensor, g: Gaussians, prior: float) -> Tensor:
    """P_fn(s) in [0, 1] for every similarity in ``sim``."""
    return torch.sigmoid(fn_log_odds(sim, g, prior))


def fn_log_odds_threshold(eps: float) -> float:
    """logit(ε): P_fn > ε exactly where the log-odds exceed it (sigmoid is increasing)."""
    return math.log(eps) - math.log1p(-eps) if eps > 0 else -math.inf

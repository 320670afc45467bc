"""The paper's false-negative posterior P_fn(s) by Bayes' rule, in log space (docs/algorithm.md §4).

    P_fn(s) = π p⁺(s) / (π p⁺(s) + (1 − π) p⁻(s)) = sigmoid(L(s)),
    L(s)    = log π − log(1 − π) + log N(s; μ⁺, σ⁺²) − log N(s; μ⁻, σ⁻²)
            = αs² + βs + γ.

The package's one form of L is the expanded quadratic (3 passes over the similarities instead
of 8); ``fne.reference`` states L as written above, and the tests hold the two equal. L is
computed directly (never the densities, which underflow in the tails), so far tails give P = 0
or 1 and never NaN. With separate variances P_fn is not monotone in s; with a pooled variance
α = 0 exactly, so P_fn is exactly monotone even under rounding. The other posteriors
(``fne.posteriors``) reuse the quadratic where theirs is one too.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .stats import Gaussians


def quadratic_coefficients(
    mu_p: Tensor,
    var_p: Tensor,
    mu_n: Tensor,
    var_n: Tensor,
    log_prior_odds: Tensor | float,
    pooled: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(α, β, γ) of L(s) = log π/(1−π) + log N(s; μ_p, σ_p²) − log N(s; μ_n, σ_n²), expanded;
    α = 0 if pooled."""
    inv_p, inv_n = 1.0 / var_p, 1.0 / var_n
    beta = mu_p * inv_p - mu_n * inv_n
    gamma = log_prior_odds + 0.5 * (torch.log(var_n) - torch.log(var_p))
    gamma = gamma - 0.5 * mu_p.square() * inv_p + 0.5 * mu_n.square() * inv_n
    alpha = torch.zeros_like(beta) if pooled else 0.5 * (inv_n - inv_p)
    return alpha, beta, gamma


def quadratic_log_odds(
    sim: Tensor, coefficients: tuple[Tensor, Tensor, Tensor], pooled: bool
) -> Tensor:
    """αs² + βs + γ for every similarity, in sim's dtype; a new tensor.

    The expansion loses a few float32 ulps of the largest term when σ² is tiny; P_fn saturates
    long before that matters.
    """
    dt = sim.dtype
    alpha, beta, gamma = (t.to(dt) for t in coefficients)
    # addcmul(c, s, a) = c + a·s, rounded once (fused). With two 0-dim operands ATen's CPU loop
    # is the scalar one (~4× slower than the vector loop, measured at 8 × 65,664); filling the
    # output with c and adding in place takes the vector loop, with the same fused values.
    if pooled:  # α = 0 exactly, so P_fn stays monotone under rounding
        return torch.empty_like(sim).fill_(gamma).addcmul_(sim, beta)
    # Horner form (αs + β)s + γ with 0-dim tensor coefficients: no host sync.
    out = torch.empty_like(sim).fill_(beta).addcmul_(sim, alpha)
    return out.mul_(sim).add_(gamma)


def log_odds_coefficients(g: Gaussians, prior: float) -> tuple[Tensor, Tensor, Tensor]:
    """(α, β, γ) of the paper's L(s) as float64 0-dim tensors (no host sync); α = 0 if pooled."""
    log_prior_odds = math.log(prior) - math.log1p(-prior)
    pooled = g.variance == "pooled"
    return quadratic_coefficients(g.mu_pos, g.var_pos, g.mu_neg, g.var_neg, log_prior_odds, pooled)


def fn_log_odds(sim: Tensor, g: Gaussians, prior: float) -> Tensor:
    """The paper's L(s) = logit P_fn(s) for every similarity, in sim's dtype; a new tensor."""
    return quadratic_log_odds(sim, log_odds_coefficients(g, prior), g.variance == "pooled")


def fn_posterior(sim: Tensor, g: Gaussians, prior: float) -> Tensor:
    """The paper's P_fn(s) in [0, 1] for every similarity in ``sim``."""
    return torch.sigmoid(fn_log_odds(sim, g, prior))


def fn_log_odds_threshold(eps: float) -> float:
    """logit(ε): P_fn > ε exactly where the log-odds exceed it (sigmoid is increasing)."""
    return math.log(eps) - math.log1p(-eps) if eps > 0 else -math.inf

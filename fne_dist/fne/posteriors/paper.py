"""``fne.posterior: paper``: the paper's P_fn (docs/algorithm.md §4), a fixed prior π = fne.prior
and the two running Gaussians of the cross-modal similarity:

    L(s) = log π − log(1 − π) + log N(s; μ⁺, σ⁺²) − log N(s; μ⁻, σ⁻²) = αs² + βs + γ.

``fne.posterior`` (the module beside this package) holds the closed form; ``fne.reference``
states it as written above, and the tests hold the two equal.
"""

from __future__ import annotations

from torch import Tensor

from ..posterior import log_odds_coefficients
from ..stats import Gaussians
from .base import Posterior, PosteriorFit, QuadraticFit


def paper_fit(g: Gaussians, prior: float) -> QuadraticFit:
    """The paper's posterior of the Gaussians ``g`` with prior ``prior``."""
    return QuadraticFit(*log_odds_coefficients(g, prior), pooled=g.variance == "pooled")


def fit_of(g: Gaussians, prior: float) -> PosteriorFit:
    """The posterior ``g`` carries, or the paper's when it carries none (hand-built Gaussians)."""
    return paper_fit(g, prior) if g.posterior is None else g.posterior


class PaperPosterior(Posterior):
    name = "paper"

    def fit(self, g: Gaussians, totals: Tensor, state: Tensor | None = None) -> QuadraticFit:
        return paper_fit(g, self.cfg.prior)


def quadratic_fit_of(g: Gaussians, prior: float) -> QuadraticFit:
    """``fit_of`` where the caller has only the cross-modal similarities (the window forms)."""
    fit = fit_of(g, prior)
    if not isinstance(fit, QuadraticFit):
        raise TypeError(f"{type(fit).__name__} is not a function of s: pass its log-odds")
    return fit

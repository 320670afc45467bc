"""``fne.posterior: cross_mixture``: P_fn from a two-component mixture fitted to the cross-modal
similarities of random candidates (``fne.mixture``: π and both components from data), instead
of the paper's positive-pair Gaussian with a fixed π:

    L(s) = log π − log(1 − π) + log N(s; μ_f, σ_f²) − log N(s; μ_t, σ_t²),

a quadratic in s like the paper's (separate variances). The hard cut and the gate stay the
paper's (μ⁺ and n⁺ of ``fne.stats_source``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..mixture import Mixture, histogram, refit
from ..null_mixture import (
    NullMixture,
    null_diagnostics,
    null_log_odds,
)
from ..posterior import quadratic_coefficients
from ..stats import Gaussians
from .base import CandidateSample, PairSims, Posterior, PosteriorFit, QuadraticFit


class MixtureFit(QuadraticFit):
    """The quadratic log-odds of a fitted cross-modal mixture."""

    def __init__(self, m: Mixture) -> None:
        log_prior_odds = torch.log(m.prior) - torch.log1p(-m.prior)
        coefficients = quadratic_coefficients(
            m.mu_fn, m.var_fn, m.mu_tn, m.var_tn, log_prior_odds, pooled=False
        )
        super().__init__(*coefficients, pooled=False)
        self.mixture = m

    def diagnostics(self) -> dict[str, Tensor]:
        m = self.mixture
        return {"prior": m.prior, "mu_fn": m.mu_fn, "sigma_fn": m.var_fn.sqrt(),
                "mu_tn": m.mu_tn, "sigma_tn": m.var_tn.sqrt()}  # fmt: skip


class CrossNullFit(PosteriorFit):
    """L(s) under a mixture with a J-component null (``fne.mixture_null_components`` ≥ 2;
    ``fne.null_mixture``): not a quadratic in s, so the sampler evaluates it on every pair."""

    def __init__(self, m: NullMixture) -> None:
        self.mixture = m

    def log_odds(self, pairs: PairSims) -> Tensor:
        return null_log_odds(pairs.sim_bN, self.mixture)

    def diagnostics(self) -> dict[str, Tensor]:
        return null_diagnostics(self.mixture)


class CrossMixturePosterior(Posterior):
    name = "cross_mixture"
    samples = True

    def sums(self, sample: CandidateSample) -> Tensor:
        """This step's histogram of the sampled cross-modal similarities."""
        return histogram(sample.cross_S, sample.valid_S)

    def fit(self, g: Gaussians, totals: Tensor, state: Tensor | None = None) -> PosteriorFit:
        null = self.null_fit(totals, state)
        if null is None:
            return MixtureFit(refit(totals, self.cfg.var_floor))
        fit = CrossNullFit(null[0])
        fit.state = null[1]
        return fit

"""``fne.posterior: intra_mixture``: P_fn from the image-image similarity of anchor and
candidate, x_ij = img_i · img_j, through a two-component mixture fitted to x of random
candidates exactly as ``cross_mixture`` fits the cross-modal one (``fne.mixture``).

Why (bench/fn_signals.py, bench generator, last epoch of the paper's form): inside the
hard-cut window, where the sampler draws, the cross-modal similarity hardly separates false
from true negatives (AUC 0.61), so any P_fn of it alone cannot lower the share of false
negatives drawn; the image-image similarity separates them well (AUC 0.81 in the window, 0.89
overall). Every candidate carries its momentum image embedding and every anchor its online
one, so x is the same for the i2t and the t2i direction. With the fit m = (π, μ_f, σ_f², μ_t,
σ_t²):

    L_ij = logit π + log N(x_ij; μ_f, σ_f²) − log N(x_ij; μ_t, σ_t²).

Not a function of s: the sampler evaluates it on every pair (the dense form). Nor of the
direction: the sampler computes it once per block of anchors for both directions
(``direction_free``).
"""

from __future__ import annotations

import math

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
from .base import CandidateSample, PairSims, Posterior, PosteriorFit


def intra_candidate_sims(sample: CandidateSample) -> Tensor:
    """Image-image similarities of each anchor with the sample's random candidates (both
    directions' columns), flattened like ``sample.cross_S`` (2·B·r, float64)."""
    cols_2Br = sample.cols_2Br.to(sample.img_BD.device)
    with torch.no_grad():
        x = torch.einsum("bd,tbrd->tbr", sample.img_BD.detach(), sample.cand_img_ND[cols_2Br])
    return x.to(torch.float64).flatten()


def log_likelihood_ratio(v: Tensor, m: Mixture) -> Tensor:
    """Λ(v) = log N(v; μ_f, σ_f²) − log N(v; μ_t, σ_t²), element-wise in float64."""
    v = v.to(torch.float64)
    f = -0.5 * ((v - m.mu_fn).square() / m.var_fn + torch.log(m.var_fn))
    t = -0.5 * ((v - m.mu_tn).square() / m.var_tn + torch.log(m.var_tn))
    return f - t


ODDS_SLICE = 1 << 16
"""Elements per slice of the float64 log-odds: a b×N float64 temporary of the whole block
(67 MB per temporary at 128 × 65,664) is written to memory, and freshly mapped, by each of the
formula's dozen passes; slices of 2^16 (512 KB) stay in cache: 20× faster on our CPU, and the
same bits (each element's float64 operations are the same ones)."""


class IntraFit(PosteriorFit):
    """L of the image-image similarity under a fitted mixture (computed in float64, returned in
    the dtype of the pairs' cross-modal similarities). A quadratic in x
    (``signal_quadratic``)."""

    direction_free = True
    signal_quadratic = True

    def __init__(self, m: Mixture) -> None:
        self.mixture = m

    def log_odds(self, pairs: PairSims) -> Tensor:
        x_bN = self.pair_signal(pairs.anchor_img_bD, pairs.cand_img_ND)
        return self.signal_log_odds(x_bN, pairs.sim_bN.dtype)

    def pair_signal(self, anchor_img_bD: Tensor, cand_img_ND: Tensor) -> Tensor:
        return anchor_img_bD.detach() @ cand_img_ND.T

    def signal_log_odds(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        m = self.mixture
        logit_prior = torch.log(m.prior) - torch.log1p(-m.prior)
        odds = torch.empty(x.shape, dtype=dtype, device=x.device)
        x_E, odds_E = x.reshape(-1), odds.view(-1)
        for e0 in range(0, x_E.numel(), ODDS_SLICE):
            part = slice(e0, e0 + ODDS_SLICE)
            odds_E[part] = log_likelihood_ratio(x_E[part], m).add_(logit_prior)
        return odds

    def signal_coefficients(self) -> tuple[Tensor, Tensor, Tensor]:
        m = self.mixture
        logit_prior = torch.log(m.prior) - torch.log1p(-m.prior)
        return quadratic_coefficients(m.mu_fn, m.var_fn, m.mu_tn, m.var_tn, logit_prior, False)

    def max_signal_log_odds(self) -> float:
        """sup over x of L(x) plus a bound on its rounding, for α < 0 (else +inf).

        Both evaluations of L (``signal_fn_count``'s float32 quadratic, ``signal_log_odds``'s
        float64 formula rounded to float32) lie within δ·(A x² + B |x| + C) of the exact L(x),
        δ = 2^-16 far above their few-ulp rounding: A, B, C bound the magnitudes of their terms
        (the expanded coefficients and the formula's (x − μ)²/2σ² ≤ (x² + μ²)/σ², logs and the
        prior's logit). So L̂(x) ≤ (α + δA)x² + (|β| + δB)|x| + γ + δC, whose supremum over x
        is γ + δC + (|β| + δB)² / 4|α + δA| when α + δA < 0."""
        m = self.mixture
        alpha, beta, gamma = (float(c) for c in self.signal_coefficients())
        inv_f, inv_t = 1.0 / float(m.var_fn), 1.0 / float(m.var_tn)
        mu_f, mu_t = float(m.mu_fn), float(m.mu_tn)
        prior = float(m.prior)
        logs = abs(math.log(float(m.var_fn))) + abs(math.log(float(m.var_tn)))
        logit = abs(math.log(prior) - math.log1p(-prior))
        delta = 2.0**-16
        a = alpha + delta * (abs(alpha) + inv_f + inv_t)
        b = abs(beta) + delta * (abs(beta) + abs(mu_f) * inv_f + abs(mu_t) * inv_t)
        c = gamma + delta * (abs(gamma) + mu_f**2 * inv_f + mu_t**2 * inv_t + logs + logit + 1.0)
        if not a < 0 or not math.isfinite(b) or not math.isfinite(c):
            return math.inf
        return c + b * b / (4.0 * -a)

    def diagnostics(self) -> dict[str, Tensor]:
        m = self.mixture
        return {"prior_intra": m.prior, "mu_fn_intra": m.mu_fn, "sigma_fn_intra": m.var_fn.sqrt(),
                "mu_tn_intra": m.mu_tn, "sigma_tn_intra": m.var_tn.sqrt()}  # fmt: skip


class IntraNullFit(PosteriorFit):
    """L of the image-image similarity under a mixture with a J-component null
    (``fne.mixture_null_components`` ≥ 2; ``fne.null_mixture``)."""

    def __init__(self, m: NullMixture) -> None:
        self.mixture = m

    def log_odds(self, pairs: PairSims) -> Tensor:
        return null_log_odds(pairs.anchor_img_bD.detach() @ pairs.cand_img_ND.T, self.mixture)

    def diagnostics(self) -> dict[str, Tensor]:
        return null_diagnostics(self.mixture, "_intra")


class IntraMixturePosterior(Posterior):
    name = "intra_mixture"
    samples = True

    def sums(self, sample: CandidateSample) -> Tensor:
        """This step's histogram of the sampled image-image similarities."""
        return histogram(intra_candidate_sims(sample), sample.valid_S)

    def fit(self, g: Gaussians, totals: Tensor, state: Tensor | None = None) -> PosteriorFit:
        null = self.null_fit(totals, state)
        if null is None:
            return IntraFit(refit(totals, self.cfg.var_floor))
        fit = IntraNullFit(null[0])
        fit.state = null[1]
        return fit

"""The two-component mixture of the ``cross_mixture`` and ``intra_mixture`` posteriors
(``fne.posteriors``), fitted to the candidates themselves (online EM), instead of the paper's
positive-pair Gaussian.

Legend: S sampled candidate similarities (anchor, random candidate of [batch ; memory]).

Why: the paper's P_fn treats a false negative as distributed like a *positive pair*,
N(μ⁺, σ⁺²). Measured on bench/quality.py's generator (10 classes, last epoch of ``fne``):
positives 0.57 ± 0.10, false negatives (same class) 0.24 ± 0.18, true negatives −0.02 ± 0.20,
against the paper's fit μ⁺ 0.60 σ⁺ 0.08 / μ⁻ 0.43 σ⁻ 0.09. A same-class candidate is far less
similar than a paired caption, three σ⁺ below μ⁺, so P_fn(s) ≈ 0 for nearly all of them whatever
π is (recall of P_fn > ε ≤ 1 %), and an EM for π alone with the positive Gaussian as the
"match" component collapses π (it explains nothing). This option fits what the candidates
look like:

    s ~ π N(μ_f, σ_f²) + (1 − π) N(μ_t, σ_t²)        (f: false negatives, t: true negatives)
    P_fn(s) = π N(s; μ_f, σ_f²) / (π N(s; μ_f, σ_f²) + (1 − π) N(s; μ_t, σ_t²))

with all five parameters estimated from data. The data are the random candidates that
``fne.estimators.random_candidate_sims`` draws each step (anchor vs a uniform column of
[batch ; memory], both directions), kept as a histogram of ``HIST_BINS`` bins over [−1, 1]:
a vector of sums, so it all-reduces (SUM) through the same path as the paper's six sums, and
every rank holds the same one. It is an exponentially decayed running total, H ← γ·H + h
(γ = ``fne.mixture_decay``): the embedding space moves during training, so old samples are
forgotten rather than reset at epoch boundaries. Each step fits the histogram (bin centres
weighted by counts; binning moves a similarity by at most half a bin, 0.005) with
``FIT_ITERS`` = 20 EM iterations from the moment start below: a fixed count, so no host sync.

Measured, and why 20 iterations from the moment start: on this marginal the two components
overlap so much that the likelihood is nearly flat along π (bench generator, last epoch:
truth π 0.10, FN 0.25 ± 0.18, TN −0.02 ± 0.20; EM on the same histogram after 20 / 50 / 200 /
1000 iterations: π 0.11 / 0.13 / 0.19 / 0.35). So this is an early-stopped, start-anchored
(regularised) estimate, not the maximum likelihood one; warm-starting each step from the
last fit let it drift to π = 0.5 within an epoch, and a stepwise EM (one E-step per training
step) moved by only (1 − γ) per step. Each variance is floored at ``MIN_VAR_SHARE`` of the
sample's, because a component collapsing onto one bin has unbounded likelihood (seen: σ_f → 0).

The component with the larger mean is the false negative one (EM is symmetric in the labels).
Moment start: μ_t = mean, μ_f = mean + sd, σ_f = σ_t = sd, π = 0.1.

The hard cut keeps the paper's μ⁺ (positives), so only the posterior changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

INIT_PRIOR = 0.1  # the moment start's π (a start for EM, not an estimate)
HIST_BINS = 200  # bins of the candidate-similarity histogram over [−1, 1] (width 0.01)
FIT_ITERS = 20  # EM iterations per step on the histogram (warm-started)
MIN_VAR_SHARE = 0.1  # each component's variance ≥ this share of the whole sample's
MIX_PRIOR_MIN, MIX_PRIOR_MAX = 1e-6, 0.5


@dataclass(frozen=True)
class Mixture:
    """π and the two components (0-dim float64 tensors)."""

    prior: Tensor
    mu_fn: Tensor
    var_fn: Tensor
    mu_tn: Tensor
    var_tn: Tensor


def _log_normal(s: Tensor, mu: Tensor, var: Tensor) -> Tensor:
    return -0.5 * ((s - mu).square() / var + torch.log(2 * torch.pi * var))


def responsibilities(sims_S: Tensor, m: Mixture) -> Tensor:
    """r(s) = P(false negative | s) under ``m``, in log space (no NaN in far tails).

    a = log π + log N(s; μ_f, σ_f²) and b = log(1 − π) + log N(s; μ_t, σ_t²), r = sigmoid(a − b),
    both components as the two rows of one 2×S computation: the same float64 operations per
    element (so the same bits) in half the calls, which are the cost of the per-step EM on a
    200-bin histogram (``FIT_ITERS`` of them per step)."""
    s = sims_S.to(torch.float64)
    mu_21 = torch.stack([m.mu_fn, m.mu_tn])[:, None]
    var_21 = torch.stack([m.var_fn, m.var_tn])[:, None]
    log_prior_21 = torch.stack([torch.log(m.prior), torch.log1p(-m.prior)])[:, None]
    ab_2S = log_prior_21 + _log_normal(s, mu_21, var_21)
    return (ab_2S[0] - ab_2S[1]).sigmoid()


def _samples(sims_S: Tensor, weights_S: Tensor) -> tuple[Tensor, Tensor]:
    """(s, w) in float64, s zeroed where the weight is 0: what every E-step reads."""
    w = weights_S.to(torch.float64)
    return torch.where(w > 0, sims_S.to(torch.float64), 0.0), w


def mixture_sums(sims_S: Tensor, weights_S: Tensor, m: Mixture) -> Tensor:
    """One E-step: (Σr, Σr·s, Σr·s², Σ(1−r), Σ(1−r)·s, Σ(1−r)·s²) with each sample weighted
    (0 for an invalid one; a count for a histogram bin). float64, no host sync."""
    return _e_step(*_samples(sims_S, weights_S), m)


def _e_step(s: Tensor, w: Tensor, m: Mixture) -> Tensor:
    """``mixture_sums`` of samples prepared by ``_samples`` (r·s·s is (r·s)·s: reused)."""
    r = responsibilities(s, m) * w
    q = w - r
    rs, qs = r * s, q * s
    return torch.stack([r.sum(), rs.sum(), (rs * s).sum(), q.sum(), qs.sum(), (qs * s).sum()])


def init_mixture(sims_S: Tensor, weights_S: Tensor) -> Mixture:
    """The moment start (see the module doc) of weighted samples."""
    w = weights_S.to(torch.float64)
    s = torch.where(w > 0, sims_S.to(torch.float64), 0.0)
    n = w.sum().clamp_min(1.0)
    mean = s.sum() / n
    var = ((s - mean).square() * w).sum() / n
    var = var.clamp_min(1e-4)
    prior = torch.tensor(INIT_PRIOR, dtype=torch.float64, device=s.device)
    return Mixture(prior, mean + var.sqrt(), var, mean, var)


def mixture_from_sums(totals: Tensor, var_floor: float = 1e-8) -> Mixture:
    """M-step: π and the weighted moments of the six sums; the larger mean is the FN side.

    Each variance is floored at ``MIN_VAR_SHARE`` of the pooled sample's: maximum likelihood
    is unbounded for a component shrinking onto one value (on a histogram, one bin), and EM
    walked into that spike in training (σ_f → 0, π → 0.01)."""
    # The two components as the rows of (n, Σs, Σs²): the same float64 operations per value
    # as one component at a time, in fewer calls (the cost of FIT_ITERS M-steps per step).
    comp_23 = totals.reshape(2, 3)
    n_2 = comp_23[:, 0].clamp_min(1e-12)
    mu_2 = comp_23[:, 1] / n_2
    n = (totals[0] + totals[3]).clamp_min(1e-12)
    mean = (totals[1] + totals[4]) / n
    total_var = ((totals[2] + totals[5]) / n - mean.square()).clamp_min(0.0)
    var_floor_t = (MIN_VAR_SHARE * total_var).clamp_min(var_floor)
    var_2 = torch.maximum(comp_23[:, 2] / n_2 - mu_2.square(), var_floor_t)
    prior = (totals[0] / n).clamp(MIX_PRIOR_MIN, MIX_PRIOR_MAX)
    swap = mu_2[0] < mu_2[1]
    mu_2 = torch.where(swap, mu_2.flip(0), mu_2)
    var_2 = torch.where(swap, var_2.flip(0), var_2)
    prior = torch.where(swap, 1.0 - prior, prior).clamp(MIX_PRIOR_MIN, MIX_PRIOR_MAX)
    return Mixture(prior, mu_2[0], var_2[0], mu_2[1], var_2[1])


def histogram(sims_S: Tensor, valid_S: Tensor, bins: int = HIST_BINS) -> Tensor:
    """Counts of the valid similarities in ``bins`` equal bins over [−1, 1] (float64; values
    outside, from rounding, go to the end bins). No host sync."""
    s = sims_S.detach().to(torch.float64)
    idx = ((s + 1.0) * (bins / 2.0)).floor().clamp(0, bins - 1).long()
    out = torch.zeros(bins, dtype=torch.float64, device=s.device)
    return out.index_add_(0, idx, valid_S.to(torch.float64))


def bin_centres(bins: int, device: torch.device | str | None = None) -> Tensor:
    return (torch.arange(bins, dtype=torch.float64, device=device) + 0.5) * (2.0 / bins) - 1.0


def fit_histogram(
    hist: Tensor, start: Mixture | None = None, iters: int = FIT_ITERS, var_floor: float = 1e-8
) -> Mixture:
    """``iters`` EM iterations on a histogram (bin centres weighted by counts), from ``start``
    (the moment start of the histogram when None). Same input, same output: every rank agrees."""
    centres = bin_centres(hist.shape[0], hist.device)
    m = init_mixture(centres, hist) if start is None else start
    s, w = _samples(centres, hist)  # the same every iteration
    for _ in range(iters):
        m = mixture_from_sums(_e_step(s, w, m), var_floor)
    return m


def refit(hist: Tensor, var_floor: float = 1e-8) -> Mixture:
    """This step's fit: ``FIT_ITERS`` EM iterations on the running histogram from its moment
    start (not warm-started: see the module doc). No host sync."""
    return fit_histogram(hist, None, FIT_ITERS, var_floor)


def em_fit(sims_S: Tensor, iters: int = 200, var_floor: float = 1e-8) -> Mixture:
    """Batch EM on one fixed sample, unbinned (the definition the histogram form approximates;
    for tests and offline analysis): repeated E- and M-steps from the moment start."""
    ones = torch.ones_like(sims_S, dtype=torch.float64)
    m = init_mixture(sims_S, ones)
    for _ in range(iters):
        m = mixture_from_sums(mixture_sums(sims_S, ones, m), var_floor)
    return m

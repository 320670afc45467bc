"""The false-negative posterior's interface: one class per estimator, chosen by ``fne.posterior``.

Legend: b anchors of one chunk, N candidates [batch ; memory], S sampled (anchor, candidate)
pairs, D embedding dim.

A posterior lives in two halves, both pure tensor functions:

* ``Posterior`` (the estimator, one instance per config): the sums it needs from one step's
  random candidate sample (``sums``; a float64 vector, all-reduced with the Gaussians' six by
  the caller) and, from the running totals of those sums, this step's ``fit``.
* ``PosteriorFit`` (the fitted posterior of one step): L = logit P_fn of (anchor, candidate)
  pairs, and its diagnostics. ``quadratic`` fits are αs² + βs + γ in the direction's
  cross-modal similarity s alone: the CPU sampler then evaluates them inside the hard-cut
  window only (``fne.weights.window_weights``); any other fit is evaluated on every pair.

The sampler asks the fit for log-odds and ``quadratic``; it never compares a posterior's name.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from ..null_mixture import NullMixture, auto_null_fit, fit_null_mixture
from ..posterior import quadratic_log_odds

if TYPE_CHECKING:
    from ..params import FneConfig
    from ..stats import Gaussians


@dataclass(frozen=True)
class CandidateSample:
    """One step's random (anchor, candidate) pairs (``fne.estimators.sample_columns``): the
    cross-modal similarities of both directions (2·B·r, float64), which are valid negatives,
    and what a posterior needs to compute another signal on the same pairs."""

    cross_S: Tensor
    valid_S: Tensor
    img_BD: Tensor  # the anchors' images
    cand_img_ND: Tensor  # the candidates' images
    cols_2Br: Tensor  # the sampled candidate columns


@dataclass(frozen=True)
class PairSims:
    """The (anchor, candidate) pairs of one chunk: the direction's cross-modal similarities
    and the two sides' images (for a posterior of the image-image similarity)."""

    sim_bN: Tensor
    anchor_img_bD: Tensor
    cand_img_ND: Tensor


class PosteriorFit(ABC):
    """A fitted posterior: L = logit P_fn for candidate pairs (no host sync)."""

    quadratic: ClassVar[bool] = False
    # L reads the pair's images only, never ``sim_bN`` (beyond its dtype): the same for the
    # i2t and the t2i direction, so the sampler computes it once for both.
    direction_free: ClassVar[bool] = False
    # the posterior's carried state after this step (``Posterior.fit``'s ``state``), for the
    # caller to commit with the step's sums; None: the posterior keeps none
    state: Tensor | None = None

    # L is a quadratic in a pair signal x other than s (``pair_signal``, e.g. the image-image
    # similarity): the CPU sampler then counts P_fn > ε from that quadratic in float32 and
    # evaluates L itself (``signal_log_odds``) only where it is read (the window, the rows
    # that fall back).
    signal_quadratic: ClassVar[bool] = False

    @abstractmethod
    def log_odds(self, pairs: PairSims) -> Tensor:
        """L of every pair of ``pairs`` (b×N), in float64 or in ``sim_bN``'s dtype."""

    def pair_signal(self, anchor_img_bD: Tensor, cand_img_ND: Tensor) -> Tensor:
        """The signal x of every (anchor, candidate) pair (``signal_quadratic`` fits)."""
        raise NotImplementedError(type(self).__name__)

    def signal_log_odds(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """L of the pairs whose signal is x (any shape), in ``dtype``: the values ``log_odds``
        gives those pairs (``signal_quadratic`` fits)."""
        raise NotImplementedError(type(self).__name__)

    def signal_coefficients(self) -> tuple[Tensor, Tensor, Tensor]:
        """(α, β, γ) of L = αx² + βx + γ, float64 0-dim (``signal_quadratic`` fits)."""
        raise NotImplementedError(type(self).__name__)

    def max_signal_log_odds(self) -> float:
        """An upper bound on L over every pair signal x, as the sampler computes L (the float32
        quadratic, the float64 formula, their rounding included), +inf where L is unbounded
        above (``signal_quadratic`` fits; reads host values). Below logit(ε) it proves that no
        pair has P_fn > ε: the CPU sampler then needs no signal at all."""
        return math.inf

    def diagnostics(self) -> dict[str, Tensor]:
        """The fitted parameters as 0-dim tensors, for the logs."""
        return {}


class QuadraticFit(PosteriorFit):
    """L(s) = αs² + βs + γ in the direction's cross-modal similarity s (α = 0 when pooled)."""

    quadratic = True

    def __init__(self, alpha: Tensor, beta: Tensor, gamma: Tensor, pooled: bool) -> None:
        self.alpha, self.beta, self.gamma, self.pooled = alpha, beta, gamma, pooled

    def coefficients(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.alpha, self.beta, self.gamma

    def log_odds_sim(self, sim: Tensor) -> Tensor:
        """L(s) for every similarity, in sim's dtype; a new tensor."""
        return quadratic_log_odds(sim, self.coefficients(), self.pooled)

    def log_odds(self, pairs: PairSims) -> Tensor:
        return self.log_odds_sim(pairs.sim_bN)


class Posterior(ABC):
    """A false-negative estimator (``fne.posterior``): what it sums each step, how it fits."""

    name: ClassVar[str]
    samples: ClassVar[bool] = False  # its sums come from the step's random candidate sample

    def __init__(self, cfg: FneConfig) -> None:
        self.cfg = cfg

    def sums(self, sample: CandidateSample) -> Tensor:
        """This step's local sums (float64; the caller all-reduces them). None by default."""
        return torch.zeros(0, dtype=torch.float64, device=sample.cross_S.device)

    @abstractmethod
    def fit(self, g: Gaussians, totals: Tensor, state: Tensor | None = None) -> PosteriorFit:
        """This step's posterior from the Gaussians and the running totals of ``sums``.
        ``state``: the carried state (``SimilarityStats.posterior_state``) of a posterior that
        keeps one across steps (``fne.mixture_null_latch``), the fit's ``state`` the next one;
        None (a caller that keeps no state): the posterior's stateless form."""

    def null_fit(
        self, totals: Tensor, state: Tensor | None
    ) -> tuple[NullMixture, Tensor | None] | None:
        """The J-component null fit a mixture posterior's config asks for, with the next carried
        state (``fne.mixture_null_auto``'s latch; None otherwise), or None for J = 1 (the
        caller's two-component refit)."""
        cfg = self.cfg
        j = cfg.mixture_null_components
        if j <= 1:
            return None
        if cfg.mixture_null_auto:
            return auto_null_fit(totals, j, cfg.var_floor, state, cfg.mixture_null_latch)
        return fit_null_mixture(totals, j, var_floor=cfg.var_floor), None

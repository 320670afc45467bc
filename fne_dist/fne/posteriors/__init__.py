"""The false-negative posteriors (``fne.posterior``), registered in one place.

- ``paper``: the positive-pair Gaussian against the hardest-negative one, of the cross-modal
  similarity s, with a fixed π (the paper's form).
- ``cross_mixture``: a two-component mixture of the candidates' s, π from data (emoji: +23
  group rsum over ``paper``, bench/results/quality_emoji.md).
- ``intra_mixture``: the same mixture of the image-image similarity (synthetic: +7.7 group
  mAP over ``paper``; the default run's form).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import CandidateSample, PairSims, Posterior, PosteriorFit, QuadraticFit
from .cross_mixture import CrossMixturePosterior
from .intra_mixture import IntraMixturePosterior
from .paper import PaperPosterior, fit_of, paper_fit, quadratic_fit_of

if TYPE_CHECKING:
    from ..params import FneConfig

POSTERIORS: dict[str, type[Posterior]] = {
    cls.name: cls for cls in (PaperPosterior, CrossMixturePosterior, IntraMixturePosterior)
}
POSTERIOR_NAMES = tuple(POSTERIORS)


def posterior_for(cfg: FneConfig) -> Posterior:
    """The estimator ``cfg.posterior`` names."""
    return POSTERIORS[cfg.posterior](cfg)


__all__ = [
    "POSTERIORS",
    "POSTERIOR_NAMES",
    "CandidateSample",
    "PairSims",
    "Posterior",
    "PosteriorFit",
    "QuadraticFit",
    "fit_of",
    "paper_fit",
    "posterior_for",
    "quadratic_fit_of",
]

"""The FNE algorithm as pure tensor functions: no ranks, devices or collectives.

A researcher can use the sampler in their own loop::

    from fne_dist.fne import (Anchors, Candidates, FneConfig, SimilarityStats,
                              mutual_top1_stats, retrieval_loss, step_uniforms)

    stats = SimilarityStats()
    stats.add(mutual_top1_stats(img_BD @ txt_BD.T, ids_B))     # all-reduce first if distributed
    g = stats.gaussians(cfg.gate_size, cfg.var_floor, cfg.variance)
    out = retrieval_loss(Anchors(img_BD, txt_BD, ids_B, torch.arange(B)),
                         Candidates.concat(batch_cands, memory_cands), cfg, g,
                         step_uniforms(seed, step, B, cfg.negatives))
    out.loss.backward()

See docs/algorithm.md for the maths each function implements, and
``fne.reference`` for the whole sampling rule on one screen (the definition the tests hold the
fast forms equal to).
"""

from .loss import (
    Anchors,
    Candidates,
    LossOutput,
    gaussian_diagnostics,
    retrieval_loss,
)
from .params import LOSSES, FneConfig
from .posterior import fn_log_odds, fn_posterior
from .posteriors import POSTERIORS, Posterior, PosteriorFit, posterior_for
from .sampling import Draw, draw_negatives, hardest_violator, inverse_cdf_draw, step_uniforms
from .selection import negative_mask
from .stats import (
    Gaussians,
    SimilarityStats,
    empty_stats,
    gaussians_from_stats,
    merge_stats,
    mutual_top1_stats,
    stats_of,
)
from .weights import AnchorSims, Weights, sampling_weights, window_weights

__all__ = [
    "LOSSES",
    "POSTERIORS",
    "AnchorSims",
    "Anchors",
    "Candidates",
    "Draw",
    "FneConfig",
    "Gaussians",
    "LossOutput",
    "Posterior",
    "PosteriorFit",
    "SimilarityStats",
    "Weights",
    "draw_negatives",
    "empty_stats",
    "fn_log_odds",
    "fn_posterior",
    "gaussian_diagnostics",
    "gaussians_from_stats",
    "hardest_violator",
    "inverse_cdf_draw",
    "merge_stats",
    "mutual_top1_stats",
    "negative_mask",
    "posterior_for",
    "retrieval_loss",
    "sampling_weights",
    "stats_of",
    "step_uniforms",
    "window_weights",
]

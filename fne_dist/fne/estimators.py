"""Estimator options beside the paper's (``fne.stats_source``, ``fne.prior_mode``).

Legend: B anchors, N candidates [batch ; memory], r random candidates per anchor and direction.

Why: with dense false negatives (ten classes) the paper's statistics make the two Gaussians
coincide. μ⁻ is fitted to the *hardest* in-batch negative of mutually-top-1 pairs, which is
itself usually a false negative, and the fixed prior π = 1e-4 keeps P_fn below ε everywhere:
the Bayes part never fires. Two options, each keeping the statistics as mergeable float64 sums
(an all-reduce SUM stays exact):

``stats_source: all_pairs``
    positives: every known pair of the in-batch matrix A (A_ij with id_i = id_j, the diagonal
    included), not only mutually-top-1 ones; negatives: the similarities of a *random* sample
    of r candidates per anchor and direction from [batch ; memory] (same-id and never-written
    slots dropped), not the hardest one. N(μ⁻, σ⁻²) then fits what a random candidate looks
    like, which is the population P_fn must separate from the positives:

        μ⁺ = mean{A_ij : id_i = id_j},   μ⁻ = mean{s(anchor, c) : c ~ U([batch ; memory])}.

    The sample holds false negatives at the rate π, so μ⁻ is biased towards μ⁺ by O(π); that
    is the price of needing no labels.

``prior_mode: em``
    π is the mixing weight of the candidate similarities, s ~ π N(μ⁺, σ⁺²) + (1 − π) N(μ⁻, σ⁻²),
    estimated by EM with the two components held at the running Gaussians. One E-step per
    training step on that step's random sample (the responsibilities r(s) = P_fn(s; π̂) under
    the current π̂) and the M-step over the epoch's sums:

        π̂ ← Σ_steps Σ_s r(s) / Σ_steps n_s,

    a stepwise EM whose fixed point is the maximum-likelihood mixing weight; the sums
    (n, Σ r) are two more float64 scalars that all-reduce like the other six. Until the epoch
    has a sample, π̂ is the configured prior. π̂ is clamped to [PRIOR_MIN, PRIOR_MAX] so a
    degenerate epoch can neither silence the posterior nor call everything a match.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .posterior import fn_log_odds
from .stats import Gaussians

PRIOR_MIN, PRIOR_MAX = 1e-6, 0.5
PRIOR_MODES = ("fixed", "em")
STATS_SOURCES = ("mutual_top1", "all_pairs")


def sample_columns(
    seed: int,
    step: int,
    global_batch: int,
    samples: int,
    n_candidates: int,
    rank: int = 0,
    local_batch: int | None = None,
) -> Tensor:
    """(2 directions, B, r) random candidate columns for rank ``rank`` (CPU, int64).

    Drawn for the whole global batch from a generator seeded by (seed, step) and sliced per
    rank, like ``step_uniforms`` (a different stream), so any world size draws the same.
    """
    b = global_batch if local_batch is None else local_batch
    gen = torch.Generator().manual_seed((seed * 0x2545F4914F6CDD1D + step + 1) % (2**63 - 1))
    cols = torch.randint(0, n_candidates, (2, global_batch, samples), generator=gen)
    return cols[:, rank * b : (rank + 1) * b]


def random_candidate_sims(
    img_BD: Tensor,
    txt_BD: Tensor,
    ids_B: Tensor,
    cand_img_ND: Tensor,
    cand_txt_ND: Tensor,
    cand_ids_N: Tensor,
    cols_2Br: Tensor,
) -> tuple[Tensor, Tensor]:
    """Similarities of each anchor with its r random candidates, both directions (2·B·r,
    float64) and whether each is a valid negative sample (not the anchor's id, not an empty
    memory slot: ids < 0). No gradient, no host sync."""
    cols_2Br = cols_2Br.to(img_BD.device)
    with torch.no_grad():
        i2t = torch.einsum("bd,brd->br", img_BD.detach(), cand_txt_ND[cols_2Br[0]])
        t2i = torch.einsum("bd,brd->br", txt_BD.detach(), cand_img_ND[cols_2Br[1]])
    cand_ids_2Br = cand_ids_N[cols_2Br]
    valid_2Br = (cand_ids_2Br != ids_B[None, :, None]) & (cand_ids_2Br >= 0)
    sims = torch.stack([i2t, t2i]).to(torch.float64)
    return sims.flatten(), valid_2Br.flatten()


def all_pairs_stats(sim_BB: Tensor, ids_B: Tensor, neg_S: Tensor, neg_valid_S: Tensor) -> Tensor:
    """The six sums (n⁺, Σs⁺, Σs⁺², n⁻, Σs⁻, Σs⁻²) of ``stats_source: all_pairs``: positives
    every A_ij with id_i = id_j (the diagonal included), negatives the valid random samples.
    Weighted sums (no boolean indexing): no host sync."""
    a_BB = sim_BB.detach().to(torch.float64)
    eye = torch.eye(a_BB.shape[0], dtype=torch.bool, device=a_BB.device)
    pos_w = ((ids_B[:, None] == ids_B[None, :]) | eye).to(torch.float64)
    neg_w = neg_valid_S.to(torch.float64)
    neg = torch.where(neg_valid_S, neg_S.to(torch.float64), 0.0)
    return torch.stack(
        [
            pos_w.sum(),
            (pos_w * a_BB).sum(),
            (pos_w * a_BB.square()).sum(),
            neg_w.sum(),
            neg.sum(),
            neg.square().sum(),
        ]
    )


def em_sums(sims_S: Tensor, valid_S: Tensor, g: Gaussians, prior: Tensor | float) -> Tensor:
    """One E-step: (n, Σ r(s)) over the valid samples, r(s) = P_fn(s) under the mixing weight
    ``prior`` and the components of ``g`` (float64, no host sync)."""
    prior_t = torch.as_tensor(prior, dtype=torch.float64, device=sims_S.device)
    g_prior = Gaussians(g.mu_pos, g.var_pos, g.mu_neg, g.var_neg, g.n_pos, g.has_mu_pos,
                        g.gate_open, g.variance, prior_t)  # fmt: skip
    r_S = fn_log_odds(sims_S.to(torch.float64), g_prior, 0.5).sigmoid()
    w_S = valid_S.to(torch.float64)
    return torch.stack([w_S.sum(), (w_S * r_S).sum()])


def prior_from_em(em_totals: Tensor, fallback: float) -> Tensor:
    """π̂ = Σ r / n, clamped to [PRIOR_MIN, PRIOR_MAX]; ``fallback`` before any sample."""
    n, resp = em_totals[0], em_totals[1]
    est = (resp / n.clamp_min(1.0)).clamp(PRIOR_MIN, PRIOR_MAX)
    return torch.where(n > 0, est, torch.tensor(fallback, dtype=torch.float64, device=n.device))


def em_prior(
    sims_S: Tensor, g: Gaussians, prior0: float = 0.01, iters: int = 200, tol: float = 1e-7
) -> float:
    """Batch EM for the mixing weight on one fixed sample, until π moves less than ``tol``
    (the definition the stepwise form approximates; for tests and offline analysis; reads
    host values)."""
    valid = torch.ones_like(sims_S, dtype=torch.bool)
    prior = prior0
    for _ in range(iters):
        n, resp = em_sums(sims_S, valid, g, prior)
        new = min(max(float(resp / n), PRIOR_MIN), PRIOR_MAX)
        if abs(new - prior) < tol:
            return new
        prior = new
    return prior


def with_prior(g: Gaussians, prior: Tensor) -> Gaussians:
    """``g`` carrying a data-estimated prior (used instead of ``FneConfig.prior``)."""
    return Gaussians(g.mu_pos, g.var_pos, g.mu_neg, g.var_neg, g.n_pos, g.has_mu_pos,
                     g.gate_open, g.variance, prior)  # fmt: skip

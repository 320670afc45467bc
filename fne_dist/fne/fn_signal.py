"""``fne.fn_signal`` and ``fne.infonce_fn``: a false-negative posterior from the intra-modal
similarity, and InfoNCE whose denominator discounts likely false negatives.

Legend: B anchors, N candidates [batch ; memory], S sampled (anchor, candidate) pairs.

Why an intra-modal signal (measured by bench/fn_signals.py on the bench generator, last epoch
of ``fne``): inside the hard-cut window, where the sampler draws, the cross-modal similarity
hardly separates false from true negatives (AUC 0.61), so any P_fn that is a function of it
alone cannot lower the share of false negatives drawn (56-58 % for every estimator). The
image-image similarity of the anchor's image and the candidate's image separates them well
(AUC 0.81 in the window, 0.89 overall). Every candidate carries both momentum embeddings and
every anchor both online ones, so for the pair (anchor i, candidate j), in either direction:

    x_ij = img_i · img_j                       (``intra``: the same value for i2t and t2i)
    s_ij = the direction's cross-modal sim     (``cross``: the paper's signal)

Each signal gets its own two-component mixture, fitted exactly like ``fn_model: mixture``
(fne.mixture: a decayed histogram of sampled values, 20 EM iterations from the moment start),
on its own histogram; the histograms are concatenated into the one all-reduced stats vector
(cross first), so nothing new crosses ranks. With m = (π, μ_f, σ_f², μ_t, σ_t²):

    Λ_m(v)  = log N(v; μ_f, σ_f²) − log N(v; μ_t, σ_t²)             (log-likelihood ratio)
    cross:  L = logit π_cross + Λ_cross(s)
    intra:  L = logit π_intra + Λ_intra(x)
    both:   L = logit π_intra + Λ_intra(x) + Λ_cross(s)              (naive Bayes: the two
            signals taken as independent given "false negative" / "true negative"; π from the
            intra fit, the better separated one)
    tail:   L = k · (z_ij − z₀), z the robust z of x_ij within anchor i's candidates
            (fne.tail: for rare false negatives, no mixture); tail_both: z = the larger of
            the image-image and the text-text robust z
    P_fn = sigmoid(L).

``infonce_fn`` (false-negative cancellation, Huynh et al. 2022, in its soft form): InfoNCE over
[batch ; memory] where each negative's term of the softmax denominator is multiplied by a
weight w_ij (no gradient through w), the positives' by 1:

    downweight: w = 1 − P_fn where P_fn > ε, else 1
    eliminate:  w = 0        where P_fn > ε, else 1
    ℓ_i = −Σ_{p ∈ pos(i)} t_ip [s_ip/τ − log(Σ_{p'} e^{s_ip'/τ} + Σ_j w_ij e^{s_ij/τ})]

implemented as the log-softmax of s/τ + log w (log(1 − P) = log sigmoid(−L), exact in the
tails; −inf for an eliminated term). Why: InfoNCE is the strongest baseline on both bench data
sets, and a false negative in its denominator pushes a same-class pair apart with a weight
that grows with its similarity; removing that push is what FNE's sampler tries to do for a
single hinge. No gate: the mixture has its own data from the first step (the paper's gate
counts positives, which this posterior does not use).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from .mixture import HIST_BINS, Mixture, histogram, refit, with_mixture
from .posterior import fn_log_odds_threshold
from .stats import Gaussians
from .tail import tail_log_odds

FN_SIGNALS = ("cross", "intra", "both", "tail", "tail_both")
INFONCE_FN = ("off", "downweight", "eliminate")


def signals_of(signal: str) -> tuple[str, ...]:
    """The fitted signals of ``fne.fn_signal``, in their histogram order."""
    # tail (fne.tail) fits nothing; its intra mixture is still fitted, for the diagnostics.
    table = {"cross": ("cross",), "intra": ("intra",), "both": ("cross", "intra")}
    return table.get(signal, ("intra",))


def histogram_bins(signal: str) -> int:
    """Length of the histogram part of the stats vector for ``signal``."""
    return HIST_BINS * len(signals_of(signal))


def intra_candidate_sims(
    img_BD: Tensor, ids_B: Tensor, cand_img_ND: Tensor, cand_ids_N: Tensor, cols_2Br: Tensor
) -> tuple[Tensor, Tensor]:
    """Image-image similarities of each anchor with the same random candidates as
    ``fne.estimators.random_candidate_sims`` (both directions' columns), flattened (2·B·r,
    float64), and whether each is a valid negative (not the anchor's id, not an empty slot)."""
    cols_2Br = cols_2Br.to(img_BD.device)
    with torch.no_grad():
        x = torch.einsum("bd,tbrd->tbr", img_BD.detach(), cand_img_ND[cols_2Br])
    cand_ids_2Br = cand_ids_N[cols_2Br]
    valid_2Br = (cand_ids_2Br != ids_B[None, :, None]) & (cand_ids_2Br >= 0)
    return x.to(torch.float64).flatten(), valid_2Br.flatten()


def signal_histograms(
    signal: str, cross_S: Tensor, intra_S: Tensor | None, valid_S: Tensor
) -> Tensor:
    """This step's histogram(s) of the sampled values, concatenated in ``signals_of`` order."""
    parts = {"cross": cross_S, "intra": intra_S}
    return torch.cat([histogram(parts[name], valid_S) for name in signals_of(signal)])


def with_signals(g: Gaussians, mix_totals: Tensor, signal: str, var_floor: float) -> Gaussians:
    """``g`` carrying each signal's mixture fitted to its running histogram. With the cross
    signal the posterior of the sampler is the ``fn_model: mixture`` one (g.mixture, g.prior)
    exactly as before; the intra fit travels in ``g.intra``."""
    fits = {
        name: refit(mix_totals[i * HIST_BINS : (i + 1) * HIST_BINS], var_floor)
        for i, name in enumerate(signals_of(signal))
    }
    if "cross" in fits:
        g = with_mixture(g, fits["cross"])
    if "intra" in fits:
        m = fits["intra"]
        g = replace(g, intra=(m.prior, m.mu_fn, m.var_fn, m.mu_tn, m.var_tn))
    return g


def log_likelihood_ratio(v: Tensor, m: Mixture) -> Tensor:
    """Λ(v) = log N(v; μ_f, σ_f²) − log N(v; μ_t, σ_t²), element-wise in float64."""
    v = v.to(torch.float64)
    f = -0.5 * ((v - m.mu_fn).square() / m.var_fn + torch.log(m.var_fn))
    t = -0.5 * ((v - m.mu_tn).square() / m.var_tn + torch.log(m.var_tn))
    return f - t


def _logit(p: Tensor) -> Tensor:
    return torch.log(p) - torch.log1p(-p)


def mixtures_of(g: Gaussians) -> dict[str, Mixture]:
    """The fitted mixtures ``g`` carries ({} when none)."""
    out = {}
    if g.mixture is not None and g.prior is not None:
        out["cross"] = Mixture(g.prior, *g.mixture)
    if g.intra is not None:
        out["intra"] = Mixture(*g.intra)
    return out


def pair_log_odds(
    signal: str,
    g: Gaussians,
    cross_BN: Tensor,
    intra_BN: Tensor,
    null_BN: Tensor | None = None,
    tail: tuple[float, float] = (3.0, 4.0),
    text_BN: Tensor | None = None,
) -> Tensor:
    """L = logit P_fn of every (anchor, candidate) pair under ``signal`` (module doc), float64.
    ``tail``: P_fn from the per-anchor robust z of ``intra_BN`` (fne.tail), over the full rows
    of candidates; null_BN: the entries that define each anchor's null (valid negatives),
    tail = (z₀, slope); text_BN: text-text similarities (``tail_both``)."""
    if signal in ("tail", "tail_both"):
        if null_BN is None or (signal == "tail_both" and text_BN is None):
            raise ValueError(f"fn_signal {signal} needs the candidates' null mask (and text sims)")
        return tail_log_odds(intra_BN, null_BN, *tail, text_BN)
    m = mixtures_of(g)
    if signal == "cross":
        return _logit(m["cross"].prior) + log_likelihood_ratio(cross_BN, m["cross"])
    out = _logit(m["intra"].prior) + log_likelihood_ratio(intra_BN, m["intra"])
    if signal == "both":
        out = out + log_likelihood_ratio(cross_BN, m["cross"])
    return out


def denominator_log_weights(
    log_odds_BN: Tensor, negative_BN: Tensor, mode: str, eps: float
) -> tuple[Tensor, Tensor]:
    """(log w, P_fn > ε) of every pair: log w added to the logits (0 on positives and where
    P_fn ≤ ε; log(1 − P_fn) = log sigmoid(−L) for ``downweight``, −inf for ``eliminate``)."""
    flagged_BN = (log_odds_BN > fn_log_odds_threshold(eps)) & negative_BN
    if mode == "downweight":
        log_w_BN = F.logsigmoid(-log_odds_BN)
    elif mode == "eliminate":
        log_w_BN = torch.full_like(log_odds_BN, -math.inf)
    else:
        raise ValueError(f"unknown infonce_fn {mode!r} (valid: downweight, eliminate)")
    return torch.where(flagged_BN, log_w_BN, 0.0), flagged_BN


def weighted_info_nce(logits_BN: Tensor, positive_BN: Tensor, log_w_BN: Tensor) -> Tensor:
    """Mean over anchors of −Σ_p t_p log softmax(logits + log w)_p, targets spread uniformly
    over the positives (whose log w must be 0)."""
    target_BN = positive_BN / positive_BN.sum(1, keepdim=True)
    log_p_BN = F.log_softmax(logits_BN + log_w_BN.to(logits_BN.dtype), dim=1)
    # 0 · (−inf) would be NaN: an eliminated term is never a target.
    return -(target_BN * log_p_BN.masked_fill(~positive_BN, 0.0)).sum(1).mean()

"""Selecting the negatives of a chunk of anchors from their similarity rows (no gradient).

Legend: b anchors of one chunk, N candidates, k negatives per anchor, M masked entries.

Two selectors with the same picks (``tests/test_sampler.py`` holds both equal to
``fne.reference``); ``loss._select`` chooses one per step and feeds it chunks of rows:

- ``select_dense`` (accelerators, torch.compile): every step is b×N element-wise work or a
  reduction, with no host sync; the draw and the hardest candidate are found in two levels
  (block sums/maxima, then one block), so no b×N cumulative sum or argmax is written;
- ``select_listed`` (CPU): the masked entries (a few per anchor) are listed by binary search in
  the sorted ids, and the weights are computed in the hard-cut window only, which holds
  ~0.1-2 % of the candidates in our runs (``frac_in_window``); a wide window (no hard cut, or
  more than ``WINDOW_MAX_FRACTION`` of the candidates) takes the weights of every candidate
  with the listed mask (``weights.listed_mask_weights``). Given log-odds of every pair, it
  reads them inside the window and counts P_fn > ε over them all; given instead the pair
  signal of a posterior quadratic in it (the default's image-image similarity,
  ``Rows.signal_bN``), it evaluates the float64 log-odds only where they are read (the
  window's pairs that may have P_fn > ε, the rows that fall back) and takes the P_fn > ε
  count from the float32 quadratic, once per block for both directions (``signal_fn_count``).
  One draw per anchor reads the window's entries as a list (``sampling.listed_draw``); the
  fallback violator is sought only in rows whose weights sum to 0.

rule (``fne.rules``): the hardest violator (VSE++: the most similar unmasked candidate), or a
draw with FNE's weights or uniform ones over the window.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor

from .detection import (
    GroupLabels,
    dense_detection,
    empty_detection,
    known_unlabelled,
    listed_detection,
    zero_detection,
)
from .groups import same_group
from .params import FneConfig
from .posterior import fn_log_odds_threshold, quadratic_log_odds
from .posteriors import PosteriorFit, fit_of, quadratic_fit_of
from .rules import Rule
from .sampling import Draw, draw_negatives, hardest_violator, listed_draw
from .stats import Gaussians
from .weights import (
    AnchorSims,
    ListedOdds,
    WindowEntries,
    WindowWeights,
    count_greater,
    count_true,
    cut_threshold,
    fn_region_inside_window,
    is_false_negative,
    listed_mask_weights,
    pack_window,
    sampling_weights,
    window_entries,
)

# On the CPU, weights are computed on the hard-cut window alone while it holds at most this
# fraction of the candidates (bench/sampler.py measures both forms).
WINDOW_MAX_FRACTION = 0.25


class Rows(NamedTuple):
    """b anchor rows of one chunk: their similarities to the N candidates and what selecting
    their negatives needs."""

    sim_bN: Tensor
    pos_col_b: Tensor  # the column of each anchor's own pair
    ids_b: Tensor
    u_bk: Tensor | None = None  # the draws' uniforms (None: the hardest rule draws nothing)
    mask_groups_b: Tensor | None = None  # the oracle: also mask the anchor's group mates
    detect_groups_b: Tensor | None = None  # score false-negative detection against these
    log_odds_bN: Tensor | None = None  # the posterior's log-odds of every pair, if given
    fallback_cols: int | None = None  # seek the fallback in the first this many columns
    # instead of log_odds_bN (listed form): the pair signal x of a ``signal_quadratic``
    # posterior, and per row the pairs with P_fn > ε over all columns (``signal_fn_count``)
    signal_bN: Tensor | None = None
    fn_all_b: Tensor | None = None
    # (listed form) the posterior flags no pair: its log-odds lie below logit(ε) whatever the
    # signal (``PosteriorFit.max_signal_log_odds``), so neither the signal nor log-odds are given
    unflagged: bool = False
    # (listed form) the masked entries of these rows (``masked_positions``), if the caller
    # listed them: both directions' rows share them
    masked: tuple[Tensor, Tensor] | None = None


class CandidateLabels(NamedTuple):
    """The N candidates' image ids and group labels (None: unlabelled)."""

    ids_N: Tensor
    groups_N: Tensor | None = None


COUNTS = ("fallback", "no_violator", "fn", "unmasked", "window")
"""Per-anchor counts of the selection (``Picks.counts_bC``): the draw fell back to the hardest
violator; it had none; unmasked candidates with P_fn > ε; unmasked candidates; candidates in
the hard-cut window (0 for the hardest rule)."""


class Picks(NamedTuple):
    """Per-anchor result of the selection for one chunk of anchor rows (b rows): what the loss
    takes (the drawn columns, whether each exists, the expected-loss shares), then what the
    diagnostics take."""

    index_bk: Tensor  # drawn candidate columns
    valid_bk: Tensor  # the draw exists (see sampling.draw_negatives)
    # fne.reduction expected: each candidate's share of the anchor's loss (the normalised
    # weights, or 1 on the fallback); b×0 otherwise
    prob_bN: Tensor
    sim_bk: Tensor  # similarity of the drawn candidate
    zero_hinge_bk: Tensor  # the drawn candidate does not violate the margin
    counts_bC: Tensor  # float64 columns ``COUNTS``
    detect_bF: Tensor  # false-negative detection sums (fne.detection; b×0 if not measured)

    def count(self, name: str) -> Tensor:
        """The per-anchor column ``name`` of ``COUNTS``."""
        return self.counts_bC[:, COUNTS.index(name)]


def select_dense(
    rows: Rows, cands: CandidateLabels, g: Gaussians | None, cfg: FneConfig, rule: Rule
) -> Picks:
    """The picks of b anchors, dense: the mask and the weights as b×N tensors (any device).

    Detection (``fne.detection``) is measured with the rules that draw when
    ``rows.detect_groups_b`` and the candidates' groups are given. ``rows.log_odds_bN``: the
    posterior's log-odds of every pair (a posterior that is not a function of sim, or the
    ``unflagged`` fallback); ``rows.fallback_cols``: the fallback violator is sought in the
    first this many columns only (the batch block, ``fne.fallback_scope: batch``)."""
    sim_bN, pos_col_b, ids_b, u_bk = rows.sim_bN, rows.pos_col_b, rows.ids_b, rows.u_bk
    log_odds_bN, fallback_cols = rows.log_odds_bN, rows.fallback_cols
    detect_groups = _detect_groups(rows, cands)
    n = sim_bN.shape[1]
    pos_sim_b = sim_bN.gather(1, pos_col_b[:, None]).squeeze(1)
    mask_bN = negative_mask(ids_b, pos_col_b, cands.ids_N, rows.mask_groups_b, cands.groups_N)
    masked_sim_bN = sim_bN.masked_fill(mask_bN, -math.inf)
    sims = AnchorSims(sim_bN, pos_sim_b, mask_bN, masked_sim_bN)
    if not rule.draws:
        return _hardest_picks(sims, cfg.margin)
    assert g is not None and u_bk is not None
    w = sampling_weights(sims, g, cfg, rule, log_odds_BN=log_odds_bN)
    counts = (w.n_fn_B, n - count_true(mask_bN), w.n_window_B)
    detect = _dense_detection(sims, detect_groups, g, cfg, rule, log_odds_bN)
    fallback_sim_bN = masked_sim_bN
    if cfg.fallback == "unflagged" and log_odds_bN is not None and rule.uses_posterior:
        # the empty-window fallback skips candidates with P_fn > ε (gate open): measured on
        # emoji, most rows' windows empty late in training and the hardest violator is then
        # the family mate the posterior flagged (fne.params ``fallback``)
        # the weights' own "FN weight applies" (the same log-odds, ε and gate): no new pass
        flagged_bN = w.use_fn_BN
        if flagged_bN is None:
            flagged_bN = is_false_negative(log_odds_bN, cfg.eps) & g.gate_open
        fallback_sim_bN = masked_sim_bN.masked_fill(flagged_bN, -math.inf)
    return _drawn_picks(
        sims, fallback_sim_bN[:, :fallback_cols], cfg, u_bk, DrawFrom(w.w_BN), counts, detect
    )


def _detect_groups(rows: Rows, cands: CandidateLabels) -> GroupLabels | None:
    """(anchor groups, candidate groups) to measure detection against, or None."""
    if rows.detect_groups_b is None or cands.groups_N is None:
        return None
    return rows.detect_groups_b, cands.groups_N


def _dense_detection(
    sims: AnchorSims,
    detect_groups: GroupLabels | None,
    g: Gaussians,
    cfg: FneConfig,
    rule: Rule,
    log_odds_bN: Tensor | None = None,
) -> Tensor:
    """``fne.detection.dense_detection`` with this step's window, or b×0 if not measured."""
    sim_bN, _, mask_bN, masked_sim_bN = sims
    if detect_groups is None:
        return empty_detection(sim_bN.shape[0], sim_bN.device)
    if known_unlabelled(detect_groups[0]):  # not even the window's b×N pass
        return zero_detection(sim_bN.shape[0], sim_bN.device)
    assert mask_bN is not None
    threshold = cut_threshold(g, cfg.cut_margin, sim_bN.dtype) if cfg.hard_cut else -math.inf
    window_bN = masked_sim_bN > threshold
    return dense_detection(
        sim_bN, mask_bN, detect_groups, window_bN, g, cfg, rule.uses_posterior, log_odds_bN
    )


def select_listed(
    rows: Rows,
    cands: CandidateLabels,
    g: Gaussians | None,
    cfg: FneConfig,
    rule: Rule,
    index: CandidateIndex | None = None,
) -> Picks:
    """The picks of b anchors, listed: the masked entries by binary search (``index``: the
    sorted candidate ids, built here if not given), the weights inside the hard-cut window
    only, and the fallback violator sought only in the rows that need it. Reads the window's
    size on the host: for CPU tensors. ``rows`` as ``select_dense`` (without log-odds, the
    listed form computes the quadratic posterior itself)."""
    sim_bN, pos_col_b, ids_b, u_bk = rows.sim_bN, rows.pos_col_b, rows.ids_b, rows.u_bk
    groups_b = rows.mask_groups_b
    detect_groups = _detect_groups(rows, cands)
    b, n = sim_bN.shape
    if index is None:
        index = candidate_index(cands.ids_N, None if groups_b is None else cands.groups_N)
    pos_sim_b = sim_bN.gather(1, pos_col_b[:, None]).squeeze(1)
    masked = rows.masked
    if masked is None:
        masked = masked_positions(ids_b, pos_col_b, index, n, groups_b)
    if not rule.draws:
        masked_sim_bN = sim_bN.index_put(masked, sim_bN.new_full((), -math.inf))
        return _hardest_picks(AnchorSims(sim_bN, pos_sim_b, None, masked_sim_bN), cfg.margin)
    assert g is not None and u_bk is not None
    # The draws read no masked copy of the similarities: the window and the weights take the
    # masked entries as a list, and the rows that fall back mask their own (few) copies.
    sims = AnchorSims(sim_bN, pos_sim_b, None, sim_bN)
    n_unmasked_b = n - torch.bincount(masked[0], minlength=b)
    odds = _listed_odds(rows, masked, g, cfg) if rule.uses_posterior else None
    if isinstance(odds, ListedOdds) and detect_groups is not None:  # detection reads them all
        odds = _signal_log_odds(rows, g, cfg)
    entries = window_entries(sims, masked, g, cfg, rule, WINDOW_MAX_FRACTION, odds)
    ww = None
    if entries is not None:
        counts = (entries.n_fn_B, n_unmasked_b, entries.n_window_B)
        source = DrawFrom(None, entries=entries, n=n)
        if u_bk.shape[1] > 1 or cfg.reduction == "expected" or detect_groups is not None:
            ww = pack_window(entries, n)  # what those read: the window packed into rows
            source = DrawFrom(ww.w_BM, ww.col_BM)
    else:  # A wide window: the weights of every candidate, with the listed mask.
        if isinstance(odds, ListedOdds):  # ... and the log-odds of every pair
            odds = _signal_log_odds(rows, g, cfg)
        w = listed_mask_weights(sims, masked, g, cfg, rule, odds)
        counts = (w.n_fn_B, n_unmasked_b, w.n_window_B)
        source = DrawFrom(w.w_BN)
    detect = empty_detection(b, sim_bN.device)
    if detect_groups is not None and ww is not None and odds is None:
        detect = _listed_detection(
            _with_dense_mask(sims, masked, dense=False), masked, detect_groups, ww, g, cfg, rule
        )
    elif detect_groups is not None:  # a wide window or a posterior of every pair: the dense
        # detection (which takes the log-odds)
        dense_sims = _with_dense_mask(sims, masked, dense=True)
        detect = _dense_detection(dense_sims, detect_groups, g, cfg, rule, odds)  # type: ignore[arg-type]
    fallback = partial(_listed_fallback, sims, masked, rows, g, cfg, rule)
    return _drawn_picks(sims, fallback, cfg, u_bk, source, counts, detect)


def _listed_odds(
    rows: Rows, masked: tuple[Tensor, Tensor], g: Gaussians, cfg: FneConfig
) -> Tensor | ListedOdds | None:
    """The log-odds the listed form reads: every pair's (given), or, with a pair signal, a
    ``ListedOdds`` that evaluates them where read, its P_fn > ε count less the masked pairs
    (the same float32 quadratic as ``rows.fn_all_b``)."""
    if rows.unflagged:  # no pair has P_fn > ε: the window reads nothing more than that
        b, dtype = rows.sim_bN.shape[0], rows.sim_bN.dtype
        no_fn_b = torch.zeros(b, dtype=torch.long, device=rows.sim_bN.device)
        return ListedOdds(lambda W: W.new_full(W.shape, -math.inf, dtype=dtype), no_fn_b)
    if rows.signal_bN is None:
        return rows.log_odds_bN
    assert rows.fn_all_b is not None
    fit = fit_of(g, cfg.prior)
    x_bN, dtype = rows.signal_bN, rows.sim_bN.dtype
    flagged_M = is_false_negative(
        quadratic_log_odds(x_bN[masked], fit.signal_coefficients(), pooled=False), cfg.eps
    )
    n_fn_b = (
        rows.fn_all_b
        - torch.bincount(
            masked[0], weights=flagged_M.to(torch.float64), minlength=x_bN.shape[0]
        ).long()
    )
    x_E = x_bN.reshape(-1)
    return ListedOdds(lambda W: _flag_exact_odds(x_E.take(W), fit, cfg.eps, dtype), n_fn_b)


def _flag_exact_odds(x_W: Tensor, fit: PosteriorFit, eps: float, dtype: torch.dtype) -> Tensor:
    """Log-odds of the pairs whose signal is x_W, as the window's weights read them: the
    float64 formula's values (``signal_log_odds``) wherever P_fn > ε may hold, the float32
    quadratic elsewhere (below logit(ε) by more than its rounding, so those pairs take the
    kernel weight either way; uncut_weight reads their log-odds no further). Host reads:
    the CPU form."""
    coefficients = fit.signal_coefficients()
    odds_W = quadratic_log_odds(x_W, coefficients, pooled=False).to(dtype)
    threshold = fn_log_odds_threshold(eps)
    # float32 Horner rounding is a few ulps of |α|x² + |β||x| + |γ|: 2^-16 of it (and of the
    # threshold, for its own rounding) leaves a margin of hundreds of ulps
    alpha, beta, gamma = (abs(float(c)) for c in coefficients)
    top = float(x_W.abs().max()) if x_W.numel() else 0.0
    slack = 2.0**-16 * (alpha * top * top + beta * top + gamma + abs(threshold) + 1.0)
    maybe_W = (odds_W > threshold - slack).nonzero().squeeze(1)
    if maybe_W.numel():
        odds_W[maybe_W] = fit.signal_log_odds(x_W[maybe_W], dtype)
    return odds_W


def _signal_log_odds(rows: Rows, g: Gaussians, cfg: FneConfig) -> Tensor:
    """Every pair's log-odds from the pair signal (what ``Rows.log_odds_bN`` would hold); for a
    posterior that flags no pair, −inf (only their P_fn ≤ ε is read: no FN weight applies)."""
    if rows.unflagged:
        return torch.full_like(rows.sim_bN, -math.inf)
    assert rows.signal_bN is not None
    return fit_of(g, cfg.prior).signal_log_odds(rows.signal_bN, rows.sim_bN.dtype)


def signal_fn_count(x_bN: Tensor, g: Gaussians, cfg: FneConfig, chunk_rows: int) -> Tensor:
    """Per row: pairs (masked ones included) with P_fn > ε over all columns, for a
    ``signal_quadratic`` posterior: L = αx² + βx + γ evaluated in x's dtype, in cache-sized
    slices of rows, instead of the float64 formula on every pair (the P_fn > ε diagnostic is
    all that reads them outside the window). In float32 a flag differs from the float64
    formula's only where L lies within float32 rounding of logit(ε) (tests/test_sampler_forms.py
    states the band)."""
    coefficients = fit_of(g, cfg.prior).signal_coefficients()
    threshold = fn_log_odds_threshold(cfg.eps)
    parts = [
        count_greater(quadratic_log_odds(x_bN[r : r + chunk_rows], coefficients, False), threshold)
        for r in range(0, x_bN.shape[0], chunk_rows)
    ]
    return torch.cat(parts)


def _with_dense_mask(sims: AnchorSims, masked: tuple[Tensor, Tensor], dense: bool) -> AnchorSims:
    """``sims`` with its masked similarities (and, if ``dense``, the dense mask) made from the
    listed entries: what the detection reads (not made when it measures nothing)."""
    if not dense and masked[0].numel() == 0:
        return sims
    sim_bN = sims.sim_BN
    masked_sim_bN = sim_bN.index_put(masked, sim_bN.new_full((), -math.inf))
    mask_bN = None
    if dense:
        mask_bN = torch.zeros_like(sim_bN, dtype=torch.bool)
        mask_bN.index_put_(masked, torch.tensor(True))
    return sims._replace(mask_BN=mask_bN, masked_sim_BN=masked_sim_bN)


def _listed_fallback(
    sims: AnchorSims,
    masked: tuple[Tensor, Tensor],
    rows: Rows,
    g: Gaussians,
    cfg: FneConfig,
    rule: Rule,
    need_b: Tensor,
) -> tuple[Tensor, Tensor]:
    """(hardest violator, whether it violates) of each row, sought only in the rows ``need_b``
    (those whose weights sum to 0): the draw reads them nowhere else
    (``sampling.draw_negatives``), so the other rows get column 0 and False. Among the first
    ``rows.fallback_cols`` columns, the flagged candidates skipped under the unflagged
    fallback, as ``select_dense`` does."""
    b = need_b.shape[0]
    device = need_b.device
    hardest_b = torch.zeros(b, dtype=torch.long, device=device)
    violates_b = torch.zeros(b, dtype=torch.bool, device=device)
    need_r = need_b.nonzero().squeeze(1)
    # those rows' similarities with their masked entries at −inf (the masked entries are few)
    local_b = torch.full((b,), -1, dtype=torch.long, device=device)
    local_b[need_r] = torch.arange(need_r.numel(), device=device)
    local_M = local_b[masked[0]]
    keep_M = local_M >= 0
    fallback_rN = sims.sim_BN[need_r].index_put_(
        (local_M[keep_M], masked[1][keep_M]), sims.sim_BN.new_full((), -math.inf)
    )[:, : rows.fallback_cols]
    given = rows.log_odds_bN is not None or rows.signal_bN is not None
    if cfg.fallback == "unflagged" and given and rule.uses_posterior:
        # the same flags as the dense form's: P_fn > ε with the gate open
        if rows.log_odds_bN is not None:
            odds_rN = rows.log_odds_bN[need_r, : rows.fallback_cols]
        else:  # those rows' log-odds from their signal: the values the dense form reads
            signal_rN = rows.signal_bN[need_r, : rows.fallback_cols]  # type: ignore[index]
            odds_rN = fit_of(g, cfg.prior).signal_log_odds(signal_rN, sims.sim_BN.dtype)
        fallback_rN = fallback_rN.masked_fill(is_false_negative(odds_rN, cfg.eps) & g.gate_open,
                                              -math.inf)  # fmt: skip
    h_r, violates_r = hardest_violator(fallback_rN, sims.pos_sim_B[need_r], cfg.margin)
    return hardest_b.index_put_((need_r,), h_r), violates_b.index_put_((need_r,), violates_r)


def _listed_detection(
    sims: AnchorSims,
    masked: tuple[Tensor, Tensor],
    detect_groups: GroupLabels | None,
    ww: WindowWeights,
    g: Gaussians,
    cfg: FneConfig,
    rule: Rule,
) -> Tensor:
    """Detection sums from the window's slots when every P_fn > ε candidate is inside the
    window (the usual case); otherwise from the dense mask (same sums)."""
    sim_bN = sims.sim_BN
    if detect_groups is None:
        return empty_detection(sim_bN.shape[0], sim_bN.device)
    threshold = float(cut_threshold(g, cfg.cut_margin, sim_bN.dtype))
    if not rule.uses_posterior or fn_region_inside_window(
        quadratic_fit_of(g, cfg.prior), cfg.eps, threshold
    ):
        return listed_detection(sim_bN, masked, detect_groups, ww, g, cfg, rule.uses_posterior)
    mask_bN = torch.zeros_like(sim_bN, dtype=torch.bool).index_put_(masked, torch.tensor(True))
    return _dense_detection(sims._replace(mask_BN=mask_bN), detect_groups, g, cfg, rule)


def _hardest_picks(sims: AnchorSims, margin: float) -> Picks:
    """VSE++: the hardest unmasked candidate of each anchor, valid if it violates the margin."""
    sim_bN = sims.sim_BN
    h_b, has_violator_b = hardest_violator(sims.masked_sim_BN, sims.pos_sim_B, margin)
    zeros_b = torch.zeros_like(h_b)
    d = Draw(h_b[:, None], has_violator_b[:, None], zeros_b.bool(), ~has_violator_b)
    return _picks(
        sims, margin, d, (zeros_b, zeros_b, zeros_b),
        empty_detection(sim_bN.shape[0], sim_bN.device), sim_bN.new_zeros(len(h_b), 0),
    )  # fmt: skip


class DrawFrom(NamedTuple):
    """The weights a draw reads: dense rows, or rows packed to the window (w_bM, with col_bM
    their columns), or the window listed row by row (``entries``, one draw per anchor: n
    columns per row)."""

    w_bM: Tensor | None
    col_bM: Tensor | None = None
    entries: WindowEntries | None = None
    n: int = 0


def _drawn_picks(
    sims: AnchorSims,
    fallback: Tensor | Callable[[Tensor], tuple[Tensor, Tensor]],
    cfg: FneConfig,
    u_bk: Tensor,
    source: DrawFrom,
    counts: tuple[Tensor, Tensor, Tensor],
    detect_bF: Tensor,
) -> Picks:
    """k draws from the weights of ``source``, with the hardest violator as the fallback of a
    row whose weights sum to 0 (sought among the columns of ``fallback``, masked
    similarities: a leading slice when the fallback's scope is narrowed, flagged candidates
    masked too under the unflagged fallback; or a function of the rows that need it giving
    (violator, violates): then the draw runs first and the fallback is sought only if a row's
    weights sum to 0, which needs a host read: the CPU form); with ``cfg.reduction`` expected,
    also the normalised weights as dense rows (the draws are then diagnostics only)."""
    sim_bN = sims.sim_BN
    entries = source.entries

    def draw(h_b: Tensor, has_violator_b: Tensor) -> Draw:
        if entries is not None:
            w_W, flat_W, starts_B1, _ = entries
            return listed_draw(w_W, flat_W, starts_B1, source.n, u_bk[:, 0], h_b, has_violator_b)
        assert source.w_bM is not None
        return draw_negatives(source.w_bM, u_bk, h_b, has_violator_b, source.col_bM)

    if isinstance(fallback, Tensor):
        h_b, has_violator_b = hardest_violator(fallback, sims.pos_sim_B, cfg.margin)
        d = draw(h_b, has_violator_b)
    else:  # no violator given: an empty row reads "no violator", so those are the empty rows
        h_b = torch.zeros(sim_bN.shape[0], dtype=torch.long, device=sim_bN.device)
        has_violator_b = torch.zeros_like(h_b, dtype=torch.bool)
        d = draw(h_b, has_violator_b)
        if bool(d.no_violator_B.any()):
            h_b, has_violator_b = fallback(d.no_violator_B)
            d = draw(h_b, has_violator_b)
    prob_bN = sim_bN.new_zeros(len(h_b), 0)
    if cfg.reduction == "expected":
        assert source.w_bM is not None
        prob_bN = expected_shares(source.w_bM, source.col_bM, sim_bN.shape[1], h_b, has_violator_b)
    return _picks(sims, cfg.margin, d, counts, detect_bF, prob_bN.to(sim_bN.dtype))


def expected_shares(
    w_bM: Tensor, col_bM: Tensor | None, n: int, hardest_b: Tensor, has_violator_b: Tensor
) -> Tensor:
    """p_bN: each candidate's share of its anchor's loss under ``reduction: expected``.

    p_ij = w_ij / Σ_k w_ik (the probability the sampler would draw j, so Σ_j p_ij C_ij is the
    expectation of the sampled hinge); a row whose weights sum to 0 keeps the fallback rule: 1
    on its hardest violator, or all 0 when it has none. col_bM: columns of compacted weights
    (their zero padding adds nothing), None when w spans all n columns. float64.
    """
    w = w_bM.to(torch.float64)
    total_b = w.sum(1, keepdim=True)
    p_bM = w / total_b.clamp_min(torch.finfo(torch.float64).tiny)
    p_bN = p_bM  # dense weights; compacted ones are scattered back to their columns
    if col_bM is not None:  # scatter_add: padded slots point at column 0 with weight 0
        p_bN = w.new_zeros(w.shape[0], n).scatter_add_(1, col_bM, p_bM)
    fallback_b = (total_b.squeeze(1) <= 0) & has_violator_b
    one_hot_bN = torch.zeros_like(p_bN).scatter_(1, hardest_b[:, None], 1.0)
    return torch.where(fallback_b[:, None], one_hot_bN, p_bN)


def _picks(
    sims: AnchorSims,
    margin: float,
    d: Draw,
    counts: tuple[Tensor, Tensor, Tensor],
    detect_bF: Tensor,
    prob_bN: Tensor,
) -> Picks:
    """The picks of the draw ``d`` (or the hardest violator as one), with their diagnostics."""
    neg_sim_bk = sims.sim_BN.gather(1, d.index_Bk)
    columns = (d.fallback_B, d.no_violator_B, *counts)  # the order of COUNTS
    return Picks(
        index_bk=d.index_Bk,
        valid_bk=d.valid_Bk,
        prob_bN=prob_bN,
        sim_bk=neg_sim_bk,
        zero_hinge_bk=(margin + neg_sim_bk - sims.pos_sim_B[:, None]) <= 0,
        counts_bC=torch.stack([c.to(torch.float64) for c in columns], dim=1),
        detect_bF=detect_bF,
    )


def negative_mask(
    ids_B: Tensor,
    pos_col_B: Tensor,
    cand_ids_N: Tensor,
    groups_B: Tensor | None = None,
    cand_groups_N: Tensor | None = None,
) -> Tensor:
    """M_BN: candidates that are never negatives: same image id, the explicit positive column,
    and (when both group tensors are given: the oracle) candidates of the anchor's group."""
    mask_BN = ids_B[:, None] == cand_ids_N[None, :]
    mask_BN.scatter_(1, pos_col_B[:, None], True)
    if groups_B is not None and cand_groups_N is not None:
        mask_BN |= same_group(groups_B[:, None], cand_groups_N[None, :])
    return mask_BN


class CandidateIndex(NamedTuple):
    """Candidate ids (and groups) sorted once per step, to list the masked entries of any anchor
    in O(log N) instead of comparing it with every candidate."""

    order_N: Tensor
    sorted_ids_N: Tensor
    group_order_N: Tensor | None
    sorted_groups_N: Tensor | None


def candidate_index(cand_ids_N: Tensor, cand_groups_N: Tensor | None = None) -> CandidateIndex:
    sorted_ids_N, order_N = cand_ids_N.sort(stable=True)
    if cand_groups_N is None:
        return CandidateIndex(order_N, sorted_ids_N, None, None)
    sorted_groups_N, group_order_N = cand_groups_N.sort(stable=True)
    return CandidateIndex(order_N, sorted_ids_N, group_order_N, sorted_groups_N)


def masked_positions(
    ids_b: Tensor,
    pos_col_b: Tensor,
    index: CandidateIndex,
    n_candidates: int,
    groups_b: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The True entries of ``negative_mask`` as (rows, columns), each once, row-major: the same
    set, found by binary search in the sorted candidate ids (a few entries per anchor)."""
    rows, cols = _equal_entries(ids_b, index.sorted_ids_N, index.order_N)
    parts_r = [rows, torch.arange(ids_b.shape[0], device=ids_b.device)]
    parts_c = [cols, pos_col_b]
    if groups_b is not None and index.sorted_groups_N is not None:
        assert index.group_order_N is not None
        # A negative group label is "unknown" and matches nothing: give it a key no
        # candidate has (below every label).
        key_b = torch.where(groups_b >= 0, groups_b, index.sorted_groups_N[0] - 1)
        g_rows, g_cols = _equal_entries(key_b, index.sorted_groups_N, index.group_order_N)
        parts_r.append(g_rows)
        parts_c.append(g_cols)
    flat_M = torch.unique(torch.cat(parts_r) * n_candidates + torch.cat(parts_c))  # sorted
    return flat_M // n_candidates, flat_M % n_candidates


def _equal_entries(keys_b: Tensor, sorted_N: Tensor, order_N: Tensor) -> tuple[Tensor, Tensor]:
    """(row, column) of every candidate whose key equals its row's key."""
    lo_b = torch.searchsorted(sorted_N, keys_b)
    count_b = torch.searchsorted(sorted_N, keys_b, right=True) - lo_b
    rows_M = torch.repeat_interleave(torch.arange(keys_b.shape[0], device=keys_b.device), count_b)
    start_b = count_b.cumsum(0) - count_b
    offset_M = torch.arange(rows_M.shape[0], device=keys_b.device) - start_b[rows_M]
    return rows_M, order_N[lo_b[rows_M] + offset_M]

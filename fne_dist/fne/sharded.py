"""The sampler over candidates cut into segments (a memory sharded across ranks): what each
segment's owner computes and how the segments combine, as pure tensor functions
(docs/sharded-memory.md; the collectives are ``fne_dist.distributed.sharded``'s).

Legend: b anchors, S candidates of one segment, P segments, F detection sums.

The candidates are [gathered batch ; memory slot 0 … K − 1] as with the whole memory; a segment
is a contiguous run of them (the batch, or one rank's shard) starting at global column
``offset``. The draws are exact across any cut because the weights are summed in integer units
(``sampling.weight_units``): a segment's total is exact, the row total is the exact sum of the
segment totals, and the column whose cumulative total first exceeds the target is the same
whether the row is scanned whole or the segment is found first and scanned alone.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .detection import N_BINS, RELIABILITY_EDGES, evaluable
from .groups import same_group
from .params import FneConfig
from .posterior import fn_log_odds_threshold
from .posteriors import PairSims, PosteriorFit, quadratic_fit_of
from .rules import Rule
from .sampling import draw_in_units, draw_target, first_argmax, weight_units
from .selection import WINDOW_MAX_FRACTION
from .stats import Gaussians
from .weights import (
    AnchorSims,
    count_true,
    cut_threshold,
    is_false_negative,
    sampling_weights,
    window_weights,
)


class SegmentRows(NamedTuple):
    """b anchors as a segment's owner sees them (gathered, no gradient)."""

    sim_bS: Tensor  # similarities to the segment's candidates
    pos_sim_b: Tensor  # s⁺, as the anchor's own rank computed it
    ids_b: Tensor
    pos_col_b: Tensor  # global column of the anchor's own pair (in the batch segment)
    img_bD: Tensor | None = None  # the anchors' online images (a posterior of image-image sim)
    mask_groups_b: Tensor | None = None  # the oracle: also mask the anchor's group mates
    detect_groups_b: Tensor | None = None  # score false-negative detection against these


class Segment(NamedTuple):
    """A contiguous run of candidates: global columns offset … offset + S − 1."""

    offset: int
    ids_S: Tensor
    groups_S: Tensor
    img_SD: Tensor | None = None  # the candidates' images (a posterior of image-image sim)
    fallback: bool = True  # the fallback may be sought here (fne.fallback_scope)


class SegmentSummary(NamedTuple):
    """Per anchor, what one segment contributes to the selection."""

    units_b: Tensor  # total weight in integer units (int64)
    best_b: Tensor  # the largest fallback-eligible similarity (−inf: none)
    best_col_b: Tensor  # its first global column (int64)
    counts_b3: Tensor  # float64: unmasked P_fn > ε, unmasked, in the window
    detect_bF: Tensor  # float64 detection sums (b×0 when not measured)


class SegmentPass(NamedTuple):
    summary: SegmentSummary
    units_bS: Tensor | None  # the weights in units (None for the hardest rule)
    cols_bS: Tensor | None = None  # their segment columns when compacted to the window


def segment_mask(rows: SegmentRows, seg: Segment) -> Tensor:
    """M_bS: the segment's candidates that are never negatives (the whole-row
    ``selection.negative_mask`` restricted to the segment's columns)."""
    mask_bS = rows.ids_b[:, None] == seg.ids_S[None, :]
    local_b = rows.pos_col_b - seg.offset
    inside_b = (local_b >= 0) & (local_b < seg.ids_S.shape[0])
    if seg.ids_S.shape[0]:
        hit_bS = torch.zeros_like(mask_bS).scatter_(
            1, local_b.clamp(0, seg.ids_S.shape[0] - 1)[:, None], True
        )
        mask_bS |= hit_bS & inside_b[:, None]
    if rows.mask_groups_b is not None:
        mask_bS |= same_group(rows.mask_groups_b[:, None], seg.groups_S[None, :])
    return mask_bS


def segment_pass(
    rows: SegmentRows, seg: Segment, g: Gaussians | None, cfg: FneConfig, rule: Rule,
    fit: PosteriorFit | None,
) -> SegmentPass:  # fmt: skip
    """The summary of b anchors over one segment, and the segment's weights in units.

    Element-wise the same weights as the whole-row selectors (``selection.select_dense``):
    the same mask, cut, posterior and fallback rules on the segment's columns. ``fit``: the
    step's posterior (fne rule), evaluated on every pair when it is not a quadratic in s or
    the fallback skips flagged candidates, as the whole-row selection does."""
    sim_bS = rows.sim_bS
    b, n = sim_bS.shape
    f64 = torch.float64
    mask_bS = segment_mask(rows, seg)
    masked_bS = sim_bS.masked_fill(mask_bS, -math.inf)
    zeros_b = torch.zeros(b, dtype=torch.long, device=sim_bS.device)
    fallback_bS = masked_bS
    units_bS, cols_bS, units_b, counts = None, None, zeros_b, (zeros_b, zeros_b, zeros_b)
    detect_bF = sim_bS.new_zeros(b, 0, dtype=f64)
    if rule.draws:
        assert g is not None
        log_odds = None
        every_pair = fit is not None and (not fit.quadratic or cfg.fallback == "unflagged")
        if every_pair:
            assert fit is not None and rows.img_bD is not None and seg.img_SD is not None
            log_odds = fit.log_odds(PairSims(sim_bS, rows.img_bD, seg.img_SD)).to(sim_bS.dtype)
        ww = None
        sims = AnchorSims(sim_bS, rows.pos_sim_b, mask_bS, masked_bS)
        if sim_bS.device.type == "cpu" and log_odds is None:
            # the CPU form of the whole-row sampler: weights inside the hard-cut window only
            masked = mask_bS.nonzero(as_tuple=True)
            ww = window_weights(sims, masked, g, cfg, rule, WINDOW_MAX_FRACTION)
        if ww is not None:
            units_bS, cols_bS = weight_units(ww.w_BM), ww.col_BM
            counts = (ww.n_fn_B, n - count_true(mask_bS), ww.n_window_B)
        else:
            w = sampling_weights(sims, g, cfg, rule, log_odds_BN=log_odds)
            units_bS = weight_units(w.w_BN)
            counts = (w.n_fn_B, n - count_true(mask_bS), w.n_window_B)
        units_b = units_bS.sum(1)
        if cfg.fallback == "unflagged" and log_odds is not None and rule.uses_posterior:
            flagged_bS = is_false_negative(log_odds, cfg.eps) & g.gate_open
            fallback_bS = masked_bS.masked_fill(flagged_bS, -math.inf)
        if rows.detect_groups_b is not None:
            threshold = (
                cut_threshold(g, cfg.cut_margin, sim_bS.dtype) if cfg.hard_cut else -math.inf
            )
            window_bS = masked_bS > threshold
            labels = (rows.detect_groups_b, seg.groups_S)
            detect_bF = segment_detection(
                sim_bS, mask_bS, labels, window_bS, g, cfg, rule, log_odds
            )
    if n and seg.fallback:
        best_b, idx_b = first_argmax(fallback_bS)
    else:
        best_b = sim_bS.new_full((b,), -math.inf)
        idx_b = zeros_b
    summary = SegmentSummary(
        units_b, best_b, idx_b + seg.offset, torch.stack([c.to(f64) for c in counts], 1), detect_bF
    )
    return SegmentPass(summary, units_bS, cols_bS)


def segment_detection(
    sim_bS: Tensor,
    mask_bS: Tensor,
    labels: tuple[Tensor, Tensor],
    window_bS: Tensor,
    g: Gaussians,
    cfg: FneConfig,
    rule: Rule,
    log_odds_bS: Tensor | None,
) -> Tensor:
    """``detection.dense_detection`` of one segment (the same sums, so segments add up): the
    counts over every candidate as boolean row counts, the reliability bins over the window's
    entries only (listed), which is where they are nonzero."""
    groups_b, groups_S = labels
    f64 = torch.float64
    same_bS = same_group(groups_b[:, None], groups_S[None, :])
    eval_bS = evaluable(groups_b, groups_S, mask_bS)
    in_win_bS = eval_bS & window_bS
    zeros_b = torch.zeros(sim_bS.shape[0], dtype=torch.long, device=sim_bS.device)
    pfn = (zeros_b, zeros_b)
    with_posterior = rule.uses_posterior
    if with_posterior:
        if log_odds_bS is None:
            log_odds_bS = quadratic_fit_of(g, cfg.prior).log_odds_sim(sim_bS)
        pred_bS = eval_bS & (log_odds_bS > fn_log_odds_threshold(cfg.eps))
        pfn = (pred_bS.count_nonzero(1), (pred_bS & same_bS).count_nonzero(1))
    cols = [eval_bS.count_nonzero(1), (eval_bS & same_bS).count_nonzero(1), *pfn,
            in_win_bS.count_nonzero(1), (in_win_bS & same_bS).count_nonzero(1)]  # fmt: skip
    out_bF = torch.stack(cols, 1).to(f64)
    rel_bR3 = torch.zeros(sim_bS.shape[0], N_BINS, 3, dtype=f64, device=sim_bS.device)
    if with_posterior:
        assert log_odds_bS is not None
        rows_W, cols_W = in_win_bS.nonzero(as_tuple=True)
        p_W = log_odds_bS[rows_W, cols_W].to(f64).sigmoid()
        edges = torch.tensor(RELIABILITY_EDGES[1:-1], dtype=f64, device=sim_bS.device)
        bin_W = torch.bucketize(p_W, edges, right=True)
        values = (torch.ones_like(p_W), p_W, same_bS[rows_W, cols_W].to(f64))
        for k, value_W in enumerate(values):
            rel_bR3[:, :, k].index_put_((rows_W, bin_W), value_W, accumulate=True)
    return torch.cat([out_bF, rel_bR3.flatten(1)], dim=1)


def merge_summaries(x: SegmentSummary, y: SegmentSummary) -> SegmentSummary:
    """Two summaries of the same anchors as one (totals and counts added; the fallback is the
    larger best, the lower column on a tie: the first most similar candidate of both)."""
    take_y = (y.best_b > x.best_b) | ((y.best_b == x.best_b) & (y.best_col_b < x.best_col_b))
    return SegmentSummary(
        x.units_b + y.units_b,
        torch.where(take_y, y.best_b, x.best_b),
        torch.where(take_y, y.best_col_b, x.best_col_b),
        x.counts_b3 + y.counts_b3,
        x.detect_bF + y.detect_bF,
    )


class Fallback(NamedTuple):
    col_b: Tensor  # the hardest violator's global column (its first occurrence)
    best_b: Tensor  # its similarity
    has_violator_b: Tensor


class SegmentChoice(NamedTuple):
    segment_b: Tensor  # the segment holding the draw
    target_b: Tensor  # the target inside that segment (units)
    total_b: Tensor  # the row's remaining total (units)


def choose_segments(units_bP: Tensor, u_b: Tensor) -> SegmentChoice:
    """The segment whose cumulative total (segments in column order) first exceeds the row's
    target ⌊u·T⌋, and the target less the segments before it: the owner's draw there
    (``draw_in_segment``) is the column the whole row's inverse CDF gives."""
    cum_bP = units_bP.cumsum(1)
    total_b = cum_bP[:, -1]
    target_b = draw_target(u_b, total_b)
    seg_b = torch.searchsorted(cum_bP, target_b[:, None], right=True).squeeze(1)
    seg_b = seg_b.clamp_max(units_bP.shape[1] - 1)
    before_b = torch.where(
        seg_b > 0, cum_bP.gather(1, (seg_b - 1).clamp_min(0)[:, None]).squeeze(1), 0
    )
    return SegmentChoice(seg_b, target_b - before_b, total_b)


def draw_in_segment(p: SegmentPass, target_b: Tensor, removed_bk: Tensor | None) -> Tensor:
    """The segment-local column of each row's draw at ``target_b`` (``choose_segments``), with
    the local columns ``removed_bk`` (earlier picks; −1: none) taken out of the row first.
    Compacted weights (``p.cols_bS``) keep the columns' order, so their cdf is the row's."""
    units_bS = p.units_bS
    assert units_bS is not None
    if removed_bk is not None and removed_bk.shape[1]:
        if p.cols_bS is None:
            hits_bS = torch.zeros_like(units_bS).scatter_add_(
                1, removed_bk.clamp_min(0), (removed_bk >= 0).long()
            )
            units_bS = units_bS.masked_fill(hits_bS > 0, 0)
        else:
            hit_bS = (p.cols_bS[:, :, None] == removed_bk[:, None, :]).any(-1)
            units_bS = units_bS.masked_fill(hit_bS, 0)
    at_b = draw_in_units(units_bS, target_b)
    return at_b if p.cols_bS is None else p.cols_bS.gather(1, at_b[:, None])[:, 0]


def units_at(p: SegmentPass, local_b: Tensor) -> Tensor:
    """The weight (units) of each row's segment-local column ``local_b``."""
    assert p.units_bS is not None
    if p.cols_bS is None:
        return p.units_bS.gather(1, local_b[:, None])[:, 0]
    found_bS = p.cols_bS == local_b[:, None]
    return (p.units_bS * found_bS).sum(1)

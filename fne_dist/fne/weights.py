"""Sampling weights of FNE and of the "window" ablation (docs/algorithm.md §4).

Legend: B anchors, N candidates, W entries inside the hard-cut window.

    k(s)  = exp(−τ_k (s − s⁺)²)          kernel weight: largest for negatives as similar as s⁺
    f(s)  = exp(−τ_fn P_fn(s))            FN weight, in [e^−τ_fn, 1]: down-weights, never removes
    w     = f  where gate open and P_fn > ε   (the cut-down strategy, the paper's Figure 2)
          = k  elsewhere
    w     = 0  where s ≤ μ⁺ − margin_cut (hard cut; only once a μ⁺ exists), and on positives.

These are the fast forms; ``fne.reference`` writes the same rule one candidate at a time, and
the tests hold both forms here equal to it. Two forms with the same weights: ``sampling_weights``
(dense B×N, any device, torch.compile) and ``window_weights`` (CPU: compacted to the window).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .params import FneConfig
from .posterior import fn_log_odds_threshold
from .posteriors import QuadraticFit, quadratic_fit_of
from .rules import FNE, Rule
from .stats import Gaussians


class AnchorSims(NamedTuple):
    """B anchors' similarity rows as the sampler scores them (no gradient): what every weight,
    detection and pick of those anchors reads."""

    sim_BN: Tensor  # anchor-candidate similarities
    pos_sim_B: Tensor  # s⁺ per anchor
    mask_BN: Tensor | None  # candidates that are never negatives (None: only listed)
    masked_sim_BN: Tensor  # sim with −inf on the mask

    @classmethod
    def of(cls, sim_BN: Tensor, pos_sim_B: Tensor, mask_BN: Tensor) -> AnchorSims:
        """The rows with their masked similarities computed here."""
        return cls(sim_BN, pos_sim_B, mask_BN, sim_BN.masked_fill(mask_BN, -math.inf))


def cut_threshold(g: Gaussians, cut_margin: float, dtype: torch.dtype) -> Tensor:
    """μ⁺ − margin as a 0-dim tensor; "no μ⁺ yet" folded in as −inf, which cuts no finite s.

    A candidate is cut where s ≤ this and inside the window where s > this.
    """
    return torch.where(g.has_mu_pos, g.mu_pos - cut_margin, -math.inf).to(dtype)


def is_false_negative(log_odds: Tensor, eps: float) -> Tensor:
    """P_fn > ε, decided on the log-odds (sigmoid is increasing): where the FN weight applies."""
    return log_odds > fn_log_odds_threshold(eps)


def uncut_weight(
    sim: Tensor,
    pos_sim: Tensor,
    log_odds: Tensor,
    is_fn: Tensor,
    g: Gaussians,
    cfg: FneConfig,
    use_fn: Tensor | None = None,
) -> Tensor:
    """FNE's weight before the cut, element-wise on any shape (pos_sim broadcast to sim).

    The one formula both forms use, so they agree per element. The sigmoid sees the log-odds
    clamped just below logit(ε): every P_fn that is used (> ε) is unchanged, and no exp
    overflows on far tails (several times slower on CPUs). use_fn: ``is_fn & g.gate_open``
    (where the FN weight applies), if the caller has it.
    """
    if use_fn is None:
        use_fn = is_fn & g.gate_open
    p_fn = log_odds.clamp_min(fn_log_odds_threshold(cfg.eps) - 1.0).sigmoid_()
    exponent = sim - pos_sim
    exponent.mul_(exponent).mul_(-cfg.tau_kernel)  # kernel weight = exp(this)
    # FN weight = exp(−τ P): one exp for both weights, through the exponent.
    return torch.where(use_fn, p_fn.mul_(-cfg.tau_fn), exponent).exp_()


class Weights(NamedTuple):
    w_BN: Tensor
    n_fn_B: Tensor  # per anchor: unmasked candidates with P_fn > ε (0 for the window rule)
    n_window_B: Tensor  # per anchor: candidates in the hard-cut window (unmasked, not cut)
    # where the FN weight applies (P_fn > ε and the gate open): the candidates the unflagged
    # fallback skips; None for a rule without the posterior
    use_fn_BN: Tensor | None = None


def sampling_weights(
    rows: AnchorSims,
    g: Gaussians,
    cfg: FneConfig,
    rule: Rule = FNE,
    masked_entries: tuple[Tensor, Tensor] | None = None,
    log_odds_BN: Tensor | None = None,
) -> Weights:
    """Unnormalised sampling weights over candidates, for a rule that draws: FNE's (the paper)
    or, for a rule without the posterior ("window", FNE without the Bayes part), uniform
    weight inside the hard-cut window.

    rows: the anchors' similarities, s⁺, their mask (positives, and the oracle's group mates)
    and masked similarities; masked_entries: the mask's True entries as (rows, columns), if
    the caller has them (counts then skip a pass over the mask); log_odds_BN: the posterior's
    log-odds when the caller has them (a posterior that is not a function of sim,
    ``fne.posteriors``), else the quadratic in sim.

    The dense form, for any device and for torch.compile: the gate and "no μ⁺ yet" are folded
    into scalar thresholds (a masked candidate has similarity −inf, so the cut removes it too)
    and the log-odds are one quadratic αs² + βs + γ. The cut is applied after the exp: an exp
    of −inf is several times slower than of a finite number on CPUs.
    """
    sim_BN, pos_sim_B, mask_BN, masked_sim_BN = rows
    assert mask_BN is not None, "the dense weights need the dense mask"
    b = sim_BN.shape[0]
    if cfg.hard_cut:
        threshold = cut_threshold(g, cfg.cut_margin, sim_BN.dtype)
        cut_BN = masked_sim_BN <= threshold
    else:
        threshold, cut_BN = sim_BN.new_full((), -math.inf), mask_BN
    n_fn_B = torch.zeros(b, dtype=torch.long, device=sim_BN.device)
    n_window_B = count_greater(masked_sim_BN, threshold)
    if not rule.draws:
        raise ValueError(f"the {rule.name} rule draws nothing: it has no sampling weights")
    if not rule.uses_posterior:
        return Weights((~cut_BN).to(sim_BN.dtype), n_fn_B, n_window_B)
    if log_odds_BN is None:
        log_odds_BN = quadratic_fit_of(g, cfg.prior).log_odds_sim(sim_BN)
    is_fn_BN = is_false_negative(log_odds_BN, cfg.eps)
    # Unmasked candidates with P_fn > ε (a diagnostic: the gate does not matter).
    if masked_entries is None:
        n_fn_B = count_true(is_fn_BN & ~mask_BN)
    else:
        rows_M, cols_M = masked_entries
        fn_masked_M = is_fn_BN[rows_M, cols_M].to(torch.float64)
        n_fn_B = count_greater(log_odds_BN, fn_log_odds_threshold(cfg.eps))
        n_fn_B -= torch.bincount(rows_M, weights=fn_masked_M, minlength=b).long()
    use_fn_BN = is_fn_BN & g.gate_open
    w_BN = uncut_weight(sim_BN, pos_sim_B[:, None], log_odds_BN, is_fn_BN, g, cfg, use_fn_BN)
    return Weights(w_BN.masked_fill_(cut_BN, 0.0), n_fn_B, n_window_B, use_fn_BN)


def listed_mask_weights(
    rows: AnchorSims,
    masked_entries: tuple[Tensor, Tensor],
    g: Gaussians,
    cfg: FneConfig,
    rule: Rule = FNE,
    log_odds_BN: Tensor | None = None,
) -> Weights:
    """``sampling_weights`` over every candidate with the mask given as its entries only
    (rows, columns; each once), in fewer passes over b×N: the CPU form of a wide window (no
    hard cut, or a window too wide to compact). The same weights and counts, element for
    element: the masked weights are zeroed and the counts corrected at the listed entries (no
    dense mask, no masked copy of the similarities), one pass gives both the P_fn > ε count
    and whether any FN weight applies, and without one the sigmoid and the choice of
    ``uncut_weight`` are left out (its kernel weight everywhere). Reads host values (CPU form
    only); ``use_fn_BN`` is not returned (None)."""
    sim_BN, pos_sim_B = rows.sim_BN, rows.pos_sim_B
    if not rule.draws:
        raise ValueError(f"the {rule.name} rule draws nothing: it has no sampling weights")
    if log_odds_BN is not None and log_odds_BN.dtype != sim_BN.dtype:  # mixed precision: the
        # dense form's type promotion decides the weights' dtype
        mask_BN = torch.zeros_like(sim_BN, dtype=torch.bool).index_put_(
            masked_entries, torch.tensor(True)
        )
        masked_sim_BN = sim_BN.masked_fill(mask_BN, -math.inf)
        sims = AnchorSims(sim_BN, pos_sim_B, mask_BN, masked_sim_BN)
        return sampling_weights(sims, g, cfg, rule, masked_entries, log_odds_BN)
    b = sim_BN.shape[0]
    rows_M, cols_M = masked_entries
    threshold = cut_threshold(g, cfg.cut_margin, sim_BN.dtype) if cfg.hard_cut else None
    n_window_B = _count_above(sim_BN, threshold)
    above_M = sim_BN[rows_M, cols_M] > (-math.inf if threshold is None else threshold)
    n_window_B -= torch.bincount(rows_M, weights=above_M.to(torch.float64), minlength=b).long()
    n_fn_B = torch.zeros(b, dtype=torch.long, device=sim_BN.device)
    if not rule.uses_posterior:
        w_BN = torch.ones_like(sim_BN)
    else:
        own = log_odds_BN is None  # computed here: clamped in place below
        if log_odds_BN is None:
            log_odds_BN = quadratic_fit_of(g, cfg.prior).log_odds_sim(sim_BN)
        # P_fn > ε as 0/1 of the log-odds' dtype: its row sums are the count (with the masked
        # ones, taken out below) and its nonzeros the flagged candidates, in one pass
        fn_threshold = fn_log_odds_threshold(cfg.eps)
        is_fn_BN = torch.gt(log_odds_BN, fn_threshold, out=torch.empty_like(log_odds_BN))
        n_fn_B = is_fn_BN.sum(dim=1).long()
        fn_masked_M = (log_odds_BN[rows_M, cols_M] > fn_threshold).to(torch.float64)
        n_fn_B -= torch.bincount(rows_M, weights=fn_masked_M, minlength=b).long()
        # the kernel weight's exponent everywhere, then the FN weight's where it applies
        exponent_BN = sim_BN - pos_sim_B[:, None]
        exponent_BN.mul_(exponent_BN).mul_(-cfg.tau_kernel)
        if bool(g.gate_open) and int(n_fn_B.sum()) + int(fn_masked_M.sum()) > 0:
            # uncut_weight's choice, as it makes it (measured: listing a few per cent of
            # flagged candidates costs more than the dense sigmoid), taken with the 0/1 flags
            # as floats: lerp(e, p, f) is exactly e at f = 0 and p at f = 1 (ATen's two-sided
            # form), one pass where a boolean mask and where() cost ~8× that on our CPU; in
            # place where the buffers are ours (fewer b×N buffers in the cache, same values)
            floor = fn_threshold - 1.0
            clamped = log_odds_BN.clamp_min_(floor) if own else log_odds_BN.clamp_min(floor)
            p_fn_BN = clamped.sigmoid_().mul_(-cfg.tau_fn)
            exponent_BN.lerp_(p_fn_BN, is_fn_BN.to(p_fn_BN.dtype))
        w_BN = exponent_BN.exp_()
    if threshold is not None:
        w_BN.masked_fill_(sim_BN <= threshold, 0.0)
    return Weights(w_BN.index_put_(masked_entries, w_BN.new_zeros(())), n_fn_B, n_window_B)


def _count_above(sim_BN: Tensor, threshold: Tensor | None) -> Tensor:
    """Per row: entries above ``threshold`` (None: above −inf). Without a threshold, in one
    pass: a sum that is finite holds no NaN or −inf, so all n count; only the rows whose sum
    is not are compared (the whole chunk's sum first: one host read when all are finite)."""
    if threshold is not None:
        return count_greater(sim_BN, threshold)
    n_B = torch.full((sim_BN.shape[0],), sim_BN.shape[1], dtype=torch.long, device=sim_BN.device)
    if bool(sim_BN.sum().isfinite()):
        return n_B
    odd_r = (~sim_BN.sum(dim=1).isfinite()).nonzero().squeeze(1)
    if odd_r.numel():
        n_B[odd_r] = count_greater(sim_BN[odd_r], -math.inf)
    return n_B


def count_true(x_BN: Tensor) -> Tensor:
    """Per row: how many entries are True (int64)."""
    return x_BN.sum(dim=1)


def count_greater(x_BN: Tensor, threshold: Tensor | float) -> Tensor:
    """Per row: how many entries exceed ``threshold`` (int64).

    On the CPU through a 0/1 tensor of x's float dtype: summing bools widens them to int64 in
    a copy, which costs several times more there. Exact while rows are shorter than 2^24.
    """
    if x_BN.device.type != "cpu" or torch.compiler.is_compiling() or x_BN.shape[1] >= 2**24:
        return count_true(x_BN > threshold)
    return torch.gt(x_BN, threshold, out=torch.empty_like(x_BN)).sum(dim=1).long()


class WindowWeights(NamedTuple):
    """Weights of the candidates inside the window only, left-aligned per row (B × M, M the
    largest window; zero-padded) with their columns: the compacted form of ``Weights``."""

    w_BM: Tensor
    col_BM: Tensor
    n_fn_B: Tensor
    n_window_B: Tensor


class WindowEntries(NamedTuple):
    """The window's weights listed row by row: w_W at the sorted flat (row-major) positions
    flat_W of the B × n matrix, row i's from starts_B1[i] to starts_B1[i + 1]. What the
    listed draw (``sampling.listed_draw``) reads, and ``WindowWeights`` is packed from."""

    w_W: Tensor
    flat_W: Tensor
    starts_B1: Tensor
    n_fn_B: Tensor

    @property
    def n_window_B(self) -> Tensor:
        return self.starts_B1.diff()


class ListedOdds(NamedTuple):
    """A posterior's log-odds evaluated only where they are read (a posterior of a pair
    signal other than s, ``fne.posteriors``): ``at(flat positions)`` gives those pairs'
    log-odds in sim's dtype, with the whole B × N log-odds' P_fn > ε flags and their values
    where a flag is set (elsewhere only the kernel weight is read); n_fn_B: per row, the
    unmasked pairs with P_fn > ε, counted by the caller (once for both directions)."""

    at: Callable[[Tensor], Tensor]
    n_fn_B: Tensor


def window_is_everything(g: Gaussians, cfg: FneConfig) -> bool:
    """No hard cut applies (it is off, or there is no μ⁺ yet): every unmasked candidate is in
    the window. Reads a host value (CPU form only)."""
    return not cfg.hard_cut or not bool(g.has_mu_pos)


def window_weights(
    rows: AnchorSims,
    masked_entries: tuple[Tensor, Tensor],
    g: Gaussians,
    cfg: FneConfig,
    rule: Rule,
    max_fraction: float,
    log_odds_BN: Tensor | ListedOdds | None = None,
) -> WindowWeights | None:
    """``window_entries`` packed left-aligned per row (B × M, with their columns), or None."""
    entries = window_entries(rows, masked_entries, g, cfg, rule, max_fraction, log_odds_BN)
    if entries is None:
        return None
    return pack_window(entries, rows.sim_BN.shape[1])


def window_entries(
    rows: AnchorSims,
    masked_entries: tuple[Tensor, Tensor],
    g: Gaussians,
    cfg: FneConfig,
    rule: Rule,
    max_fraction: float,
    log_odds_BN: Tensor | ListedOdds | None = None,
) -> WindowEntries | None:
    """``sampling_weights`` evaluated only inside the hard-cut window, where weights can be > 0.

    The window (s > μ⁺ − margin, unmasked) is usually a small fraction of [batch ; memory]: the
    exps, sigmoids and the cumulative sum then run on that fraction, and only the log-odds
    (for the P_fn > ε count over all candidates) and the window test touch every candidate.
    rows: the anchors' similarities, s⁺ and masked similarities (−inf at the masked positions;
    the dense mask is not read); masked_entries: those positions as (rows, columns), each
    once. log_odds_BN: the posterior's log-odds of every pair when the caller has them (a
    posterior that is not a quadratic in s: ``fne.posteriors``), or a ``ListedOdds`` that
    evaluates them where read; the window's are then taken from them and the P_fn > ε count
    reads them all (or is given). Needs the window's size on the host (``nonzero``): meant for
    CPU tensors, where that costs no device sync. Returns None when no hard cut applies or the
    window holds more than ``max_fraction`` of the candidates: the dense form is then faster.
    """
    if not rule.draws:
        raise ValueError(f"the {rule.name} rule draws nothing: it has no sampling weights")
    if window_is_everything(g, cfg):
        return None
    sim_BN, pos_sim_B = rows.sim_BN, rows.pos_sim_B
    b, n = sim_BN.shape
    threshold = cut_threshold(g, cfg.cut_margin, sim_BN.dtype)
    # Flat positions, row-major: each row's window in column order, so a compacted row's
    # left-to-right sum is the dense row's with its zeros left out. (1-D indexing is several
    # times faster than (row, column) pairs; nonzero's size is the count, so no count pass.)
    # The test on sim with the masked entries then cleared: the masked similarities' test, with
    # a 1-byte pass instead of a 4-byte copy.
    inside_BN = (sim_BN > threshold).index_put_(masked_entries, torch.tensor(False))
    flat_W = inside_BN.view(-1).nonzero().squeeze(1)
    if flat_W.numel() > max_fraction * b * n:
        return None
    starts_B1 = _row_starts(flat_W, b, n)
    if not rule.uses_posterior:
        n_fn_B = torch.zeros(b, dtype=torch.long, device=sim_BN.device)
        w_W = torch.ones(flat_W.shape, dtype=sim_BN.dtype, device=sim_BN.device)
        return WindowEntries(w_W, flat_W, starts_B1, n_fn_B)
    sim_W = sim_BN.reshape(-1).take(flat_W)
    # s⁺ of each entry's row, repeated row by row (no per-entry row index is formed)
    pos_W = pos_sim_B.repeat_interleave(starts_B1.diff(), output_size=flat_W.numel())
    if isinstance(log_odds_BN, ListedOdds):
        log_odds_W, n_fn_B = log_odds_BN.at(flat_W), log_odds_BN.n_fn_B
        is_fn_W = is_false_negative(log_odds_W, cfg.eps)
    elif log_odds_BN is not None:
        # the same float32 log-odds the dense form reads, element for element
        log_odds_W = log_odds_BN.reshape(-1).take(flat_W)
        is_fn_W = is_false_negative(log_odds_W, cfg.eps)
        n_fn_B = _count_fn_given(log_odds_BN, masked_entries, cfg.eps)
    else:
        fit = quadratic_fit_of(g, cfg.prior)
        log_odds_W = fit.log_odds_sim(sim_W)
        is_fn_W = is_false_negative(log_odds_W, cfg.eps)
        if fn_region_inside_window(fit, cfg.eps, float(threshold)):
            # Every candidate with P_fn > ε is in the window: count it there.
            n_fn_B = _row_sums(is_fn_W, starts_B1)
        else:
            n_fn_B = _count_fn_listed(sim_BN, masked_entries, fit, cfg.eps, cfg.chunk_rows)
    if bool(g.gate_open) and bool(is_fn_W.any()):
        w_W = uncut_weight(sim_W, pos_W, log_odds_W, is_fn_W, g, cfg)
    else:  # no FN weight applies: uncut_weight's kernel weight, without its sigmoid and where
        exponent_W = sim_W - pos_W
        w_W = exponent_W.mul_(exponent_W).mul_(-cfg.tau_kernel).exp_()
    return WindowEntries(w_W, flat_W, starts_B1, n_fn_B)


def _count_fn_given(
    log_odds_BN: Tensor, masked_entries: tuple[Tensor, Tensor], eps: float
) -> Tensor:
    """Per row: unmasked candidates with P_fn > ε, from given log-odds of every pair: all of
    them, less the masked ones (listed, each once)."""
    rows_M, cols_M = masked_entries
    n_fn_B = count_greater(log_odds_BN, fn_log_odds_threshold(eps))
    is_fn_M = is_false_negative(log_odds_BN[rows_M, cols_M], eps).to(torch.float64)
    return n_fn_B - torch.bincount(rows_M, weights=is_fn_M, minlength=log_odds_BN.shape[0]).long()


def _count_fn_listed(
    sim_BN: Tensor,
    masked_entries: tuple[Tensor, Tensor],
    fit: QuadraticFit,
    eps: float,
    chunk_rows: int,
) -> Tensor:
    """Per row: unmasked candidates with P_fn > ε, over all candidates (in cache-sized slices
    of rows), less the masked ones (listed)."""
    b = sim_BN.shape[0]
    rows_M, cols_M = masked_entries
    n_fn_B = torch.cat(
        [
            count_true(is_false_negative(fit.log_odds_sim(sim_BN[r : r + chunk_rows]), eps))
            for r in range(0, b, chunk_rows)
        ]
    )
    is_fn_M = is_false_negative(fit.log_odds_sim(sim_BN[rows_M, cols_M]), eps)
    return n_fn_B - torch.bincount(rows_M, weights=is_fn_M.to(torch.float64), minlength=b).long()


def _row_starts(flat_W: Tensor, b: int, n: int) -> Tensor:
    """Where each of the b rows starts in the sorted flat positions ``flat_W`` of a b × n
    matrix, and where the last ends (b + 1 indices): a binary search per row, where a count
    per entry (``bincount``) reads every entry."""
    bounds = torch.arange(b + 1, device=flat_W.device) * n
    return torch.searchsorted(flat_W, bounds)


def _row_sums(flag_W: Tensor, starts_B1: Tensor) -> Tensor:
    """Per row: how many of the listed entries are True (int64; row i's from starts_B1[i] to
    starts_B1[i + 1]): a running count read at the rows' starts (exact integers)."""
    running = torch.cat([flag_W.new_zeros(1, dtype=torch.long), flag_W.cumsum(0)])
    return running[starts_B1].diff()


def pack_window(entries: WindowEntries, n: int) -> WindowWeights:
    """The window's listed weights packed left-aligned into b × m rows, m the largest window
    (zero-padded), with their columns."""
    w_W, flat_W, starts_B1, n_fn_B = entries
    b = n_fn_B.shape[0]
    count_B = starts_B1.diff()
    m = max(int(count_B.max()) if b else 0, 1)
    rows_W = flat_W // n
    start_B = starts_B1[:-1]
    # Slot of each window entry in its row of the b × m layout, flattened.
    slot_W = torch.arange(flat_W.numel(), device=w_W.device) + (rows_W * m - start_B[rows_W])
    w_BM = w_W.new_zeros(b, m)
    col_BM = torch.zeros(b, m, dtype=torch.long, device=w_W.device)
    w_BM.view(-1)[slot_W] = w_W
    col_BM.view(-1)[slot_W] = flat_W - rows_W * n
    return WindowWeights(w_BM, col_BM, n_fn_B, count_B)


def fn_region_inside_window(fit: QuadraticFit, eps: float, threshold: float) -> bool:
    """True when no similarity in [−1, threshold] can have P_fn > ε, with a wide margin for
    float32 rounding of the log-odds: every candidate with P_fn > ε is then in the window.

    Host values (CPU path only). The log-odds are a quadratic in s, so their maximum over the
    interval is at an end or at the vertex.
    """
    alpha, beta, gamma = (float(t) for t in fit.coefficients())
    lo, hi = -1.0 - 1e-3, threshold + 1e-6
    if hi < lo:
        return True

    def log_odds(x: float) -> float:
        return (alpha * x + beta) * x + gamma

    peak = max(log_odds(lo), log_odds(hi))
    if alpha < 0 and lo < -beta / (2 * alpha) < hi:
        peak = max(peak, log_odds(-beta / (2 * alpha)))
    slack = 1e-5 * (abs(alpha) + abs(beta) + abs(gamma) + 1.0)
    return peak + slack < fn_log_odds_threshold(eps)

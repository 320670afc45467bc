"""How well FNE finds false negatives, measured against group labels (pure tensor functions).

Legend: b anchors of one chunk, X candidate slots per row (all N candidates in the dense form,
the hard-cut window's slots in the listed form), F the number of sums below.

Where group labels exist, a candidate is a *true false negative* of an anchor when it shares
the anchor's group. Only *evaluable* candidates count: not masked (same image id, the positive
column; with the oracle's ``mask_groups`` the group mates too) and both labels known (a
negative label is "no group label" and matches nothing). Two detectors are scored:

* "P_fn > ε": the posterior's decision (whether or not the gate is open, like the
  ``frac_pfn_gt_eps`` diagnostic);
* "inside the hard-cut window" (s > μ⁺ − margin, every evaluable candidate when no cut applies).

Per anchor the sums are, as the columns of a float64 b×F tensor (``COLUMNS``):

    n_eval, n_actual                    evaluable candidates, and those sharing the group
    pfn_pred, pfn_tp                    P_fn > ε, and those sharing the group
    window_pred, window_tp              inside the window, and those sharing the group
    rel{r}_n, rel{r}_p, rel{r}_fn       reliability bin r of P_fn (``RELIABILITY_EDGES``), over
                                        the evaluable candidates *inside the window* (the ones
                                        the weights act on): count, Σ P_fn, true FNs

precision = tp / pred, recall = tp / n_actual; a bin's predicted FN rate is p / n, its observed
rate fn / n. Sums, not ratios, so steps, windows and ranks add them exactly
(``detection_rates`` turns the totals into rates).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import host
from .groups import labelled, same_group
from .params import FneConfig
from .posterior import fn_log_odds_threshold
from .posteriors import quadratic_fit_of
from .stats import Gaussians
from .weights import WindowWeights

RELIABILITY_EDGES: tuple[float, ...] = (0.0, 1e-4, 1e-3, 1e-2, 0.1, 0.5, 1.0)
"""Bin edges of P_fn (log-spaced below 0.1: the posterior lives near the prior, 1e-4)."""

N_BINS = len(RELIABILITY_EDGES) - 1
COLUMNS: tuple[str, ...] = (
    "n_eval",
    "n_actual",
    "pfn_pred",
    "pfn_tp",
    "window_pred",
    "window_tp",
    *(f"rel{r}_{s}" for r in range(N_BINS) for s in ("n", "p", "fn")),
)
N_COLUMNS = len(COLUMNS)


def evaluable(groups_b: Tensor, cand_groups_X: Tensor, mask_bX: Tensor) -> Tensor:
    """b×X: unmasked candidates of labelled anchors that carry a label themselves."""
    known_bX = labelled(groups_b)[:, None] & labelled(cand_groups_X)
    return known_bX & ~mask_bX


def detection_sums(
    sim_bX: Tensor,
    eval_bX: Tensor,
    same_bX: Tensor,
    window_bX: Tensor,
    g: Gaussians,
    cfg: FneConfig,
    with_posterior: bool,
    log_odds_bX: Tensor | None = None,
) -> Tensor:
    """b×F per-anchor sums (float64) over the candidate slots X (see the module docstring).

    eval_bX: evaluable slots; same_bX: the slot's candidate shares the anchor's group;
    window_bX: inside the hard-cut window. with_posterior: score "P_fn > ε" and the
    reliability (the "fne" rule); otherwise those columns are 0. log_odds_bX: the posterior's
    log-odds when the caller has them (a posterior not a function of sim). Element-wise
    work and row sums only: no host sync.
    """
    f64 = torch.float64
    fn_bX = eval_bX & same_bX
    in_win_bX = eval_bX & window_bX
    cols = [eval_bX.sum(1), fn_bX.sum(1)]
    if with_posterior:
        if log_odds_bX is None:
            log_odds_bX = quadratic_fit_of(g, cfg.prior).log_odds_sim(sim_bX)
        pred_bX = eval_bX & (log_odds_bX > fn_log_odds_threshold(cfg.eps))
        cols += [pred_bX.sum(1), (pred_bX & same_bX).sum(1)]
    else:
        zeros_b = torch.zeros_like(cols[0])
        cols += [zeros_b, zeros_b]
    cols += [in_win_bX.sum(1), (in_win_bX & same_bX).sum(1)]
    out_bF = torch.stack(cols, dim=1).to(f64)
    if not with_posterior:
        rel_bR3 = torch.zeros(sim_bX.shape[0], N_BINS, 3, dtype=f64, device=sim_bX.device)
    elif host.on_host(in_win_bX):
        rel_bR3 = host_reliability(log_odds_bX, in_win_bX, same_bX)
    else:  # no data-dependent shapes on an accelerator: nonzero() would be a host sync
        rel_bR3 = dense_reliability(log_odds_bX, in_win_bX, same_bX)
    return torch.cat([out_bF, rel_bR3.flatten(1)], dim=1)


def dense_reliability(log_odds_bX: Tensor, in_win_bX: Tensor, same_bX: Tensor) -> Tensor:
    """b×R×3 float64 (count, Σ P_fn, true FNs) per reliability bin over the window's
    evaluable slots ``in_win_bX``: every slot evaluated in float64, the outside ones weighted
    0 (the definition; no host sync on an accelerator)."""
    f64 = torch.float64
    p_bX = log_odds_bX.to(f64).sigmoid()
    edges = torch.tensor(RELIABILITY_EDGES[1:-1], dtype=f64, device=p_bX.device)
    # bin r holds P_fn in [edge_r, edge_{r+1}); P_fn = 1 falls in the last bin.
    bin_bX = torch.bucketize(p_bX, edges, right=True)
    w_bX = in_win_bX.to(f64)
    rel_bR3 = torch.zeros(p_bX.shape[0], N_BINS, 3, dtype=f64, device=p_bX.device)
    for value_bX, k in ((w_bX, 0), (w_bX * p_bX, 1), (w_bX * same_bX, 2)):
        rel_bR3[:, :, k].scatter_add_(1, bin_bX, value_bX)
    return rel_bR3


def _bins(p_X: Tensor) -> Tensor:
    """``bucketize(p, inner edges, right=True)`` as 5 comparisons into uint8 (a fraction of its
    time on the CPU): the number of inner edges ≤ p, counted as those it is not below, so a
    NaN lands in the last bin as bucketize puts it."""
    below_X = torch.zeros(p_X.shape, dtype=torch.uint8, device=p_X.device)
    for edge in RELIABILITY_EDGES[1:-1]:
        below_X += p_X < edge
    return torch.sub(N_BINS - 1, below_X)


LISTED_MAX_FRACTION = 0.25
"""Above this share of the b×X slots inside the window, ``host_reliability`` keys every slot
(gathering the window's slots then costs more than it saves)."""


def host_reliability(log_odds_bX: Tensor, in_win_bX: Tensor, same_bX: Tensor) -> Tensor:
    """``dense_reliability`` on host tensors, bit for bit, at a fraction of its time: the
    float64 sums as ``bincount`` over a flat (row, bin) key, which adds each key's values
    sequentially in slot order, exactly what the dense scatter adds (its outside slots add
    exact zeros). A narrow window lists its slots and converts only those to P_fn in float64;
    a wide one keys every slot, the outside ones (and for the FN count the other groups') to
    a spare bin per row that is dropped."""
    f64 = torch.float64
    b, x = log_odds_bX.shape
    n_in = int(in_win_bX.sum())  # host tensors: no device sync
    if n_in <= LISTED_MAX_FRACTION * b * x:
        rows_W, cols_W = in_win_bX.nonzero(as_tuple=True)
        p_W = log_odds_bX[rows_W, cols_W].to(f64).sigmoid()
        width = N_BINS
        key_W = rows_W * width + _bins(p_W).long()
        fn_key_W = key_W[same_bX[rows_W, cols_W]]
    else:
        p_bX = log_odds_bX.to(f64).sigmoid()
        p_W, width = p_bX.flatten(), N_BINS + 1  # bin N_BINS of each row: the spare
        bin_bX = _bins(p_bX).masked_fill_(~in_win_bX, N_BINS)
        row0_b1 = width * torch.arange(b, device=p_bX.device)[:, None]
        key_W = (bin_bX.long() + row0_b1).flatten()
        fn_key_W = (bin_bX.masked_fill_(~same_bX, N_BINS).long() + row0_b1).flatten()
    size = b * width
    n_Z = torch.bincount(key_W, minlength=size)  # integer counts: exact
    fn_Z = torch.bincount(fn_key_W, minlength=size)
    p_Z = torch.bincount(key_W, weights=p_W, minlength=size)
    out_Z3 = torch.stack([n_Z.to(f64), p_Z, fn_Z.to(f64)], dim=1)
    return out_Z3.view(b, width, 3)[:, :N_BINS]


GroupLabels = tuple[Tensor, Tensor]
"""(the b anchors' group labels, the N candidates' group labels): what detection is scored
against."""


def known_unlabelled(groups_b: Tensor) -> bool:
    """No anchor of ``groups_b`` carries a group label, where reading that costs no device
    sync (host tensors; on an accelerator this answers False and the sums run). Data without
    group labels (Flickr/COCO-style captions) then skips detection's b×N passes: every sum of
    an unlabelled anchor's row is 0, so ``zero_detection`` is what they would have given."""
    return groups_b.device.type == "cpu" and not bool(labelled(groups_b).any())


def zero_detection(b: int, device: torch.device | str | None = None) -> Tensor:
    """b×F zeros: ``detection_sums`` of b anchors none of which is labelled."""
    return torch.zeros(b, N_COLUMNS, dtype=torch.float64, device=device)


def dense_detection(
    sim_bN: Tensor,
    mask_bN: Tensor,
    groups: GroupLabels,
    window_bN: Tensor,
    g: Gaussians,
    cfg: FneConfig,
    with_posterior: bool,
    log_odds_bN: Tensor | None = None,
) -> Tensor:
    """``detection_sums`` over every candidate: the definition (any device)."""
    groups_b, cand_groups_N = groups
    if known_unlabelled(groups_b):
        return zero_detection(sim_bN.shape[0], sim_bN.device)
    same_bN = same_group(groups_b[:, None], cand_groups_N[None, :])
    eval_bN = evaluable(groups_b, cand_groups_N, mask_bN)
    return detection_sums(sim_bN, eval_bN, same_bN, window_bN, g, cfg, with_posterior, log_odds_bN)


def listed_detection(
    sim_bN: Tensor,
    masked: tuple[Tensor, Tensor],
    groups: GroupLabels,
    window: WindowWeights,
    g: Gaussians,
    cfg: FneConfig,
    with_posterior: bool,
) -> Tensor:
    """``dense_detection`` from the hard-cut window's slots (``window.col_BM``, the first
    ``window.n_window_B`` of each row) and the listed mask, for a window that holds every
    candidate with P_fn > ε.

    Every predicted candidate is inside the window then, so the window's slots give every
    column except n_eval and n_actual, which are counts of labels: labelled (same-group)
    candidates of the whole row, by binary search in the sorted candidate labels, less the
    masked entries that are labelled (same-group).
    """
    groups_b, cand_groups_N = groups
    col_bM, n_window_b = window.col_BM, window.n_window_B
    b, m = col_bM.shape
    rows_M, cols_M = masked
    slot_bM = torch.arange(m, device=col_bM.device)[None, :] < n_window_b[:, None]
    cand_groups_bM = cand_groups_N[col_bM]
    same_bM = same_group(groups_b[:, None], cand_groups_bM)
    eval_bM = slot_bM & labelled(groups_b)[:, None] & labelled(cand_groups_bM)
    out_bF = detection_sums(
        sim_bN.gather(1, col_bM), eval_bM, same_bM, slot_bM, g, cfg, with_posterior
    )
    sorted_N = cand_groups_N.sort().values
    n_same_b = torch.searchsorted(sorted_N, groups_b, right=True) - torch.searchsorted(
        sorted_N, groups_b
    )
    n_labelled = labelled(cand_groups_N).sum()
    masked_groups_M = cand_groups_N[cols_M]
    labelled_M = labelled(masked_groups_M).to(torch.float64)
    same_M = same_group(masked_groups_M, groups_b[rows_M]).to(torch.float64)
    anchor_known_b = labelled(groups_b)
    n_eval_b = n_labelled - torch.bincount(rows_M, weights=labelled_M, minlength=b)
    n_actual_b = n_same_b - torch.bincount(rows_M, weights=same_M, minlength=b)
    out_bF[:, 0] = torch.where(anchor_known_b, n_eval_b, 0.0)
    out_bF[:, 1] = torch.where(anchor_known_b, n_actual_b, 0.0)
    return out_bF


def empty_detection(b: int, device: torch.device | str | None = None) -> Tensor:
    """b×0: no detection measured (no group labels, or the hardest rule)."""
    return torch.zeros(b, 0, dtype=torch.float64, device=device)


def detection_rates(totals: dict[str, float], prefix: str = "fnd_") -> dict[str, float]:
    """Precision/recall of both detectors, the share of evaluable candidates that are FNs, and
    the reliability curve, from summed (or equally averaged) columns ``{prefix}{column}``.

    A ratio whose denominator is 0 is NaN (nothing predicted, or no FN to find). Returns {}
    when the totals hold no detection columns, and no P_fn rates without P_fn columns.
    """
    if f"{prefix}n_eval" not in totals:
        return {}

    def ratio(num: float, den: float) -> float:
        return num / den if den > 0 else math.nan

    t = {c: float(totals.get(prefix + c, 0.0)) for c in COLUMNS}
    out = {
        "fn_rate": ratio(t["n_actual"], t["n_eval"]),
        "window_precision": ratio(t["window_tp"], t["window_pred"]),
        "window_recall": ratio(t["window_tp"], t["n_actual"]),
    }
    if f"{prefix}pfn_pred" not in totals:  # a rule without a posterior (window)
        return out
    out["pfn_precision"] = ratio(t["pfn_tp"], t["pfn_pred"])
    out["pfn_recall"] = ratio(t["pfn_tp"], t["n_actual"])
    for r in range(N_BINS):
        n = t[f"rel{r}_n"]
        out[f"rel{r}_predicted"] = ratio(t[f"rel{r}_p"], n)
        out[f"rel{r}_observed"] = ratio(t[f"rel{r}_fn"], n)
        out[f"rel{r}_count"] = n
    return out

"""Bidirectional retrieval losses: FNE (the paper) and its baselines in one harness.

Legend: B anchors (local batch), G gathered batch, K memory, N = G + K candidates, D embedding
dim, k negatives per anchor.

| loss      | candidates                 | rule                                               |
|-----------|----------------------------|----------------------------------------------------|
| `fne`     | [batch ; memory]           | FNE-weighted draw (docs/algorithm.md §2-4), or its  |
|           |                            | expectation (``fne.reduction: expected``)           |
| `window`  | [batch ; memory]           | uniform over the hard-cut window (no Bayes part)    |
| `vse_pp`  | batch, or [batch ; memory] | hardest negative (VSE++)                            |
| `vse0`    | batch                      | sum of hinges over all negatives                    |
| `infonce` | [batch ; memory]           | softmax CE, learnable temperature (ALBEF-style)     |
| `fne_sum` | [batch ; memory], or batch | sum of hinges, each weighted by P(true negative)    |
|           |                            | from the posterior (``fne.summed``)                 |

Triplet losses are the mean over anchors of i2t + t2i (the paper's sum of the two directions);
infonce is the mean of the two directions (ALBEF). ``mask_groups`` (the oracle) additionally
masks candidates sharing the anchor's group label.

Read top to bottom: ``retrieval_loss`` → ``_one_direction`` (the hinges of the picks) →
``_select`` (the one place that chunks rows and picks the selector of ``fne.selection``) →
the full-matrix losses (vse0, infonce).

Cost: the selection runs under no_grad on B×N similarities in row chunks so no B×N temporary
outlives a chunk, and the gradient is taken through the k selected similarities only (a B×k×D
product), not through a B×N matrix: same gradient, a fraction of the backward.

Diagnostics are returned as 0-dim tensors for the caller to log when it wants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .detection import COLUMNS as DETECTION_COLUMNS
from .groups import labelled, same_group
from .params import LOSSES, FneConfig
from .posterior import fn_log_odds_threshold
from .posteriors import PairSims, fit_of
from .rules import RULE_OF_LOSS, Rule
from .selection import (
    COUNTS,
    CandidateLabels,
    Picks,
    Rows,
    candidate_index,
    masked_positions,
    negative_mask,
    select_dense,
    select_listed,
    signal_fn_count,
)
from .stats import Gaussians
from .summed import SumSide, summed_diagnostics, weighted_sum_of_hinges
from .weights import window_is_everything


@dataclass
class Anchors:
    """Online embeddings of the local batch (with gradient) and where their positives are.

    pos_col_B: column of each anchor's own pair among the candidates (rank·B + i with a gathered
    batch: located explicitly, never assumed to be the diagonal).
    """

    img_BD: Tensor
    txt_BD: Tensor
    ids_B: Tensor
    pos_col_B: Tensor
    groups_B: Tensor | None = None


@dataclass
class Candidates:
    """Candidate embeddings [batch block ; memory block]; the first ``n_batch`` rows are the batch.

    ids_N: image id of each candidate (memory slots never written hold -100); groups_N: group
    label (negative = unknown, never matches).
    """

    img_ND: Tensor
    txt_ND: Tensor
    ids_N: Tensor
    n_batch: int
    groups_N: Tensor | None = None

    @classmethod
    def concat(cls, batch: Candidates, memory: Candidates | None) -> Candidates:
        if memory is None or memory.ids_N.numel() == 0:
            return batch
        groups = None
        if batch.groups_N is not None and memory.groups_N is not None:
            groups = torch.cat([batch.groups_N, memory.groups_N])
        return cls(
            img_ND=torch.cat([batch.img_ND, memory.img_ND]),
            txt_ND=torch.cat([batch.txt_ND, memory.txt_ND]),
            ids_N=torch.cat([batch.ids_N, memory.ids_N]),
            n_batch=batch.img_ND.shape[0],
            groups_N=groups,
        )

    def batch_only(self) -> Candidates:
        n = self.n_batch
        groups = None if self.groups_N is None else self.groups_N[:n]
        return Candidates(self.img_ND[:n], self.txt_ND[:n], self.ids_N[:n], n, groups)


class LossOutput(NamedTuple):
    loss: Tensor
    diagnostics: dict[str, Tensor]


def retrieval_loss(
    a: Anchors,
    c: Candidates,
    cfg: FneConfig,
    gaussians: Gaussians | None = None,
    uniforms_2Bk: Tensor | None = None,
    temperature: Tensor | None = None,
    loss: str | None = None,
    picks: tuple[Picks, Picks] | None = None,
) -> LossOutput:
    """The configured bidirectional loss (``loss`` overrides ``cfg.loss``, e.g. for warm-up).

    gaussians: needed by fne/window; uniforms_2Bk: uniforms of this rank's anchors for the two
    directions (i2t, t2i) from ``step_uniforms``; temperature: infonce's (clamped here).
    picks: the (i2t, t2i) selections made elsewhere (a sharded memory,
    ``distributed.sharded``), as columns of ``c``; the loss then selects nothing itself.
    """
    name = cfg.loss if loss is None else loss
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r} (valid: {', '.join(LOSSES)})")
    if name in ("vse0", "infonce"):
        return _full_matrix_loss(name, a, c, cfg, temperature, gaussians)
    if name == "fne_sum":
        if gaussians is None:
            raise ValueError("loss 'fne_sum' needs the running Gaussians (its posterior)")
        return _summed_loss(a, c.batch_only() if cfg.sum_scope == "batch" else c, cfg, gaussians)
    rule = RULE_OF_LOSS[name]
    cands = c.batch_only() if name == "vse_pp" and not cfg.vse_pp_memory else c
    if rule.draws and (gaussians is None or uniforms_2Bk is None):
        raise ValueError(f"loss {name!r} needs the running Gaussians and the step's uniforms")
    u = (None, None) if uniforms_2Bk is None else uniforms_2Bk.to(a.img_BD.device)
    if picks is None:
        picks = _select(a, cands, cfg, rule, gaussians, u)
    else:
        cands = c
    i2t, s1 = _one_direction(a.img_BD, cands.txt_ND, a, cands, cfg, picks[0])
    t2i, s2 = _one_direction(a.txt_BD, cands.img_ND, a, cands, cfg, picks[1])
    s = {key: s1[key] + s2[key] for key in s1}
    draws = s["draws"].clamp_min(1.0)
    diag = dict(
        loss_i2t=i2t.detach(),
        loss_t2i=t2i.detach(),
        fallback=s["fallback"],
        no_violator=s["no_violator"],
        frac_zero_hinge=s["zero_hinge"] / draws,
        mean_neg_sim=s["neg_sim"] / draws,
    )
    if a.groups_B is not None and c.groups_N is not None:
        # Group mates among the sampled negatives, over labelled draws only (fne.groups): NaN
        # (not measured) without any; the sums let windows and epochs form Σ/Σ (run_summary.py).
        n_labelled = s["labelled_draws"]
        share = s["same_group"] / n_labelled.clamp_min(1.0)
        diag["frac_neg_same_group"] = torch.where(n_labelled > 0, share, math.nan)
        diag["neg_same_group"], diag["neg_labelled"] = s["same_group"], n_labelled
        for key in DETECTION_COLUMNS if rule.draws else ():
            # no posterior: no P_fn columns
            if rule.uses_posterior or not key.startswith(("pfn_", "rel")):
                diag[f"fnd_{key}"] = s[f"fnd_{key}"]  # per-step sums: fne.detection
    if rule.uses_posterior:
        diag["frac_pfn_gt_eps"] = s["fn"] / s["unmasked"].clamp_min(1.0)
    if rule.draws:  # the share of candidates the draw spreads over
        diag["frac_in_window"] = s["window"] / s["unmasked"].clamp_min(1.0)
    if gaussians is not None:
        diag.update(gaussian_diagnostics(gaussians))
    return LossOutput(i2t + t2i, diag)


def _one_direction(
    anchor_BD: Tensor,
    cand_ND: Tensor,
    a: Anchors,
    c: Candidates,
    cfg: FneConfig,
    p: Picks,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean over anchors of the picked hinges for one direction, plus diagnostic sums."""
    # Gradient only through the selected similarities: s = a · c_j for the k picks and s⁺.
    pos_sim_B = (anchor_BD * cand_ND[a.pos_col_B]).sum(-1)
    if p.prob_bN.shape[1]:  # fne.reduction expected: Σ_j p_ij C_ij over every candidate
        per_anchor_B = _expected_hinges(anchor_BD, cand_ND, pos_sim_B, p.prob_bN, cfg.margin)
    else:
        neg_sim_Bk = torch.einsum("bd,bkd->bk", anchor_BD, cand_ND[p.index_bk])
        hinge_Bk = F.relu(cfg.margin + neg_sim_Bk - pos_sim_B[:, None]) * p.valid_bk
        per_anchor_B = hinge_Bk.sum(1) / p.valid_bk.sum(1).clamp_min(1)
    v = p.valid_bk.to(torch.float64)
    sums = {
        "draws": v.sum(),
        "zero_hinge": (p.zero_hinge_bk * v).sum(),
        "neg_sim": (p.sim_bk * v).sum(),
        **{name: p.count(name).sum() for name in COUNTS},
    }
    if a.groups_B is not None and c.groups_N is not None:
        # A negative label is "no group label" (fne.groups): it shares no group, not even with
        # itself.
        labelled_bk = labelled(a.groups_B)[:, None] & labelled(c.groups_N[p.index_bk])
        same_bk = same_group(c.groups_N[p.index_bk], a.groups_B[:, None])
        sums["same_group"] = (same_bk * v).sum()
        sums["labelled_draws"] = (labelled_bk * v).sum()
        if p.detect_bF.shape[1]:  # measured (the fne and window rules)
            detect_F = p.detect_bF.sum(0)
            sums |= {f"fnd_{key}": detect_F[i] for i, key in enumerate(DETECTION_COLUMNS)}
    return per_anchor_B.mean(), sums


def _expected_hinges(
    anchor_BD: Tensor, cand_ND: Tensor, pos_sim_B: Tensor, prob_BN: Tensor, margin: float
) -> Tensor:
    """Per anchor Σ_j p_ij · max(0, m + s_ij − s⁺_i), with autograd through the B×N similarity
    matrix (like vse0 and infonce; the sampled form needs only the k picks). The shares p carry
    no gradient: the expectation of the sampled loss, whose draw carries none either."""
    sim_BN = anchor_BD @ cand_ND.T
    hinge_BN = F.relu(margin + sim_BN - pos_sim_B[:, None])
    return (hinge_BN * prob_BN.to(hinge_BN.dtype)).sum(1)


DENSE_CHUNK_ELEMENTS = 1 << 19
"""A chunk of the dense weights holds ``fne.chunk_rows`` rows, or more while it stays under this
many elements: 8 rows of 65,664 candidates fit the cache, and at the default run's 1,056
candidates one chunk takes every row, so the step issues half the small ops (their dispatch,
not the arithmetic, is the cost at that size)."""


def _select(
    a: Anchors,
    c: Candidates,
    cfg: FneConfig,
    rule: Rule,
    g: Gaussians | None,
    u: tuple[Tensor | None, Tensor | None],
) -> tuple[Picks, Picks]:
    """The picks of every anchor in both directions (i2t, t2i; u: their uniforms), no
    gradient: per block of block_rows anchors one similarity matmul per direction (a chunked
    matmul would re-read all N×D candidates per chunk), then the selector on chunks of that
    block's rows, so no B×N temporary outlives a chunk. A posterior of the pair's images alone
    (``direction_free``) is evaluated once per block for both directions."""
    groups_B = a.groups_B if cfg.mask_groups else None
    select, chunk, index = _selector(c.img_ND.device, c, groups_B, cfg, rule, g)
    fit = None if not rule.uses_posterior or g is None else fit_of(g, cfg.prior)
    if fit is not None and g is not None and g.posterior is None:
        # the paper's fit, formed once: every chunk's ``fit_of(g, prior)`` then reads it instead
        # of deriving its coefficients again (a dozen 0-dim ops per chunk)
        g = replace(g, posterior=fit)
    # A posterior that is not a function of s (or the fallback that skips flagged candidates)
    # needs the log-odds of every pair, computed here; both forms take them (the listed one
    # reads them inside the window, for its P_fn > ε count and for the rows that fall back).
    every_pair = fit is not None and (not fit.quadratic or cfg.fallback == "unflagged")
    if every_pair and a.img_BD.shape[0] * c.ids_N.shape[0] <= DENSE_CHUNK_ELEMENTS:
        # every row in one dense chunk: fewer, larger ops than the listed form's (measured
        # at the default run's 16 × 1,056: bench/fne_phase.py), the same picks
        select, chunk, index = select_dense, cfg.chunk_rows, None
    if chunk == cfg.chunk_rows:  # short rows: more of them per chunk (fewer small ops)
        chunk = max(chunk, DENSE_CHUNK_ELEMENTS // max(1, c.ids_N.shape[0]))
    measure = a.groups_B is not None and c.groups_N is not None and rule.draws
    fallback_cols = c.n_batch if cfg.fallback_scope == "batch" and rule.draws else None
    cands = CandidateLabels(c.ids_N, c.groups_N)
    # The listed form with a posterior quadratic in a pair signal (the default's image-image
    # similarity) takes the signal instead of every pair's float64 log-odds: it evaluates them
    # only where read, and the P_fn > ε count (the same for both directions) once per block.
    listed = c.img_ND.device.type == "cpu" and select is not select_dense
    signal = every_pair and listed and not measure
    signal = signal and fit.signal_quadratic and fit.direction_free  # type: ignore[union-attr]
    # A fit whose log-odds stay below logit(ε) for every signal flags no pair: the signal's
    # product (a third B×N×D matmul) and the P_fn > ε count are then skipped, same picks.
    unflagged = signal and fit.max_signal_log_odds() < fn_log_odds_threshold(cfg.eps)  # type: ignore[union-attr]
    signal = signal and not unflagged
    given = every_pair and not (signal or unflagged)  # every pair's log-odds, computed here
    directions = ((a.img_BD, c.txt_ND.detach(), u[0]), (a.txt_BD, c.img_ND.detach(), u[1]))
    picks: tuple[list[Picks], list[Picks]] = ([], [])
    with torch.no_grad():
        for b0 in range(0, a.img_BD.shape[0], cfg.block_rows):
            block = slice(b0, b0 + cfg.block_rows)
            odds_bN = x_bN = fn_all_b = t2i_bN = None
            masked_of: dict[int, tuple[Tensor, Tensor]] = {}  # listed once for both directions
            if signal:
                assert g is not None and fit is not None
                # one product gives t2i's similarities and the signal: both read the
                # candidates' images (measured: 256 rows cost 18 % less than 2 × 128)
                nb = a.txt_BD[block].shape[0]
                both = torch.cat([a.txt_BD[block], a.img_BD[block]]).detach() @ c.img_ND.T.detach()
                t2i_bN, x_bN = both[:nb], both[nb:]
                fn_all_b = signal_fn_count(x_bN, g, cfg, cfg.chunk_rows)
            for parts, (anchor_BD, cand_ND, u_Bk) in zip(picks, directions, strict=True):
                if t2i_bN is not None and anchor_BD is a.txt_BD:
                    sim_bN = t2i_bN
                else:
                    sim_bN = anchor_BD[block].detach() @ cand_ND.T
                if given and (odds_bN is None or not fit.direction_free):  # type: ignore[union-attr]
                    assert fit is not None
                    pairs = PairSims(sim_bN, a.img_BD[block], c.img_ND)
                    odds_bN = fit.log_odds(pairs).to(sim_bN.dtype)
                for r0 in range(0, sim_bN.shape[0], chunk):
                    rows = slice(b0 + r0, b0 + min(sim_bN.shape[0], r0 + chunk))
                    local = slice(r0, r0 + chunk)
                    if index is not None and r0 not in masked_of:
                        masked_of[r0] = masked_positions(
                            a.ids_B[rows], a.pos_col_B[rows], index, c.ids_N.shape[0],
                            None if groups_B is None else groups_B[rows],
                        )  # fmt: skip
                    chunk_rows = Rows(
                        sim_bN[local],
                        a.pos_col_B[rows],
                        a.ids_B[rows],
                        u_bk=None if u_Bk is None else u_Bk[rows],
                        mask_groups_b=None if groups_B is None else groups_B[rows],
                        detect_groups_b=a.groups_B[rows] if measure else None,  # type: ignore[index]
                        log_odds_bN=None if odds_bN is None else odds_bN[local],
                        fallback_cols=fallback_cols,
                        signal_bN=None if x_bN is None else x_bN[local],
                        fn_all_b=None if fn_all_b is None else fn_all_b[local],
                        unflagged=unflagged,
                        masked=masked_of.get(r0),
                    )
                    parts.append(select(chunk_rows, cands, g, cfg, rule))
    return tuple(  # type: ignore[return-value]
        Picks(*(torch.cat(fields) for fields in zip(*parts, strict=True))) for parts in picks
    )


def _selector(
    device: torch.device,
    c: Candidates,
    groups_B: Tensor | None,
    cfg: FneConfig,
    rule: Rule,
    g: Gaussians | None,
):
    """(selector, rows per chunk, the sorted candidate ids of the listed form or None) for
    this step.

    CPU: ``select_listed`` (eager, it beats the compiled dense form there: bench/sampler.py),
    with the candidate ids sorted once for every chunk. It makes few passes over b×N, so it
    takes ``window_chunk_rows`` (less per-op overhead), except when its weights are dense (no
    hard cut applies): then cache-sized ``chunk_rows``. Elsewhere: ``select_dense`` (no host
    sync), fused by torch.compile when ``cfg.compile``, in chunks of ``chunk_rows``.
    """
    if device.type != "cpu":
        return _compiled_dense() if cfg.compile else select_dense, cfg.chunk_rows, None
    index = candidate_index(c.ids_N, None if groups_B is None else c.groups_N)
    assert not rule.draws or g is not None
    dense_weights = rule.draws and window_is_everything(g, cfg)  # type: ignore[arg-type]
    chunk = cfg.chunk_rows if dense_weights else cfg.window_chunk_rows
    return partial(select_listed, index=index), chunk, index


_compiled_select_dense = None


def _compiled_dense():
    """``select_dense`` fused by torch.compile (compiled once per process)."""
    global _compiled_select_dense
    if _compiled_select_dense is None:
        _compiled_select_dense = torch.compile(select_dense, dynamic=False)
    return _compiled_select_dense


def _full_matrix_loss(
    name: str,
    a: Anchors,
    c: Candidates,
    cfg: FneConfig,
    temperature: Tensor | None,
    gaussians: Gaussians | None = None,
) -> LossOutput:
    """vse0 (over the batch) or infonce (over [batch ; memory]): losses over every candidate,
    with autograd through the B×N matrix."""
    diag: dict[str, Tensor] = {}
    if name == "vse0":
        cands = c.batch_only()
        i2t = _sum_of_hinges(a.img_BD, cands.txt_ND, a, cands, cfg)
        t2i = _sum_of_hinges(a.txt_BD, cands.img_ND, a, cands, cfg)
        total = i2t + t2i
    else:
        if temperature is None:
            raise ValueError("infonce needs a temperature tensor")
        # 0-dim: the model's temperature is a 1-element parameter, and the diagnostics must
        # all be scalars (the log window stacks them)
        temp = temperature.clamp(cfg.temperature_min, cfg.temperature_max).reshape(())
        i2t = _info_nce(a.img_BD, c.txt_ND, a, c, cfg, temp)
        t2i = _info_nce(a.txt_BD, c.img_ND, a, c, cfg, temp)
        total = 0.5 * (i2t + t2i)
        diag["temperature"] = temp.detach()
    diag.update(loss_i2t=i2t.detach(), loss_t2i=t2i.detach())
    return LossOutput(total, diag)


def _summed_loss(a: Anchors, c: Candidates, cfg: FneConfig, g: Gaussians) -> LossOutput:
    """fne_sum: both directions of ``fne.summed.weighted_sum_of_hinges`` (the posterior reads
    the anchors' and candidates' images in both, as the sampler's does)."""
    sides = (
        SumSide(c.txt_ND, c.ids_N, c.groups_N, a.img_BD, c.img_ND),
        SumSide(c.img_ND, c.ids_N, c.groups_N, a.img_BD, c.img_ND),
    )
    (i2t, s1), (t2i, s2) = (
        weighted_sum_of_hinges(anchor, side, a.ids_B, a.pos_col_B, a.groups_B, g, cfg)
        for anchor, side in zip((a.img_BD, a.txt_BD), sides, strict=True)
    )
    diag = summed_diagnostics({k: s1[k] + s2[k] for k in s1}, DETECTION_COLUMNS)
    diag.update(loss_i2t=i2t.detach(), loss_t2i=t2i.detach(), **gaussian_diagnostics(g))
    return LossOutput(i2t + t2i, diag)


def _sum_of_hinges(
    anchor_BD: Tensor, cand_ND: Tensor, a: Anchors, c: Candidates, cfg: FneConfig
) -> Tensor:
    """VSE0: mean over anchors of Σ_j max(0, m + s_ij − s⁺_i) over unmasked candidates."""
    sim_BN = anchor_BD @ cand_ND.T
    pos_B = sim_BN.gather(1, a.pos_col_B[:, None])
    mask_BN = negative_mask(
        a.ids_B, a.pos_col_B, c.ids_N, a.groups_B if cfg.mask_groups else None, c.groups_N
    )
    return F.relu(cfg.margin + sim_BN - pos_B).masked_fill(mask_BN, 0.0).sum(1).mean()


def _info_nce(
    anchor_BD: Tensor,
    cand_ND: Tensor,
    a: Anchors,
    c: Candidates,
    cfg: FneConfig,
    temperature: Tensor,
) -> Tensor:
    """Softmax CE with targets spread uniformly over all same-id candidates (ALBEF with ids)."""
    logits_BN = anchor_BD @ cand_ND.T / temperature
    positive_BN = negative_mask(a.ids_B, a.pos_col_B, c.ids_N)
    if cfg.mask_groups and a.groups_B is not None and c.groups_N is not None:
        oracle_BN = negative_mask(a.ids_B, a.pos_col_B, c.ids_N, a.groups_B, c.groups_N)
        logits_BN = logits_BN.masked_fill(oracle_BN & ~positive_BN, float("-inf"))
    target_BN = positive_BN / positive_BN.sum(1, keepdim=True)
    return -(target_BN * F.log_softmax(logits_BN, dim=1)).sum(1).mean()


def gaussian_diagnostics(g: Gaussians) -> dict[str, Tensor]:
    """Gate state, positive count, μ±/σ± (and the fitted posterior's parameters) as 0-dim
    tensors."""
    out = {} if g.posterior is None else g.posterior.diagnostics()
    return out | {
        "gate_open": g.gate_open.to(torch.float64),
        "n_pos": g.n_pos,
        "mu_pos": torch.where(g.has_mu_pos, g.mu_pos, torch.nan),
        "sigma_pos": g.var_pos.sqrt(),
        "mu_neg": g.mu_neg,
        "sigma_neg": g.var_neg.sqrt(),
    }

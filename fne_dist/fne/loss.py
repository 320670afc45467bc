"""Bidirectional retrieval losses: FNE (the paper) and its baselines in one harness.

Legend: B anchors (local batch), G gathered batch, K memory, N = G + K candidates, D embedding
dim, k negatives per anchor.

| loss      | candidates                 | rule                                               |
|-----------|----------------------------|----------------------------------------------------|
| `fne`     | [batch ; memory]           | FNE-weighted draw (fne-algorithm.md §2-4)           |
| `window`  | [batch ; memory]           | uniform over the hard-cut window (no Bayes part)    |
| `vse_pp`  | batch, or [batch ; memory] | hardest negative (VSE++)                            |
| `vse0`    | batch                      | sum of hinges over all negatives                    |
| `infonce` | [batch ; memory]           | softmax CE, learnable temperature (ALBEF-style)     |

Triplet losses are the mean over anchors of i2t + t2i (the paper's sum of the two directions);
infonce is the mean of the two directions (ALBEF). ``mask_groups`` (the oracle) additionally
masks candidates sharing the anchor's group label.

Cost: the selection runs under no_grad on B×N similarities in row chunks so no B×N temporary
outlives a chunk, and the gradient is taken through the k selected similarities only (a B×k×D
product), not through a B×N matrix: same gradient, a fraction of the backward. The selection
has two forms with the same picks (``select_chunk``):

- dense (accelerators, torch.compile): every step is B×N element-wise work or a reduction, with
  no host sync; the draw and the hardest candidate are found in two levels (block sums/maxima,
  then one block), so no B×N cumulative sum or argmax is written;
- CPU: the masked entries (a few per anchor) are listed by binary search in the sorted ids, and
  the weights are computed in the hard-cut window only, which holds ~0.1-2 % of the candidates
  in our runs (``frac_in_window``); a wide window (no μ⁺ yet, ``hard_cut: false``) falls back to
  the dense form. bench/sampler.py measures both.

Diagnostics are returned as 0-dim tensors for the caller to log when it wants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .params import LOSSES, FneConfig
from .sampling import draw_negatives, first_argmax
from .stats import Gaussians
from .weights import (
    Weights,
    WindowWeights,
    count_true,
    sampling_weights,
    window_is_everything,
    window_weights,
)

# On the CPU, weights are computed on the hard-cut window alone while it holds at most this
# fraction of the candidates (bench/sampler.py measures both forms).
WINDOW_MAX_FRACTION = 0.25


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
        mask_BN |= (groups_B[:, None] == cand_groups_N[None, :]) & (groups_B[:, None] >= 0)
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


def _equal_entries(keys_b: Tensor, sorted_N: Tensor, order_N: Tensor) -> tuple[Tensor, Tensor]:
    """(row, column) of every candidate whose key equals its row's key."""
    lo_b = torch.searchsorted(sorted_N, keys_b)
    count_b = torch.searchsorted(sorted_N, keys_b, right=True) - lo_b
    rows_M = torch.repeat_interleave(torch.arange(keys_b.shape[0], device=keys_b.device), count_b)
    start_b = count_b.cumsum(0) - count_b
    offset_M = torch.arange(rows_M.shape[0], device=keys_b.device) - start_b[rows_M]
    return rows_M, order_N[lo_b[rows_M] + offset_M]


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


class _Picks(NamedTuple):
    """Per-anchor result of the selection for one chunk of anchor rows (b rows)."""

    index_bk: Tensor  # drawn candidate columns
    valid_bk: Tensor  # the draw exists (see sampling.draw_negatives)
    zero_hinge_bk: Tensor  # the drawn candidate does not violate the margin
    sim_bk: Tensor  # similarity of the drawn candidate
    fallback_b: Tensor
    no_violator_b: Tensor
    n_fn_b: Tensor  # unmasked candidates with P_fn > ε
    n_unmasked_b: Tensor
    n_window_b: Tensor  # candidates in the hard-cut window (0 for the hardest rule)


def select_chunk(
    sim_bN: Tensor,
    pos_col_b: Tensor,
    ids_b: Tensor,
    cand_ids_N: Tensor,
    groups_b: Tensor | None,
    cand_groups_N: Tensor | None,
    u_bk: Tensor | None,
    g: Gaussians | None,
    cfg: FneConfig,
    rule: str,
    index: CandidateIndex | None = None,
    form: str = "auto",
) -> _Picks:
    """Select the negatives of b anchors from their similarity rows (no gradient).

    rule: "hardest" (VSE++), "fne" or "window". Two forms with the same picks: on a CPU tensor
    outside torch.compile, the masked entries are listed by binary search (``index``: the
    sorted candidate ids, built here if not given) and the weights are evaluated inside the
    hard-cut window only (``window_weights``); elsewhere (CUDA, or ``FneConfig.compile``) the
    pipeline is dense B×N element-wise work, with no host sync, which torch.compile fuses.
    ``form`` ("auto", "listed" or "dense") forces one form, for tests and benchmarks.
    """
    b, n = sim_bN.shape
    pos_sim_b = sim_bN.gather(1, pos_col_b[:, None]).squeeze(1)
    if form not in ("auto", "listed", "dense"):
        raise ValueError(f"unknown sampler form {form!r} (valid: auto, listed, dense)")
    listed = form == "listed" or (
        form == "auto" and sim_bN.device.type == "cpu" and not torch.compiler.is_compiling()
    )
    mask_bN: Tensor | None = None
    if listed and rule != "hardest" and b > cfg.chunk_rows:
        assert g is not None
        if window_is_everything(g, cfg):  # the dense form throughout, in cache-sized chunks
            parts = [
                select_chunk(
                    sim_bN[r0 : r0 + cfg.chunk_rows],
                    pos_col_b[r0 : r0 + cfg.chunk_rows],
                    ids_b[r0 : r0 + cfg.chunk_rows],
                    cand_ids_N,
                    None if groups_b is None else groups_b[r0 : r0 + cfg.chunk_rows],
                    cand_groups_N,
                    None if u_bk is None else u_bk[r0 : r0 + cfg.chunk_rows],
                    g,
                    cfg,
                    rule,
                    index,
                    form="listed",
                )
                for r0 in range(0, b, cfg.chunk_rows)
            ]
            return _Picks(*(torch.cat(p) for p in zip(*parts, strict=True)))
    if listed:
        if index is None:
            index = candidate_index(cand_ids_N, None if groups_b is None else cand_groups_N)
        rows_M, cols_M = masked_positions(ids_b, pos_col_b, index, n, groups_b)
        masked_sim_bN = sim_bN.index_put((rows_M, cols_M), sim_bN.new_full((), -math.inf))
    else:
        mask_bN = negative_mask(ids_b, pos_col_b, cand_ids_N, groups_b, cand_groups_N)
        masked_sim_bN = sim_bN.masked_fill(mask_bN, -math.inf)
    # The hardest unmasked candidate, found in two levels (block maxima, then one block):
    # cheaper than an argmax over B×N. VSE++'s negative and FNE's fallback.
    best_b, h_b = first_argmax(masked_sim_bN)
    has_violator_b = (cfg.margin + best_b - pos_sim_b) > 0
    zeros_b = torch.zeros_like(pos_col_b)
    if rule == "hardest":
        idx_bk, valid_bk = h_b[:, None], has_violator_b[:, None]
        fallback_b, no_violator_b, n_fn_b = zeros_b.bool(), ~has_violator_b, zeros_b
        n_unmasked_b = n_window_b = zeros_b
    else:
        assert g is not None and u_bk is not None
        w: Weights | WindowWeights | None = None
        if listed:
            n_unmasked_b = n - torch.bincount(rows_M, minlength=b)
            w = window_weights(
                sim_bN, pos_sim_b, masked_sim_bN, rows_M, cols_M, g, cfg, rule, WINDOW_MAX_FRACTION
            )
            if w is None:  # a wide window: the dense form
                mask_bN = torch.zeros_like(sim_bN, dtype=torch.bool).index_put_(
                    (rows_M, cols_M), torch.tensor(True)
                )
        else:
            assert mask_bN is not None
            n_unmasked_b = n - count_true(mask_bN)
        if isinstance(w, WindowWeights):
            d = draw_negatives(w.w_BM, u_bk, h_b, has_violator_b, w.col_BM)
        else:
            assert mask_bN is not None
            w = sampling_weights(
                sim_bN,
                pos_sim_b,
                mask_bN,
                g,
                cfg,
                rule,
                masked_sim_bN,
                (rows_M, cols_M) if listed else None,
            )
            d = draw_negatives(w.w_BN, u_bk, h_b, has_violator_b)
        idx_bk, valid_bk = d.index_Bk, d.valid_Bk
        fallback_b, no_violator_b, n_fn_b = d.fallback_B, d.no_violator_B, w.n_fn_B
        n_window_b = w.n_window_B
    neg_sim_bk = sim_bN.gather(1, idx_bk)
    return _Picks(
        index_bk=idx_bk,
        valid_bk=valid_bk,
        zero_hinge_bk=(cfg.margin + neg_sim_bk - pos_sim_b[:, None]) <= 0,
        sim_bk=neg_sim_bk,
        fallback_b=fallback_b,
        no_violator_b=no_violator_b,
        n_fn_b=n_fn_b,
        n_unmasked_b=n_unmasked_b,
        n_window_b=n_window_b,
    )


_compiled_select_chunk = None


def _selector(cfg: FneConfig):
    """``select_chunk``, fused by torch.compile when ``cfg.compile`` (compiled once per process)."""
    global _compiled_select_chunk
    if not cfg.compile:
        return select_chunk
    if _compiled_select_chunk is None:
        _compiled_select_chunk = torch.compile(select_chunk, dynamic=False)
    return _compiled_select_chunk


def _one_direction(
    anchor_BD: Tensor,
    cand_ND: Tensor,
    a: Anchors,
    c: Candidates,
    cfg: FneConfig,
    rule: str,
    g: Gaussians | None,
    u_Bk: Tensor | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean over anchors of the selected hinges for one direction, plus diagnostic sums."""
    B = anchor_BD.shape[0]
    groups_B = a.groups_B if cfg.mask_groups else None
    on_cpu = cand_ND.device.type == "cpu"
    # On the CPU the eager window form beats the compiled dense one (bench/sampler.py): compile
    # serves accelerators, where the dense form is the one without host syncs.
    select = select_chunk if on_cpu else _selector(cfg)
    picks: list[_Picks] = []
    cand_detached_ND = cand_ND.detach()
    index = None
    if on_cpu:  # candidate ids sorted once for every chunk
        index = candidate_index(c.ids_N, None if groups_B is None else c.groups_N)
    with torch.no_grad():
        # The CPU window form makes few passes over B×N, so it takes larger chunks (less
        # per-op overhead); it falls back to the dense form in chunks of chunk_rows.
        chunk = cfg.window_chunk_rows if on_cpu and (rule == "hardest" or cfg.hard_cut) else None
        chunk = chunk or cfg.chunk_rows
        for b0 in range(0, B, cfg.block_rows):
            # One matmul per block of rows (a chunked matmul would re-read all N×D candidates
            # per chunk), then the element-wise pipeline in cache-sized chunks of that block.
            sim_bN = anchor_BD[b0 : b0 + cfg.block_rows].detach() @ cand_detached_ND.T
            for r0 in range(0, sim_bN.shape[0], chunk):
                rows = slice(b0 + r0, b0 + min(sim_bN.shape[0], r0 + chunk))
                picks.append(
                    select(
                        sim_bN[r0 : r0 + chunk],
                        a.pos_col_B[rows],
                        a.ids_B[rows],
                        c.ids_N,
                        None if groups_B is None else groups_B[rows],
                        c.groups_N,
                        None if u_Bk is None else u_Bk[rows],
                        g,
                        cfg,
                        rule,
                        index,
                    )
                )
    p = _Picks(*(torch.cat(parts) for parts in zip(*picks, strict=True)))
    # Gradient only through the selected similarities: s = a · c_j for the k picks and s⁺.
    pos_sim_B = (anchor_BD * cand_ND[a.pos_col_B]).sum(-1)
    neg_sim_Bk = torch.einsum("bd,bkd->bk", anchor_BD, cand_ND[p.index_bk])
    hinge_Bk = F.relu(cfg.margin + neg_sim_Bk - pos_sim_B[:, None]) * p.valid_bk
    per_anchor_B = hinge_Bk.sum(1) / p.valid_bk.sum(1).clamp_min(1)
    v = p.valid_bk.to(torch.float64)
    sums = {
        "draws": v.sum(),
        "zero_hinge": (p.zero_hinge_bk * v).sum(),
        "neg_sim": (p.sim_bk * v).sum(),
        "fallback": p.fallback_b.sum().to(torch.float64),
        "no_violator": p.no_violator_b.sum().to(torch.float64),
        "fn": p.n_fn_b.sum().to(torch.float64),
        "unmasked": p.n_unmasked_b.sum().to(torch.float64),
        "window": p.n_window_b.sum().to(torch.float64),
    }
    if a.groups_B is not None and c.groups_N is not None:
        sums["same_group"] = ((c.groups_N[p.index_bk] == a.groups_B[:, None]) * v).sum()
    return per_anchor_B.mean(), sums


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


def retrieval_loss(
    a: Anchors,
    c: Candidates,
    cfg: FneConfig,
    gaussians: Gaussians | None = None,
    uniforms_2Bk: Tensor | None = None,
    temperature: Tensor | None = None,
    loss: str | None = None,
) -> LossOutput:
    """The configured bidirectional loss (``loss`` overrides ``cfg.loss``, e.g. for warm-up).

    gaussians: needed by fne/window; uniforms_2Bk: uniforms of this rank's anchors for the two
    directions (i2t, t2i) from ``step_uniforms``; temperature: infonce's (clamped here).
    """
    name = cfg.loss if loss is None else loss
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r} (valid: {', '.join(LOSSES)})")
    diag: dict[str, Tensor] = {}
    if name in ("vse0", "infonce"):
        cands = c.batch_only() if name == "vse0" else c
        if name == "vse0":
            i2t = _sum_of_hinges(a.img_BD, cands.txt_ND, a, cands, cfg)
            t2i = _sum_of_hinges(a.txt_BD, cands.img_ND, a, cands, cfg)
            total = i2t + t2i
        else:
            if temperature is None:
                raise ValueError("infonce needs a temperature tensor")
            temp = temperature.clamp(cfg.temperature_min, cfg.temperature_max)
            i2t = _info_nce(a.img_BD, cands.txt_ND, a, cands, cfg, temp)
            t2i = _info_nce(a.txt_BD, cands.img_ND, a, cands, cfg, temp)
            total = 0.5 * (i2t + t2i)
            diag["temperature"] = temp.detach()
        diag.update(loss_i2t=i2t.detach(), loss_t2i=t2i.detach())
        return LossOutput(total, diag)

    rule = {"fne": "fne", "window": "window", "vse_pp": "hardest"}[name]
    cands = c.batch_only() if name == "vse_pp" and not cfg.vse_pp_memory else c
    if rule != "hardest" and (gaussians is None or uniforms_2Bk is None):
        raise ValueError(f"loss {name!r} needs the running Gaussians and the step's uniforms")
    u = (None, None) if uniforms_2Bk is None else uniforms_2Bk.to(a.img_BD.device)
    i2t, s1 = _one_direction(a.img_BD, cands.txt_ND, a, cands, cfg, rule, gaussians, u[0])
    t2i, s2 = _one_direction(a.txt_BD, cands.img_ND, a, cands, cfg, rule, gaussians, u[1])
    s = {key: s1[key] + s2[key] for key in s1}
    draws = s["draws"].clamp_min(1.0)
    diag.update(
        loss_i2t=i2t.detach(),
        loss_t2i=t2i.detach(),
        fallback=s["fallback"],
        no_violator=s["no_violator"],
        frac_zero_hinge=s["zero_hinge"] / draws,
        mean_neg_sim=s["neg_sim"] / draws,
    )
    if a.groups_B is not None and c.groups_N is not None:
        diag["frac_neg_same_group"] = s["same_group"] / draws  # group mates among negatives
    if rule == "fne":
        diag["frac_pfn_gt_eps"] = s["fn"] / s["unmasked"].clamp_min(1.0)
    if rule != "hardest":  # the share of candidates the draw spreads over
        diag["frac_in_window"] = s["window"] / s["unmasked"].clamp_min(1.0)
    if gaussians is not None:
        diag.update(gaussian_diagnostics(gaussians))
    return LossOutput(i2t + t2i, diag)


def gaussian_diagnostics(g: Gaussians) -> dict[str, Tensor]:
    """Gate state, positive count and μ±/σ± as 0-dim tensors."""
    return {
        "gate_open": g.gate_open.to(torch.float64),
        "n_pos": g.n_pos,
        "mu_pos": torch.where(g.has_mu_pos, g.mu_pos, torch.nan),
        "sigma_pos": g.var_pos.sqrt(),
        "mu_neg": g.mu_neg,
        "sigma_neg": g.var_neg.sqrt(),
    }


class RetrievalLoss(nn.Module):
    """The harness as a module: owns infonce's learnable temperature (ALBEF init 0.07)."""

    def __init__(self, cfg: FneConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.temperature = nn.Parameter(torch.tensor(cfg.temperature))

    def forward(
        self,
        a: Anchors,
        c: Candidates,
        gaussians: Gaussians | None = None,
        uniforms_2Bk: Tensor | None = None,
        loss: str | None = None,
    ) -> LossOutput:
        return retrieval_loss(a, c, self.cfg, gaussians, uniforms_2Bk, self.temperature, loss)

    def with_config(self, **changes: object) -> RetrievalLoss:
        """A copy with some fields changed (for ablations in one process)."""
        out = RetrievalLoss(replace(self.cfg, **changes))  # type: ignore[arg-type]
        out.temperature = self.temperature
        return out

"""Phases 1-5 of one training step (docs/algorithm.md "Step order"), shared by the loop and the
multi-rank tests.

Legend: B local batch, G = W·B global batch, K memory, D embedding dim.

Only the two calls into ``distributed`` communicate (all_gather, all_reduce); at world size 1
both are identities. The caller does backward/optimizer step, the EMA and ``memory.enqueue``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import distributed as dist_ops
from .fne import (
    Anchors,
    Candidates,
    FneConfig,
    SimilarityStats,
    mutual_top1_stats,
    retrieval_loss,
)
from .fne.estimators import (
    all_pairs_stats,
    em_sums,
    prior_from_em,
    random_candidate_sims,
    sample_columns,
    with_prior,
)
from .fne.fn_signal import histogram_bins, intra_candidate_sims, signal_histograms, with_signals
from .fne.sampling import step_uniforms
from .memory import MomentumMemory
from .timing import NullTimer

Encoder = Callable[[dict[str, Tensor]], tuple[Tensor, Tensor, Tensor]]


@dataclass
class StepOutput:
    loss: Tensor
    diagnostics: dict[str, Tensor]
    gathered: Candidates  # the momentum block of the global batch, to enqueue after the step
    staleness: Tensor  # (sum of cosines, count) of this rank's anchors found in the memory


def forward_step(
    online: Encoder,
    momentum: nn.Module,
    batch: dict[str, Tensor],
    memory: MomentumMemory,
    stats: SimilarityStats,
    cfg: FneConfig,
    seed: int,
    step: int,
    warmup: bool,
    timer: NullTimer | None = None,
) -> StepOutput:
    """The loss of one micro-batch; ``batch`` holds this rank's B pairs (model inputs + ids).

    ``timer`` (optional) receives the phases online/momentum/gather/reduce/loss."""
    t = timer or NullTimer()
    ids_B, groups_B = batch["ids"], batch["groups"]
    B, device = ids_B.shape[0], ids_B.device
    rank = dist_ops.rank()
    with t.phase("online_forward"):
        img_BD, txt_BD, temperature = online(batch)  # 1. online embeddings
    with t.phase("momentum_forward"), torch.no_grad():
        m_img_BD, m_txt_BD, _ = momentum(batch)  # 2. momentum embeddings
    with t.phase("gather"):  # 3. gather momentum embeddings and ids, in rank order
        gathered = Candidates(
            dist_ops.all_gather_no_grad(m_img_BD.float()),
            dist_ops.all_gather_no_grad(m_txt_BD.float()),
            dist_ops.all_gather_no_grad(ids_B),
            B * dist_ops.world_size(),
            dist_ops.all_gather_no_grad(groups_B),
        )
    G = gathered.n_batch
    candidates = Candidates.concat(gathered, memory.candidates())
    if cfg.stats_scope == "global":  # 4. the rule over the gathered G×G *momentum* matrix:
        # every rank computes the same sums, so no reduction is needed.
        batch_stats = _batch_stats(
            gathered.img_ND, gathered.txt_ND, gathered.ids_N, candidates, stats, cfg, seed, step
        )
    else:  # 4. reference meaning: each rank's own B×B online matrix, then SUM over ranks
        local = _batch_stats(img_BD, txt_BD, ids_B, candidates, stats, cfg, seed, step, rank, G)
        with t.phase("reduce"):
            batch_stats = dist_ops.all_reduce_sum(local)
    stats.add(batch_stats[:6])
    gauss = stats.gaussians(cfg.gate_size, cfg.var_floor, cfg.variance)
    if cfg.prior_mode == "em":
        stats.add_em(batch_stats[6:8])
        gauss = with_prior(gauss, prior_from_em(stats.em_totals, cfg.prior))
    if cfg.fn_model == "mixture":  # the last sums: this step's histogram(s) (fne.fn_signal)
        stats.add_mixture(batch_stats[-histogram_bins(cfg.fn_signal) :], cfg.mixture_decay)
        gauss = with_signals(gauss, stats.mix_totals, cfg.fn_signal, cfg.var_floor)
    stale = torch.zeros(2, dtype=torch.float64, device=device)
    with t.phase("fne_loss"):
        if warmup:  # 5a. reference epoch 0: in-batch online-vs-online VSE++, per rank
            out = retrieval_loss(
                Anchors(img_BD, txt_BD, ids_B, torch.arange(B, device=device), groups_B),
                Candidates(img_BD, txt_BD, ids_B, B, groups_B),
                cfg,
                loss="vse_pp",
            )
        else:  # 5b. the configured loss over [gathered batch ; memory]
            stale = torch.stack(memory.staleness(ids_B, m_img_BD))
            out = retrieval_loss(
                Anchors(img_BD, txt_BD, ids_B, rank * B + torch.arange(B, device=device), groups_B),
                candidates,
                cfg,
                gauss,
                step_uniforms(seed, step, G, cfg.negatives, rank, B),
                temperature=temperature,
            )
    return StepOutput(out.loss, out.diagnostics, gathered, stale)


def _batch_stats(
    img_BD: Tensor,
    txt_BD: Tensor,
    ids_B: Tensor,
    candidates: Candidates,
    stats: SimilarityStats,
    cfg: FneConfig,
    seed: int,
    step: int,
    rank: int = 0,
    global_batch: int | None = None,
) -> Tensor:
    """This batch's sums for the running estimates: the six Gaussian sums of
    ``cfg.stats_source``; with ``prior_mode: em``, the EM sums (n, Σ r) of one E-step
    under the estimates so far (counted only once their gate is open: before, the components
    are not yet fitted); with ``fn_model: mixture``, the histogram of the sampled candidate
    similarities (last; one per signal of ``fn_signal``). One vector, so one all-reduce
    carries all of it."""
    sim_BB = img_BD.detach() @ txt_BD.detach().T
    paper = (cfg.stats_source, cfg.prior_mode, cfg.fn_model) == ("mutual_top1", "fixed", "positive")
    if paper:  # no random sample needed
        return mutual_top1_stats(sim_BB, ids_B)
    b = ids_B.shape[0]
    cols = sample_columns(
        seed, step, global_batch or b, cfg.stats_samples, candidates.ids_N.shape[0], rank, b
    )
    sims_S, valid_S = random_candidate_sims(
        img_BD, txt_BD, ids_B, candidates.img_ND, candidates.txt_ND, candidates.ids_N, cols
    )
    if cfg.stats_source == "all_pairs":
        gauss_sums = all_pairs_stats(sim_BB, ids_B, sims_S, valid_S)
    else:
        gauss_sums = mutual_top1_stats(sim_BB, ids_B)
    parts = [gauss_sums]
    if cfg.prior_mode == "em":
        prev = stats.gaussians(cfg.gate_size, cfg.var_floor, cfg.variance)
        prior = prior_from_em(stats.em_totals, cfg.prior)
        parts.append(em_sums(sims_S, valid_S, prev, prior) * prev.gate_open.to(torch.float64))
    if cfg.fn_model == "mixture":
        intra_S = None
        if cfg.fn_signal != "cross":  # image-image similarity of the same sampled pairs
            intra_S, _ = intra_candidate_sims(
                img_BD, ids_B, candidates.img_ND, candidates.ids_N, cols
            )
        parts.append(signal_histograms(cfg.fn_signal, sims_S, intra_S, valid_S))
    return torch.cat(parts)

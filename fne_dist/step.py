"""Phases 1-5 of one training step (docs/algorithm.md "Step order"), shared by the loop and the
multi-rank tests.

Legend: B local batch, G = W·B global batch, K memory, D embedding dim.

Only the two calls into ``distributed`` communicate (all_gather, all_reduce); at world size 1
both are identities. The gather also carries the next step's data-agreement vote when the loop
gives one (``StepPosition.vote``, ``epochs.Lookahead``). The step changes no state: the caller
does backward/optimizer step, and commits the step's statistic sums
(``stats.add_step(out.stat_sums, cfg.mixture_decay)``), the EMA and ``memory.enqueue``
together once it knows the step is finite.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from . import distributed as dist_ops
from .distributed.sharded import (
    DefaultComm,
    ShardStep,
    sampled_block,
    sharded_retrieval_loss,
    sharded_staleness,
)
from .fne import (
    Anchors,
    Candidates,
    FneConfig,
    SimilarityStats,
    mutual_top1_stats,
    retrieval_loss,
)
from .fne.estimators import all_pairs_stats, random_candidate_sims, sample_columns
from .fne.posteriors import CandidateSample, Posterior, posterior_for
from .fne.sampling import step_uniforms
from .fne.stats import with_posterior_state
from .memory import MomentumMemory
from .timing import NullTimer

Encoder = Callable[[dict[str, Tensor]], tuple[Tensor, Tensor, Tensor]]


@dataclass
class StepOutput:
    loss: Tensor
    diagnostics: dict[str, Tensor]
    gathered: Candidates  # the momentum block of the global batch, to enqueue after the step
    staleness: Tensor  # (sum of cosines, count) of this rank's anchors found in the memory
    stat_sums: Tensor  # the step's all-reduced statistic sums and the posterior's next state,
    # for the caller to commit (``SimilarityStats.add_step``)
    agreed: int | None = None  # every rank's minimum of StepPosition.vote (None: no vote)


@dataclass(frozen=True)
class StepPosition:
    """Where a micro step sits in the run: the run's seed and the micro step's index (together
    the key of the step's random draws), and whether it is a warm-up step. ``vote``: this
    rank's data-agreement status for the next step, to ride on the step's gather (None: none
    rides)."""

    seed: int
    step: int
    warmup: bool
    vote: int | None = None


def forward_step(
    online: Encoder,
    momentum: Encoder | nn.Module,
    batch: dict[str, Tensor],
    memory: MomentumMemory,
    stats: SimilarityStats,
    cfg: FneConfig,
    at: StepPosition,
    timer: NullTimer | None = None,
) -> StepOutput:
    """The loss of one micro-batch; ``batch`` holds this rank's B pairs (model inputs + ids).

    ``timer`` (optional) receives the phases online/momentum/gather/reduce/posterior_fit/loss.
    ``online`` runs first, then ``momentum`` (``shared_prefix.SharedPrefix`` hands the frozen
    layers' output from the one to the other)."""
    t = timer or NullTimer()
    ids_B, groups_B = batch["ids"], batch["groups"]
    B, device = ids_B.shape[0], ids_B.device
    rank = dist_ops.rank()
    with t.phase("online_forward"):
        img_BD, txt_BD, temperature = online(batch)  # 1. online embeddings
    with t.phase("momentum_forward"):
        with torch.inference_mode():  # 2. momentum embeddings, with no autograd bookkeeping
            m_out = momentum(batch)  # (no_grad still counts versions and tracks views)
        # normal tensors again (B×D: a negligible copy): an inference tensor may not be saved
        # for a backward, and with a sharded memory these rows are candidates of the loss
        m_img_BD, m_txt_BD = m_out[0].clone(), m_out[1].clone()
    with t.phase("gather"):  # 3. gather momentum embeddings, ids and groups, in rank order,
        # in one collective (one gather per tensor cost four latencies), and with them the next
        # step's vote (a column of B copies): min over ranks, read on the host (the loop gives
        # a vote only where the gather's tensors are host tensors: no device sync)
        rows = [m_img_BD.float(), m_txt_BD.float(), ids_B, groups_B]
        if at.vote is not None:
            rows.append(torch.full((B, 1), at.vote, dtype=torch.int64, device=device))
        g_img, g_txt, g_ids, g_groups, *votes = dist_ops.all_gather_rows(*rows)
        agreed = int(votes[0].min()) if votes else None
        gathered = Candidates(g_img, g_txt, g_ids, B * dist_ops.world_size(), g_groups)
    G = gathered.n_batch
    sharded = memory.sharded  # each rank holds K/W slots (docs/sharded-memory.md)
    candidates = gathered if sharded else memory.after_batch(gathered)  # no copy of the K rows
    posterior = posterior_for(cfg)
    if cfg.stats_scope == "global":  # 4. the rule over the gathered G×G *momentum* matrix:
        # every rank computes the same sums, so no reduction is needed.
        batch_stats = _batch_stats(gathered, candidates, posterior, cfg, at)
    else:  # 4. reference meaning: each rank's own B×B online matrix, then SUM over ranks
        online_block = Candidates(img_BD, txt_BD, ids_B, B)
        pool = _sample_pool(memory, candidates, cfg, at) if sharded else candidates
        local = _batch_stats(online_block, pool, posterior, cfg, at, rank, G)
        with t.phase("reduce"):
            batch_stats = dist_ops.all_reduce_sum(local)
    # the estimates with this step's sums (the posterior's last; none for the paper's), as the
    # step will leave them; ``stats`` itself changes only when the caller commits the step
    with t.phase("posterior_fit"):  # the running Gaussians and the posterior's EM
        kept = stats.posterior_state
        gauss = None
        # the posterior's next state rides with the sums the caller commits; warm-up steps
        # leave it as it was (the latch counts training steps), and their in-batch vse_pp reads
        # neither the Gaussians nor the fit: they compute neither (the fit's EM is most of a
        # step's statistics work), and commit the same sums
        next_state = kept
        if not at.warmup:
            seen = stats.with_step(with_posterior_state(batch_stats, kept), cfg.mixture_decay)
            gauss = seen.gaussians(cfg.gate_size, cfg.var_floor, cfg.variance)
            fit = posterior.fit(gauss, seen.posterior_totals, kept)
            gauss = replace(gauss, posterior=fit)
            next_state = kept if fit.state is None else fit.state
        stat_sums = with_posterior_state(batch_stats, next_state)
    stale = torch.zeros(2, dtype=torch.float64, device=device)
    with t.phase("fne_loss"):
        if at.warmup:  # 5a. reference epoch 0: in-batch online-vs-online VSE++, per rank
            out = retrieval_loss(
                Anchors(img_BD, txt_BD, ids_B, torch.arange(B, device=device), groups_B),
                Candidates(img_BD, txt_BD, ids_B, B, groups_B),
                cfg,
                loss="vse_pp",
            )
        elif sharded:  # 5b. the same loss, the memory's shards scored where they live
            comm = DefaultComm()
            stale = sharded_staleness(memory, gathered, B, comm)
            anchors = Anchors(
                img_BD, txt_BD, ids_B, rank * B + torch.arange(B, device=device), groups_B
            )
            shard_step = ShardStep(
                anchors, gathered, memory, step_uniforms(at.seed, at.step, G, cfg.negatives)
            )
            out = sharded_retrieval_loss(shard_step, cfg, gauss, temperature, comm)
        else:  # 5b. the configured loss over [gathered batch ; memory]
            stale = torch.stack(memory.staleness(ids_B, m_img_BD))
            out = retrieval_loss(
                Anchors(img_BD, txt_BD, ids_B, rank * B + torch.arange(B, device=device), groups_B),
                candidates,
                cfg,
                gauss,
                step_uniforms(at.seed, at.step, G, cfg.negatives, rank, B),
                temperature=temperature,
            )
    return StepOutput(out.loss, out.diagnostics, gathered, stale, stat_sums, agreed)


@dataclass
class SampledPool:
    """A sharded memory's random candidate sample: a block holding this rank's anchors' sampled
    rows and their columns in it (``distributed.sharded.sampled_block``)."""

    block: Candidates
    cols_2Br: Tensor


def _sample_pool(
    memory: MomentumMemory, gathered: Candidates, cfg: FneConfig, at: StepPosition
) -> Candidates | SampledPool:
    """What the step's random candidate sample is drawn from: with a sharded memory, the
    sampled rows of [gathered batch ; memory] (the same columns as the whole memory's), fetched
    from the shards; the gathered batch alone when no sample is needed."""
    if cfg.stats_source == "mutual_top1" and not posterior_for(cfg).samples:
        return gathered
    G = gathered.n_batch
    cols_2Gr = sample_columns(at.seed, at.step, G, cfg.stats_samples, G + memory.capacity)
    block, cols_2Br = sampled_block(
        memory, gathered, cols_2Gr.to(gathered.ids_N.device), DefaultComm()
    )
    return SampledPool(block, cols_2Br)


def _batch_stats(
    batch: Candidates,
    candidates: Candidates | SampledPool,
    posterior: Posterior,
    cfg: FneConfig,
    at: StepPosition,
    rank: int = 0,
    global_batch: int | None = None,
) -> Tensor:
    """This batch's sums for the running estimates: the six Gaussian sums of
    ``cfg.stats_source``, then the posterior's sums (``Posterior.sums``: the mixtures'
    histogram of a random candidate sample). One vector, so one all-reduce carries all of it.
    ``batch``: the block the statistics are taken over (this rank's online embeddings, or the
    gathered momentum block), its rows' image and text embeddings and ids."""
    img_BD, txt_BD, ids_B = batch.img_ND, batch.txt_ND, batch.ids_N
    sim_BB = img_BD.detach() @ txt_BD.detach().T
    if cfg.stats_source == "mutual_top1" and not posterior.samples:  # no random sample needed
        return mutual_top1_stats(sim_BB, ids_B)
    b = ids_B.shape[0]
    if isinstance(candidates, SampledPool):  # a sharded memory: the sample was fetched
        candidates, cols = candidates.block, candidates.cols_2Br
    else:
        cols = sample_columns(
            at.seed, at.step, global_batch or b, cfg.stats_samples, candidates.ids_N.shape[0],
            rank, b,
        )  # fmt: skip
    sims_S, valid_S = random_candidate_sims(
        img_BD, txt_BD, ids_B, candidates.img_ND, candidates.txt_ND, candidates.ids_N, cols
    )
    if cfg.stats_source == "all_pairs":
        gauss_sums = all_pairs_stats(sim_BB, ids_B, sims_S, valid_S)
    else:
        gauss_sums = mutual_top1_stats(sim_BB, ids_B)
    sample = CandidateSample(sims_S, valid_S, img_BD, candidates.img_ND, cols)
    return torch.cat([gauss_sums, posterior.sums(sample)])

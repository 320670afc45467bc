"""``fne.reduction: expected``: the loss of an anchor is the expectation of the sampled hinge
under the sampler's own weights, Σ_j (w_j / Σ_k w_k) · [m − s⁺ + s_j]_+ (fne/selection.py
``expected_shares``, fne/loss.py ``_expected_hinges``). Checked against a plain loop over
``fne.reference``, against the mean of the sampled loss over many uniforms, and on a hand-made
example whose value and gradient are worked out in the docstring."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from fne_dist.config import load_config
from fne_dist.fne import (
    Anchors,
    Candidates,
    FneConfig,
    SimilarityStats,
    retrieval_loss,
    stats_of,
)
from fne_dist.fne.mixture import Mixture
from fne_dist.fne.posteriors.intra_mixture import IntraFit
from fne_dist.fne.rules import FNE
from fne_dist.fne.selection import CandidateLabels, Rows, select_dense, select_listed
from tests.test_losses import _setup
from tests.test_sampler import REGIMES, _gaussians, _problem, _reference_rows

F64 = torch.float64


def _reference_shares(w: list[float], hinges: list[float]) -> list[float]:
    """One anchor, plain floats: w_j / Σw, or the fallback (1 on the first largest positive
    hinge; all 0 when no hinge is positive) when the weights sum to 0."""
    total = sum(w)
    if total > 0:
        return [x / total for x in w]
    best = max(hinges)
    return [1.0 if best > 0 and j == hinges.index(best) else 0.0 for j in range(len(w))]


@pytest.mark.parametrize("regime", REGIMES)
def test_shares_equal_the_plain_loop(regime: str) -> None:
    """Invariant: in every regime of the statistics, both selectors (dense, CPU window) give
    each candidate the share w_j / Σw of the reference weights (the fallback row: 1 on its
    hardest violator; the no-violator row: nothing), so Σ_j p_j C_j is the reference's
    expected hinge; at the default reduction no shares are computed (the sampled path is
    untouched)."""
    hard_cut = REGIMES[regime][6]
    g, g_ref = _gaussians(regime)
    sim, ids, cand_ids, pos_col, mask = _problem(len(regime), F64)
    rows = _reference_rows(sim, pos_col, mask, g_ref, hard_cut)
    want = torch.tensor([_reference_shares(r[0], r[1]) for r in rows], dtype=F64)
    hinge = torch.tensor([r[1] for r in rows], dtype=F64)
    u = torch.rand(sim.shape[0], 1, generator=torch.Generator().manual_seed(3), dtype=F64)
    cfg = FneConfig(hard_cut=hard_cut, reduction="expected")
    for select in (select_dense, select_listed):
        args = (Rows(sim, pos_col, ids, u), CandidateLabels(cand_ids), g)
        picks = select(*args, cfg, FNE)
        torch.testing.assert_close(picks.prob_bN, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(
            (picks.prob_bN * hinge).sum(1), (want * hinge).sum(1), rtol=1e-12, atol=1e-12
        )
        assert select(*args, FneConfig(hard_cut=hard_cut), FNE).prob_bN.shape[1] == 0
    if REGIMES[regime][0] == 0.5 and REGIMES[regime][4] and hard_cut:  # cut at .3: rows 0, 1 empty
        assert want[0].sum() == 0 and want[1].max() == 1  # no violator; the fallback


def _one_hot_problem(seed: int) -> tuple[Anchors, Candidates]:
    """Anchors whose rows are their similarities to one-hot candidates (D = N), built from
    test_sampler's problem: two rows with empty windows, masked candidates, a few near μ⁺."""
    sim, ids, cand_ids, pos_col, _ = _problem(seed, F64)
    eye = torch.eye(sim.shape[1], dtype=F64)
    a = Anchors(sim.clone(), sim.flip(0).clone(), ids, pos_col)
    return a, Candidates(eye, eye, cand_ids, sim.shape[1])


@pytest.mark.parametrize(
    "cfg",
    [
        FneConfig(),
        FneConfig(loss="window"),
        FneConfig(posterior="intra_mixture", eps=0.5, tau_fn=4.0, fallback="unflagged"),
    ],
    ids=["paper", "window", "intra_unflagged"],
)
def test_expected_loss_is_the_mean_of_the_sampled_loss(cfg: FneConfig) -> None:
    """Invariant: the expected loss equals the sampled loss averaged over the uniforms (M
    copies of every anchor in one batch, copy m drawing with u = (m + ½)/M: each candidate is
    then drawn for a share of the copies within 1/M of its probability), for the paper's
    sampler, the window rule and the intra-signal sampler with the unflagged fallback: the two
    implementations agree."""
    a, c = _one_hot_problem(7)
    g, _ = _gaussians("gate open")
    if cfg.posterior == "intra_mixture":
        mix = (0.05, 0.6, 0.01, 0.0, 0.04)  # π, μ_f, σ_f², μ_t, σ_t² of the image-image fit
        g = replace(g, posterior=IntraFit(Mixture(*(torch.tensor(x, dtype=F64) for x in mix))))
    B, M = a.ids_B.shape[0], 1000
    tiled = Anchors(
        *(x.repeat(M, *[1] * (x.dim() - 1)) for x in (a.img_BD, a.txt_BD, a.ids_B, a.pos_col_B))
    )
    u = ((torch.arange(M, dtype=F64) + 0.5) / M).repeat_interleave(B)
    big = replace(cfg, block_rows=B * M, chunk_rows=B * M, window_chunk_rows=B * M)  # fewer calls
    sampled = retrieval_loss(tiled, c, big, g, u[None, :, None].expand(2, -1, 1)).loss.item()
    u1 = torch.full((2, B, 1), 0.5, dtype=F64)
    out = retrieval_loss(a, c, replace(cfg, reduction="expected"), g, u1)
    assert out.loss.item() > 0.01  # not trivially zero
    assert out.loss.item() == pytest.approx(sampled, rel=2e-3)
    assert out.loss.item() != pytest.approx(retrieval_loss(a, c, cfg, g, u1).loss.item(), rel=1e-3)


def _mu_pos_06() -> SimilarityStats:
    stats = SimilarityStats()
    stats.add(stats_of(torch.tensor([0.6]), torch.tensor([0.1, 0.2])))
    return stats


def test_hand_made_window_value_and_gradient() -> None:
    """Known answer (test_losses' 2 anchors × 4 one-hot candidates, μ⁺ 0.6: cut at s ≤ 0.4):
    i2t anchor 0 (s⁺ .9): window {col 1 (.5), col 2 (.8)}, p ½ each, hinges 0 and .1 → .05;
    anchor 1: window empty, no violator → 0. t2i anchor 0 (s⁺ .7): window {col 1 (.6)} → .1;
    anchor 1 (s⁺ .8): window {col 2 (.75)} → .15. Loss = (.05 + 0)/2 + (.1 + .15)/2 = .15
    (sampled with u = .5: col 2 for i2t anchor 0 → .175). Gradient of image anchor 0: ½ · ½ on
    col 2, −½ · ½ on its positive col 0, 0 elsewhere (col 1's hinge is inactive)."""
    a, c = _setup()
    g = _mu_pos_06().gaussians()
    u = torch.full((2, 2, 1), 0.5, dtype=F64)
    sampled = retrieval_loss(a, c, FneConfig(loss="window"), g, u)
    assert sampled.loss.item() == pytest.approx(0.175)
    out = retrieval_loss(a, c, FneConfig(loss="window", reduction="expected"), g, u)
    assert out.loss.item() == pytest.approx(0.15)
    out.loss.backward()
    torch.testing.assert_close(a.img_BD.grad[0], torch.tensor([-0.25, 0.0, 0.25, 0.0], dtype=F64))
    torch.testing.assert_close(a.img_BD.grad[1], torch.zeros(4, dtype=F64))


def test_hand_made_kernel_weights() -> None:
    """Known answer with FNE's kernel weights (gate closed): i2t anchor 0 weighs col 1 by
    exp(−½ · .4²) and col 2 by exp(−½ · .1²); only col 2 violates (hinge .1), so the i2t term
    is ½ · .1 · w₂ / (w₁ + w₂); t2i as in the window example (one candidate per window)."""
    a, c = _setup()
    u = torch.full((2, 2, 1), 0.5, dtype=F64)
    out = retrieval_loss(a, c, FneConfig(reduction="expected"), _mu_pos_06().gaussians(), u)
    w1, w2 = math.exp(-0.5 * 0.4**2), math.exp(-0.5 * 0.1**2)
    assert out.loss.item() == pytest.approx(0.5 * 0.1 * w2 / (w1 + w2) + 0.125)


def test_expected_needs_one_draw_and_reads_from_yaml(tmp_path) -> None:
    """Invariant: the option is one line of YAML; with k > 1 draws (meaningless for an
    expectation) it fails early with one line naming both fields."""
    with pytest.raises(ValueError, match=r"reduction=expected.*negatives=1"):
        FneConfig(reduction="expected", negatives=2).check()
    assert load_config(None, ["fne.reduction=expected"]).fne.reduction == "expected"
    with pytest.raises(Exception, match="reduction"):
        load_config(None, ["fne.reduction=mean"])

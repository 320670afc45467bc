"""``fne.loss: fne_sum`` (fne/summed.py): vse0's sum of hinges over [batch ; memory] with each
candidate weighted by the posterior's probability of being a true negative. The vectorised
loss (value and gradient) is held equal to a plain loop over ``fne.reference`` in every regime
of the statistics, for each weight form, with and without the kernel and the hard cut."""

from __future__ import annotations

import math

import pytest
import torch

from fne_dist.fne import Anchors, Candidates, FneConfig, retrieval_loss
from fne_dist.fne import reference as ref
from fne_dist.fne.summed import SumSide, weighted_sum_of_hinges
from tests.test_sampler import PAPER, REGIMES, _gaussians

F64 = torch.float64
B, N, D = 5, 30, 8


def _reference_weight(s: float, s_pos: float, g_ref: ref.Gaussians, cfg: FneConfig) -> float:
    """w of one (anchor, candidate) pair, plain floats: the docstring of fne/summed.py."""
    p = ref.p_fn(s, g_ref, cfg.prior)
    if g_ref.n_pos <= cfg.gate_size:  # gate closed: the posterior is not used
        t = 1.0
    elif cfg.sum_weight == "one_minus":
        t = 1.0 - p
    elif cfg.sum_weight == "exp":
        t = math.exp(-cfg.tau_fn * p)
    else:
        t = 0.0 if p > cfg.eps else 1.0
    if cfg.sum_kernel:
        t *= math.exp(-cfg.tau_kernel * (s - s_pos) ** 2)
    if cfg.sum_cut and not g_ref.skip_cut and s <= g_ref.mu_pos - cfg.cut_margin:
        t = 0.0
    return t


def _problem(seed: int):
    """Unit anchors and candidates with similarities spread over the posterior's range, a
    positive column per anchor and a few more same-id candidates (masked)."""
    gen = torch.Generator().manual_seed(seed)
    anchors = torch.nn.functional.normalize(torch.randn(B, D, generator=gen, dtype=F64), dim=1)
    cands = torch.nn.functional.normalize(torch.randn(N, D, generator=gen, dtype=F64), dim=1)
    pos_col = torch.arange(B) * 3
    cands[pos_col] = torch.nn.functional.normalize(anchors + 0.4 * cands[pos_col], dim=1)
    ids = torch.arange(B) * 100
    cand_ids = torch.arange(N) + 1000
    cand_ids[pos_col] = ids
    cand_ids[pos_col + 1] = ids  # a second candidate of the anchor's image: masked
    return anchors.requires_grad_(True), cands, ids, cand_ids, pos_col


def _reference_loss(anchors, cands, ids, cand_ids, pos_col, g_ref, cfg) -> torch.Tensor:
    """mean_i Σ_j w_ij max(0, m + s_ij − s⁺_i), one pair at a time; w as a constant."""
    total = anchors.new_zeros(())
    for i in range(B):
        s_pos = anchors[i] @ cands[pos_col[i]]
        for j in range(N):
            if cand_ids[j] == ids[i] or j == pos_col[i]:
                continue
            s = anchors[i] @ cands[j]
            w = _reference_weight(float(s.detach()), float(s_pos.detach()), g_ref, cfg)
            total = total + w * torch.relu(cfg.margin + s - s_pos)
    return total / B


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("weight", ["one_minus", "exp", "hard"])
@pytest.mark.parametrize("kernel_cut", [(False, False), (True, True)])
def test_summed_loss_equals_the_plain_loop(regime: str, weight: str, kernel_cut) -> None:
    """Invariant: every regime (no μ⁺ yet, gate closed/open, no cut, σ⁺ > σ⁻, μ⁺ ≈ μ⁻), every
    weight form, with or without kernel and cut: the loss and its gradient equal the
    reference loop (the weights carry no gradient; the hinges do)."""
    g, g_ref = _gaussians(regime)
    cfg = FneConfig(
        loss="fne_sum", sum_weight=weight, sum_kernel=kernel_cut[0], sum_cut=kernel_cut[1]
    )
    if weight == "hard":
        cfg = FneConfig(**{**cfg.__dict__, "eps": 0.3})  # flags some candidates here
    anchors, cands, ids, cand_ids, pos_col = _problem(len(regime))
    side = SumSide(cands, cand_ids, None, anchors.detach(), cands)
    got, _ = weighted_sum_of_hinges(anchors, side, ids, pos_col, None, g, cfg)
    (grad,) = torch.autograd.grad(got, anchors)
    want = _reference_loss(anchors, cands, ids, cand_ids, pos_col, g_ref, cfg)
    (grad_want,) = torch.autograd.grad(want, anchors)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad, grad_want, rtol=1e-9, atol=1e-12)


def test_summed_weights_bite_when_the_gate_is_open() -> None:
    """Invariant (the test above is not vacuous): with the gate open and the hard weight, the
    summed loss drops candidates, so it is below vse0's plain sum of the same hinges; with the
    gate closed it is that sum exactly."""
    cfg = FneConfig(loss="fne_sum", sum_weight="hard", eps=0.3)
    anchors, cands, ids, cand_ids, pos_col = _problem(1)
    side = SumSide(cands, cand_ids, None, anchors.detach(), cands)
    closed, _ = weighted_sum_of_hinges(
        anchors, side, ids, pos_col, None, _gaussians("gate closed")[0], cfg
    )
    opened, _ = weighted_sum_of_hinges(
        anchors, side, ids, pos_col, None, _gaussians("gate open")[0], cfg
    )
    plain = _reference_loss(
        anchors, cands, ids, cand_ids, pos_col, ref.Gaussians(0, 1, 0, 1, 0), cfg
    )
    torch.testing.assert_close(closed, plain)
    assert opened.item() < closed.item()


def test_fne_sum_on_the_batch_with_the_gate_closed_is_vse0() -> None:
    """Invariant: ``fne_sum`` with ``sum_scope: batch`` and no trusted posterior (gate closed:
    every weight 1) is vse0, the plain sum of hinges over the batch, in value and diagnostics'
    directions (both directions summed)."""
    g, _ = _gaussians("gate closed")
    anchors, cands, _, cand_ids, _ = _problem(2)
    txt = torch.nn.functional.normalize(anchors.detach() + 0.3, dim=1).requires_grad_(True)
    a = Anchors(anchors, txt, torch.arange(B), torch.arange(B))
    batch = Candidates(anchors.detach(), txt.detach(), torch.arange(B), B)
    memory = Candidates(cands, cands, cand_ids + 10_000, 0)
    c = Candidates.concat(batch, memory)
    vse0 = retrieval_loss(a, c, FneConfig(loss="vse0"))
    summed = retrieval_loss(a, c, FneConfig(loss="fne_sum", sum_scope="batch"), g)
    torch.testing.assert_close(summed.loss, vse0.loss)
    over_memory = retrieval_loss(a, c, FneConfig(loss="fne_sum"), g)
    assert over_memory.loss.item() > vse0.loss.item()  # the memory's violators count too
    assert PAPER.gate_size == 200

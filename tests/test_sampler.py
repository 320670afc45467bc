"""The vectorised FNE sampler equals a plain loop written from fne-algorithm.md."""

from __future__ import annotations

import pytest
import torch

from fne_dist.fne import (
    FneConfig,
    draw_negatives,
    gaussians_from_stats,
    hardest_violator,
    negative_mask,
    sampling_weights,
    stats_of,
)
from fne_dist.fne.loss import select_chunk

from . import reference_sampler as ref

B, N = 12, 300


def _problem(seed: int, n_pos: int, pooled: bool = False):
    """Random similarities with a few masked columns per row, and fitted Gaussians."""
    gen = torch.Generator().manual_seed(seed)
    sim = (torch.rand(B, N, generator=gen, dtype=torch.float64) * 2 - 1) * 0.9
    ids = torch.arange(B) * 7
    cand_ids = torch.randint(0, 7 * B, (N,), generator=gen)
    pos_col = torch.randperm(N, generator=gen)[:B]
    sim[torch.arange(B), pos_col] = 0.6 + 0.3 * torch.rand(B, generator=gen, dtype=torch.float64)
    pos = (0.55 + 0.1 * torch.randn(n_pos, generator=gen, dtype=torch.float64)).tolist()
    neg = (0.3 + 0.15 * torch.randn(2 * n_pos, generator=gen, dtype=torch.float64)).tolist()
    variance = "pooled" if pooled else "separate"
    g = gaussians_from_stats(
        stats_of(torch.tensor(pos, dtype=torch.float64), torch.tensor(neg, dtype=torch.float64)),
        gate_size=200,
        variance=variance,
    )
    g_ref = ref.gaussians(pos, neg, 1e-8, pooled)
    mask = negative_mask(ids, pos_col, cand_ids)
    return sim, ids, cand_ids, pos_col, mask, g, g_ref


@pytest.mark.parametrize("n_pos", [0, 1, 50, 400])  # no μ⁺, one sample, gate closed, gate open
@pytest.mark.parametrize("pooled", [False, True])
@pytest.mark.parametrize("hard_cut", [True, False])
def test_weights_equal_plain_loop(n_pos: int, pooled: bool, hard_cut: bool) -> None:
    """Invariant: every weight w_ij equals the plain-loop formula (kernel, FN weight, ε switch,
    gate, hard cut, positive mask), in every regime of the statistics."""
    cfg = FneConfig(hard_cut=hard_cut, eps=0.05, prior=0.2)  # a large prior makes P > ε common
    sim, _, _, pos_col, mask, g, g_ref = _problem(n_pos + 10 * pooled, n_pos, pooled)
    pos_sim = sim[torch.arange(B), pos_col]
    w = sampling_weights(sim, pos_sim, mask, g, cfg, "fne").w_BN
    for i in range(B):
        expected = ref.weights_row(sim[i].tolist(), float(pos_sim[i]), mask[i].tolist(), g_ref, cfg)
        torch.testing.assert_close(w[i], torch.tensor(expected, dtype=torch.float64))
    if n_pos == 400:  # the regime is really exercised: some FN weights are in play
        assert (w[(w > 0) & (w < torch.exp(torch.tensor(-0.5 * 0.05)))]).numel() > 0


@pytest.mark.parametrize("n_pos", [0, 400])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("form", ["listed", "dense"])
def test_draws_equal_plain_loop(n_pos: int, k: int, form: str) -> None:
    """Invariant: given the same uniforms, the vectorised draw picks exactly the plain loop's
    candidates (k > 1: without replacement), and a masked candidate is never drawn; in both
    forms of the sampler (CPU: window only; dense: every candidate)."""
    cfg = FneConfig(negatives=k, prior=0.2, eps=0.05)
    sim, ids, cand_ids, pos_col, mask, g, g_ref = _problem(3 + n_pos, n_pos)
    u = torch.rand(B, k, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    picks = select_chunk(sim, pos_col, ids, cand_ids, None, None, u, g, cfg, "fne", form=form)
    pos_sim = sim[torch.arange(B), pos_col]
    for i in range(B):
        w = ref.weights_row(sim[i].tolist(), float(pos_sim[i]), mask[i].tolist(), g_ref, cfg)
        hinges = [
            0.0 if m else max(0.0, cfg.margin + s - float(pos_sim[i]))
            for s, m in zip(sim[i].tolist(), mask[i].tolist(), strict=True)
        ]
        for t in range(k):
            j, how = ref.draw_row(w, hinges, float(u[i, t]))
            if t > 0 and how != "draw":
                assert not picks.valid_bk[i, t]
                break
            assert how != "no_violator" or not picks.valid_bk[i, t]
            if j is not None:
                assert int(picks.index_bk[i, t]) == j, (i, t, how)
                assert not mask[i, j]
                w[j] = 0.0  # without replacement


def test_masked_candidates_are_never_drawn() -> None:
    """Invariant: over many uniforms, no draw lands on a masked column, even when the masked
    columns have the highest similarity (they would carry the largest weight)."""
    cfg = FneConfig(negatives=2)
    sim, ids, cand_ids, pos_col, mask, g, _ = _problem(5, 0)
    sim = sim.masked_fill(mask, 0.95)  # masked = the most similar candidates
    for seed in range(20):
        u = torch.rand(B, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        picks = select_chunk(sim, pos_col, ids, cand_ids, None, None, u, g, cfg, "fne")
        hit = mask.gather(1, picks.index_bk) & picks.valid_bk
        assert not hit.any()


def test_fallback_and_no_violator() -> None:
    """Invariant: a row whose weights are all 0 takes the hardest unmasked violator; with no
    violator the draw is invalid and counted, never a masked column."""
    sim = torch.tensor(
        [[0.9, 0.8, 0.5, 0.6, 0.1], [0.2, 0.5, 0.95, 0.9, 0.7], [0.9, 0.1, 0.2, 0.3, 0.95]],
        dtype=torch.float64,
    )
    pos_sim = sim[:, 0]
    mask = torch.zeros_like(sim, dtype=torch.bool)
    mask[:, 0] = True
    mask[2, 4] = True  # row 2's most similar candidate is masked (another caption): not a violator
    w = torch.zeros_like(sim)
    w[0, 2] = 1.0  # row 0: a normal draw; rows 1-2: all weights 0
    hardest, has_violator = hardest_violator(sim, mask, pos_sim, 0.2)
    assert hardest[:2].tolist() == [1, 2] and has_violator.tolist() == [True, True, False]
    d = draw_negatives(w, torch.full((3, 1), 0.5, dtype=torch.float64), hardest, has_violator)
    assert d.index_Bk[:2, 0].tolist() == [2, 2]  # row 1: fallback to its hardest violator (col 2)
    assert d.valid_Bk[:, 0].tolist() == [True, True, False]
    assert d.fallback_B.tolist() == [False, True, False]
    assert d.no_violator_B.tolist() == [False, False, True]


def test_window_rule_is_uniform_over_the_window() -> None:
    """Invariant: the "window" ablation puts weight 1 exactly on unmasked candidates above
    μ⁺ − margin and 0 elsewhere."""
    cfg = FneConfig(loss="window")
    sim, _, _, pos_col, mask, g, _ = _problem(7, 50)
    pos_sim = sim[torch.arange(B), pos_col]
    w = sampling_weights(sim, pos_sim, mask, g, cfg, "window").w_BN
    inside = (sim > g.mu_pos - cfg.margin) & ~mask
    assert torch.equal(w, inside.to(w.dtype))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_compiled_sampler_matches_eager() -> None:
    """Invariant: the torch.compile-fused sampler (fne.compile) draws what the eager one draws."""
    sim, ids, cand_ids, pos_col, _, g, _ = _problem(11, 400)
    u = torch.rand(B, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    eager_cfg, compiled_cfg = FneConfig(negatives=2, prior=0.2), FneConfig(negatives=2, prior=0.2)
    compiled_cfg.compile = True
    from fne_dist.fne.loss import _selector

    eager = select_chunk(sim, pos_col, ids, cand_ids, None, None, u, g, eager_cfg, "fne")
    fused = _selector(compiled_cfg)(
        sim, pos_col, ids, cand_ids, None, None, u, g, compiled_cfg, "fne"
    )
    assert torch.equal(eager.index_bk, fused.index_bk)
    assert torch.equal(eager.valid_bk, fused.valid_bk)
    assert torch.equal(eager.n_fn_b, fused.n_fn_b)


def test_uniform_next_to_one_never_lands_on_zero_weight() -> None:
    """Invariant: a float64 uniform just below 1 becomes 1.0 in float32, so u·total equals the
    total; the draw must still land on the last positive weight, not on the zero-weight
    (masked) columns after it."""
    w = torch.tensor([[1.0, 1.0, 0.0, 0.0]], dtype=torch.float32)
    u = torch.tensor([[1.0 - 1e-9]], dtype=torch.float64)
    assert u.float().item() == 1.0  # the rounding this test is about does happen
    none = torch.zeros(1, dtype=torch.bool)
    d = draw_negatives(w, u, torch.zeros(1, dtype=torch.long), none)
    assert int(d.index_Bk[0, 0]) == 1

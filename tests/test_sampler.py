"""The fast sampler (dense and CPU window forms) equals ``fne.reference``, the paper's equations
written one candidate at a time, at the paper's constants; and its boundaries are where the
paper puts them (these tests fail if a `<=` becomes `<`)."""

from __future__ import annotations

import math

import pytest
import torch

from fne_dist.fne import (
    FneConfig,
    SimilarityStats,
    draw_negatives,
    gaussians_from_stats,
    hardest_violator,
    negative_mask,
    sampling_weights,
    stats_of,
    window_weights,
)
from fne_dist.fne import reference as ref
from fne_dist.fne.rules import FNE, HARDEST, WINDOW
from fne_dist.fne.selection import (
    CandidateLabels,
    Rows,
    candidate_index,
    masked_positions,
    select_dense,
    select_listed,
)
from fne_dist.fne.weights import AnchorSims

B, N = 12, 400
PAPER = FneConfig()  # prior 1e-4, ε 1e-3, τ 0.5, margin 0.2, gate 200
assert (PAPER.prior, PAPER.eps, PAPER.tau_kernel, PAPER.tau_fn, PAPER.margin, PAPER.gate_size) == (
    1e-4, 1e-3, 0.5, 0.5, 0.2, 200,
)  # fmt: skip

# (μ⁺, σ⁺, μ⁻, σ⁻, n⁺, no_pos_mu, hard_cut); Gaussians fitted from n⁺ and 2n⁺ samples.
REGIMES = {
    "no positive yet, reference (cut at -margin)": (0.5, 0.05, 0.2, 0.08, 0, "zero", True),
    "no positive yet, skip the cut": (0.5, 0.05, 0.2, 0.08, 0, "skip", True),
    "gate closed": (0.5, 0.05, 0.2, 0.08, 50, "zero", True),
    "gate closed at its edge (n+ = gate)": (0.5, 0.05, 0.2, 0.08, 200, "zero", True),
    "gate open": (0.5, 0.05, 0.2, 0.08, 400, "zero", True),
    "gate open, no hard cut": (0.5, 0.05, 0.2, 0.08, 400, "zero", False),
    "sigma+ > sigma-": (0.5, 0.15, 0.2, 0.05, 400, "zero", True),
    "mu+ ~ mu-": (0.3, 0.1, 0.29, 0.05, 400, "zero", True),
}
GATE_OPEN = {name for name, r in REGIMES.items() if r[4] > PAPER.gate_size}


def _gaussians(regime: str):
    """The production Gaussians of a regime, and the same numbers for the reference."""
    mu_p, sd_p, mu_n, sd_n, n_pos, no_pos_mu, _ = REGIMES[regime]
    gen = torch.Generator().manual_seed(n_pos)
    stats = SimilarityStats(no_pos_mu=no_pos_mu)
    stats.add(
        stats_of(
            mu_p + sd_p * torch.randn(n_pos, generator=gen, dtype=torch.float64),
            mu_n + sd_n * torch.randn(2 * n_pos, generator=gen, dtype=torch.float64),
        )
    )
    g = stats.gaussians(PAPER.gate_size, PAPER.var_floor, PAPER.variance)
    # The reference's running mean of positives starts at 0; "skip" turns the cut off.
    g_ref = ref.Gaussians(
        float(g.mu_pos) if n_pos else 0.0,
        float(g.var_pos),
        float(g.mu_neg),
        float(g.var_neg),
        n_pos,
        skip_cut=n_pos == 0 and no_pos_mu == "skip",
    )
    return g, g_ref


def _problem(seed: int, dtype: torch.dtype):
    """Mostly easy negatives (window ~5 %, so the CPU form compacts), a few near μ⁺ (where
    P_fn > ε), masked candidates among the most similar ones, and two rows with nothing in
    the window at μ⁺ = 0.5 (row 0: no violator; row 1: the fallback to its hardest violator)."""
    gen = torch.Generator().manual_seed(seed)
    sim = (0.05 + 0.15 * torch.randn(B, N, generator=gen, dtype=torch.float64)).clamp(-1, 1)
    near = torch.rand(B, N, generator=gen) < 0.03
    sim[near] = 0.35 + 0.4 * torch.rand(int(near.sum()), generator=gen, dtype=torch.float64)
    ids = torch.arange(B) * 3
    cand_ids = torch.randint(0, 3 * B, (N,), generator=gen)
    pos_col = torch.randperm(N, generator=gen)[:B]
    mask = negative_mask(ids, pos_col, cand_ids)
    sim[mask & (torch.rand(B, N, generator=gen) < 0.5)] = 0.55  # masked, would weigh most
    sim[0].clamp_(max=0.25)
    sim[1].clamp_(max=0.28)
    sim[torch.arange(B), pos_col] = 0.6 + 0.3 * torch.rand(B, generator=gen, dtype=torch.float64)
    sim[1, pos_col[1]] = 0.45
    return sim.to(dtype), ids, cand_ids, pos_col, mask


def _reference_rows(sim, pos_col, mask, g_ref, hard_cut: bool):
    """Per anchor: reference weights, hinges, and the counts the sampler reports."""
    rows = []
    for i in range(B):
        s_row, m_row, s_pos = sim[i].double().tolist(), mask[i].tolist(), float(sim[i, pos_col[i]])
        w = [
            ref.weight(s, s_pos, m, g_ref, ref.Constants(hard_cut=hard_cut))
            for s, m in zip(s_row, m_row, strict=True)
        ]
        hinges = [ref.hinge(s, s_pos, m) for s, m in zip(s_row, m_row, strict=True)]
        p_gt_eps = [
            not m and ref.p_fn(s, g_ref) > PAPER.eps for s, m in zip(s_row, m_row, strict=True)
        ]
        cut = hard_cut and not g_ref.skip_cut
        window = [
            not m and not (cut and s <= g_ref.mu_pos - PAPER.margin)
            for s, m in zip(s_row, m_row, strict=True)
        ]
        fn_weighted = [
            p and x > 0 and g_ref.n_pos > PAPER.gate_size for p, x in zip(p_gt_eps, w, strict=True)
        ]
        rows.append(
            (w, hinges, sum(p_gt_eps), sum(window), sum(not m for m in m_row), sum(fn_weighted))
        )
    return rows


def _reference_draws(w: list[float], hinges: list[float], u: list[float]) -> list[int | None]:
    """k draws without replacement; draws after the first are invalid once w is exhausted."""
    w, out = list(w), []
    for t, u_t in enumerate(u):
        if t > 0 and sum(w) == 0:
            out.append(None)
            continue
        j = ref.draw(w, hinges, u_t)
        out.append(j)
        if j is not None and sum(w) > 0:
            w[j] = 0.0
        elif t == 0:  # the fallback (or nothing): no further draws
            return out + [None] * (len(u) - 1)
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("regime", REGIMES)
def test_fast_forms_equal_the_reference(regime: str, dtype: torch.dtype) -> None:
    """Invariant: at the paper's constants, in every regime of the statistics, the dense
    weights and the CPU window weights equal ``fne.reference.weight`` per candidate; both
    selectors draw the reference's negatives from the same uniforms (k = 1 and 3, without
    replacement, with the fallback) and report its counts (P_fn > ε, window, unmasked)."""
    hard_cut = REGIMES[regime][6]
    g, g_ref = _gaussians(regime)
    sim, ids, cand_ids, pos_col, mask = _problem(len(regime), dtype)
    cfg = FneConfig(hard_cut=hard_cut)
    expected = _reference_rows(sim, pos_col, mask, g_ref, hard_cut)
    w_ref = torch.tensor([r[0] for r in expected], dtype=torch.float64)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-6, "atol": 1e-6}

    pos_sim = sim[torch.arange(B), pos_col]
    sims = AnchorSims.of(sim, pos_sim, mask)
    dense = sampling_weights(sims, g, cfg)
    torch.testing.assert_close(dense.w_BN.double(), w_ref, **tol)
    masked = masked_positions(ids, pos_col, candidate_index(cand_ids), N)
    window = window_weights(sims, masked, g, cfg, FNE, max_fraction=0.25)
    wide = sum(r[3] for r in expected) > 0.25 * B * N
    assert (window is None) == (not hard_cut or g_ref.skip_cut or wide)  # compacted when narrow
    if window is not None:
        w_window = torch.zeros_like(sim).scatter_add_(1, window.col_BM, window.w_BM)
        torch.testing.assert_close(w_window.double(), w_ref, **tol)

    for k in (1, 3):
        u = torch.rand(B, k, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
        cfg = FneConfig(negatives=k, hard_cut=hard_cut)
        args = (Rows(sim, pos_col, ids, u), CandidateLabels(cand_ids), g, cfg, FNE)
        for picks in (select_dense(*args), select_listed(*args)):
            for i, (w, hinges, n_fn, n_window, n_unmasked, _) in enumerate(expected):
                draws = _reference_draws(w, hinges, u[i].tolist())
                got = [
                    int(j) if ok else None
                    for j, ok in zip(picks.index_bk[i], picks.valid_bk[i], strict=True)
                ]
                assert got == draws, (i, k)
                counts = (
                    int(picks.count("fn")[i]),
                    int(picks.count("window")[i]),
                    int(picks.count("unmasked")[i]),
                )
                assert counts == (n_fn, n_window, n_unmasked), i
    if regime in GATE_OPEN:  # the Bayes branch really ran: some weights are FN weights
        assert sum(r[5] for r in expected) > 0
    if REGIMES[regime][4] > 0:  # and the P_fn > ε count is not trivially 0
        assert sum(r[2] for r in expected) > 0


def test_hard_cut_boundary_is_inclusive() -> None:
    """Invariant: the hard cut removes s ≤ μ⁺ − margin, the boundary included (s exactly
    μ⁺ − margin in float64 gets weight 0 and is outside the window), while the next float up
    is kept; in both forms, as in the reference."""
    g = gaussians_from_stats(stats_of(torch.tensor([0.5], dtype=torch.float64), torch.zeros(2)))
    assert g.mu_pos.item() == 0.5 and bool(g.has_mu_pos)
    edge = 0.5 - PAPER.margin
    row = [edge, math.nextafter(edge, 1.0), math.nextafter(edge, -1.0)] + [-0.5] * 20 + [0.9]
    sim = torch.tensor([row], dtype=torch.float64)
    pos_col = torch.tensor([len(row) - 1])
    mask = negative_mask(torch.tensor([0]), pos_col, torch.arange(1, len(row) + 1))
    w = sampling_weights(AnchorSims.of(sim, sim[:, -1], mask), g, PAPER)
    assert w.w_BN[0, 0] == 0 and w.w_BN[0, 1] > 0 and w.w_BN[0, 2] == 0
    assert w.n_window_B.tolist() == [1]
    masked = mask.nonzero(as_tuple=True)
    ww = window_weights(AnchorSims.of(sim, sim[:, -1], mask), masked, g, PAPER, FNE, 0.25)
    assert ww is not None and ww.col_BM.tolist() == [[1]] and ww.n_window_B.tolist() == [1]
    g_ref = ref.Gaussians(0.5, float(g.var_pos), float(g.mu_neg), float(g.var_neg), 1)
    assert ref.weight(edge, 0.9, False, g_ref) == 0 < ref.weight(row[1], 0.9, False, g_ref)


def test_fn_weight_needs_p_fn_strictly_above_eps() -> None:
    """Invariant: the FN weight applies where P_fn > ε, not at P_fn = ε: with π = ε and equal
    Gaussians, every log-odds is exactly logit(ε), so every candidate keeps its kernel weight
    and none is counted as P_fn > ε (dense and window forms)."""
    cfg = FneConfig(prior=1e-3, eps=1e-3)
    # n⁺ = 201 (gate open), both means 0 and both variances floored to the same 1e-8.
    g = gaussians_from_stats(torch.tensor([201.0, 0, 0, 402, 0, 0], dtype=torch.float64))
    assert bool(g.gate_open) and g.var_pos.item() == g.var_neg.item()
    sim = torch.tensor([[0.9, 0.1, 0.3, -0.1] + [-0.5] * 20], dtype=torch.float64)
    pos_col = torch.tensor([0])
    mask = negative_mask(torch.tensor([0]), pos_col, torch.arange(1, sim.shape[1] + 1))
    kernel = torch.exp(-cfg.tau_kernel * (sim - 0.9).square()).masked_fill(mask | (sim <= -0.2), 0)
    w = sampling_weights(AnchorSims.of(sim, sim[:, 0], mask), g, cfg)
    torch.testing.assert_close(w.w_BN, kernel, rtol=1e-15, atol=0)
    assert w.n_fn_B.tolist() == [0]
    masked = mask.nonzero(as_tuple=True)
    ww = window_weights(AnchorSims.of(sim, sim[:, 0], mask), masked, g, cfg, FNE, 0.25)
    assert ww is not None and ww.n_fn_B.tolist() == [0]
    torch.testing.assert_close(ww.w_BM, kernel[:, 1:4], rtol=1e-15, atol=0)


def test_a_candidate_exactly_at_the_margin_is_no_violator() -> None:
    """Invariant: the hinge m + s − s⁺ must be > 0 for a violator: at s = s⁺ − m exactly the
    hinge is 0, so VSE++ has no valid negative and the draw counts it as zero-hinge."""
    sim = torch.tensor([[0.5, 0.3, -0.4]], dtype=torch.float64)  # 0.2 + 0.3 − 0.5 == 0 exactly
    assert PAPER.margin + 0.3 - 0.5 == 0.0
    rows = Rows(sim, torch.tensor([0]), torch.tensor([0]))
    for select in (select_dense, select_listed):
        picks = select(rows, CandidateLabels(torch.tensor([0, 1, 2])), None, PAPER, HARDEST)
        assert picks.index_bk.tolist() == [[1]] and picks.valid_bk.tolist() == [[False]]
        assert picks.count("no_violator").tolist() == [1.0] and picks.zero_hinge_bk.tolist() == [
            [True]
        ]


def test_masked_candidates_are_never_drawn() -> None:
    """Invariant: over many uniforms, no draw lands on a masked column, even when the masked
    columns have the highest similarity (they would carry the largest weight)."""
    cfg = FneConfig(negatives=2)
    g, _ = _gaussians("gate open")
    sim, ids, cand_ids, pos_col, mask = _problem(5, torch.float64)
    sim = sim.masked_fill(mask, 0.95)  # masked = the most similar candidates
    for seed in range(5):
        u = torch.rand(B, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        for select in (select_dense, select_listed):
            picks = select(Rows(sim, pos_col, ids, u), CandidateLabels(cand_ids), g, cfg, FNE)
            assert not (mask.gather(1, picks.index_bk) & picks.valid_bk).any()


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
    hardest, has_violator = hardest_violator(sim.masked_fill(mask, -math.inf), pos_sim, 0.2)
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
    g, _ = _gaussians("gate closed")
    sim, _, _, pos_col, mask = _problem(7, torch.float64)
    pos_sim = sim[torch.arange(B), pos_col]
    w = sampling_weights(AnchorSims.of(sim, pos_sim, mask), g, cfg, WINDOW).w_BN
    inside = (sim > g.mu_pos - cfg.margin) & ~mask
    assert torch.equal(w, inside.to(w.dtype))


@pytest.mark.slow
@pytest.mark.system  # inductor compiles C++ in compiler processes
@pytest.mark.timeout(300)
def test_compiled_sampler_matches_eager() -> None:
    """Invariant: the torch.compile-fused dense selector (fne.compile) draws what the eager
    one draws."""
    from fne_dist.fne.loss import _compiled_dense

    g, _ = _gaussians("gate open")
    sim, ids, cand_ids, pos_col, _ = _problem(11, torch.float64)
    u = torch.rand(B, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cfg = FneConfig(negatives=2)
    args = (Rows(sim, pos_col, ids, u), CandidateLabels(cand_ids), g, cfg, FNE)
    eager, fused = select_dense(*args), _compiled_dense()(*args)
    assert torch.equal(eager.index_bk, fused.index_bk)
    assert torch.equal(eager.valid_bk, fused.valid_bk)
    assert torch.equal(eager.counts_bC, fused.counts_bC)


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

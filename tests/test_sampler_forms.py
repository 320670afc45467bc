"""The CPU sampler (masked entries listed by binary search, weights in the hard-cut window only)
picks exactly what the dense sampler picks, and its building blocks equal their plain forms."""

from __future__ import annotations

import math

import pytest
import torch

from fne_dist.fne import FneConfig, gaussians_from_stats, negative_mask, stats_of
from fne_dist.fne import reference as ref
from fne_dist.fne.posterior import fn_log_odds, fn_log_odds_threshold
from fne_dist.fne.posteriors import paper_fit
from fne_dist.fne.rules import RULES
from fne_dist.fne.sampling import first_argmax, inverse_cdf_draw
from fne_dist.fne.selection import (
    CandidateLabels,
    Rows,
    candidate_index,
    masked_positions,
    select_dense,
    select_listed,
)
from fne_dist.fne.weights import count_greater, count_true, fn_region_inside_window

B, N = 10, 701  # N not a multiple of the draw's block of 128


def _gaussians(mu_pos: float, sd_pos: float, sd_neg: float, n_pos: int, pooled: bool = False):
    gen = torch.Generator().manual_seed(n_pos)
    pos = mu_pos + sd_pos * torch.randn(n_pos, generator=gen, dtype=torch.float64)
    neg = mu_pos - 0.3 + sd_neg * torch.randn(2 * n_pos, generator=gen, dtype=torch.float64)
    return gaussians_from_stats(
        stats_of(pos, neg), gate_size=200, variance="pooled" if pooled else "separate"
    )


def _problem(seed: int, dtype: torch.dtype = torch.float32, groups: bool = False):
    """Similarities spread over [-0.9, 0.9], repeated ids (other captions of an image), the
    positive column somewhere in the row, and optional group labels with unknowns (-1)."""
    gen = torch.Generator().manual_seed(seed)
    sim = ((torch.rand(B, N, generator=gen, dtype=torch.float64) * 2 - 1) * 0.9).to(dtype)
    ids = torch.arange(B) * 3
    cand_ids = torch.randint(0, 3 * B, (N,), generator=gen)
    pos_col = torch.randperm(N, generator=gen)[:B]
    cand_ids[pos_col[:-1]] = ids[:-1]  # the last anchor's positive column has another id
    sim[torch.arange(B), pos_col] = (0.6 + 0.3 * torch.rand(B, generator=gen)).to(dtype)
    g_b = g_n = None
    if groups:
        g_b = torch.randint(-1, 4, (B,), generator=gen)
        g_n = torch.randint(-1, 4, (N,), generator=gen)
    return sim, ids, cand_ids, pos_col, g_b, g_n


REGIMES = {
    "fn region inside the window": dict(mu_pos=0.5, sd_pos=0.05, sd_neg=0.05, n_pos=400),
    "sigma+ > sigma-: easy negatives have P_fn > eps": dict(
        mu_pos=0.5, sd_pos=0.15, sd_neg=0.05, n_pos=400
    ),
    "gate closed": dict(mu_pos=0.4, sd_pos=0.1, sd_neg=0.1, n_pos=50),
    "no mu+ yet: window = every candidate": dict(mu_pos=0.5, sd_pos=0.1, sd_neg=0.1, n_pos=0),
}


CASES = [
    (regime, rule, k, hard_cut)
    for regime in REGIMES
    for rule in ("fne", "window")
    for k in (1, 3)
    for hard_cut in (True, False)
] + [(regime, "hardest", 1, True) for regime in REGIMES]


@pytest.mark.parametrize(("regime", "rule", "k", "hard_cut"), CASES)
def test_listed_form_picks_what_the_dense_form_picks(
    regime: str, rule: str, k: int, hard_cut: bool
) -> None:
    """Invariant: given the same uniforms, the CPU form and the dense form draw the same
    negatives and report the same counts (P_fn > ε, unmasked, window, fallbacks), in every
    regime of the statistics, with and without the oracle's group mask."""
    g = _gaussians(**REGIMES[regime])
    for seed, groups in ((0, False), (1, True)):
        sim, ids, cand_ids, pos_col, g_b, g_n = _problem(seed, groups=groups)
        cfg = FneConfig(negatives=k, hard_cut=hard_cut, prior=0.05, eps=0.01)
        u = torch.rand(B, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        args = (
            Rows(sim, pos_col, ids, u, g_b),
            CandidateLabels(cand_ids, g_n),
            g,
            cfg,
            RULES[rule],
        )
        dense = select_dense(*args)
        listed = select_listed(*args)
        for field in dense._fields:
            assert torch.equal(getattr(dense, field), getattr(listed, field)), (field, groups)
        if rule == "fne" and regime.startswith("sigma"):
            assert int(dense.count("fn").sum()) > 0  # the count outside the window is exercised


def test_masked_positions_are_the_negative_mask() -> None:
    """Invariant: the listed entries are exactly the True entries of ``negative_mask`` (same
    id, the explicit positive column even with another id, the oracle's groups with unknown
    labels matching nothing), each once, row-major."""
    for groups in (False, True):
        _, ids, cand_ids, pos_col, g_b, g_n = _problem(3, groups=groups)
        mask = negative_mask(ids, pos_col, cand_ids, g_b, g_n)
        rows, cols = masked_positions(ids, pos_col, candidate_index(cand_ids, g_n), N, g_b)
        expected_rows, expected_cols = mask.nonzero(as_tuple=True)
        assert torch.equal(rows, expected_rows) and torch.equal(cols, expected_cols)


def test_two_level_draw_equals_the_plain_cumulative_sum() -> None:
    """Invariant: the block-sum draw returns the reference's first column with cdf > u·total
    (float64 weights, zeros in runs, N not a multiple of the block), and never a zero-weight
    column, also for uniforms next to 0 and 1 and for rows whose last blocks are all zero."""
    gen = torch.Generator().manual_seed(5)
    w = torch.rand(40, N, generator=gen, dtype=torch.float64)
    w[w < 0.7] = 0.0  # 70 % zeros
    w[1] = 0.0  # an empty row
    w[2, 300:] = 0.0  # trailing zero blocks
    w[3, :] = 0.0
    w[3, 5] = 1e-300  # one tiny weight
    for u_value in (None, 0.0, 1.0 - 1e-12):
        u = (
            torch.rand(40, generator=gen, dtype=torch.float64)
            if u_value is None
            else torch.full((40,), u_value, dtype=torch.float64)
        )
        idx, total = inverse_cdf_draw(w, u)
        for i in range(40):
            j = ref.draw(w[i].tolist(), [0.0] * N, float(u[i]))  # no fallback: None if empty
            if j is None:
                assert total[i] == 0
            else:
                assert int(idx[i]) == j, (i, u_value)
                assert w[i, idx[i]] > 0


def test_rounding_of_block_sums_never_lands_on_a_zero_weight() -> None:
    """Invariant: when the block sum (summed pairwise) exceeds the block's left-to-right cdf,
    so that no cdf entry exceeds a target near the total, the draw still takes a positive
    weight: 1 + 60 × 1e-16 is 1 left to right but not pairwise, and 67 zeros follow."""
    w = torch.zeros(1, 128, dtype=torch.float64)
    w[0, 0], w[0, 1:61] = 1.0, 1e-16
    assert float(w.sum()) > float(w.cumsum(1)[0, -1])  # the rounding this test is about
    idx, _ = inverse_cdf_draw(w, torch.tensor([1.0 - 1e-15], dtype=torch.float64))
    assert w[0, idx[0]] > 0


def test_first_argmax_equals_max() -> None:
    """Invariant: the two-level argmax returns torch.max's value and first index, with ties,
    −inf entries, all-(−inf) rows and N not a multiple of the block."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(0, 50, (30, N), generator=gen).float()  # many ties
    x[x < 5] = -math.inf
    x[4] = -math.inf
    best, idx = first_argmax(x)
    ref_best, ref_idx = x.max(dim=1)
    assert torch.equal(best, ref_best) and torch.equal(idx, ref_idx)


@pytest.mark.parametrize("regime", REGIMES)
def test_fn_region_check_is_sound(regime: str) -> None:
    """Invariant: whenever the check says every P_fn > ε candidate is in the window, no float32
    similarity in [−1, μ⁺ − margin] has log-odds above logit(ε)."""
    g = _gaussians(**REGIMES[regime])
    cfg = FneConfig(prior=0.05, eps=0.01)
    s = torch.linspace(-1.0, 1.0, 200_001, dtype=torch.float32)
    for threshold in (-0.5, 0.0, 0.2, 0.3, 0.45):
        if fn_region_inside_window(paper_fit(g, cfg.prior), cfg.eps, threshold):
            outside = s[s <= threshold]
            log_odds = fn_log_odds(outside, g, cfg.prior)
            assert not (log_odds > fn_log_odds_threshold(cfg.eps)).any(), threshold


def test_count_greater_paths_agree_at_the_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    """Invariant: both paths of ``count_greater`` (the CPU 0/1 float sum, and the bool count of
    accelerators and torch.compile) count x > threshold: an entry equal to it is not counted."""
    x = torch.tensor([[0.3, 0.3, 0.30000001, -0.5], [0.3, 0.2, 0.1, 0.0]], dtype=torch.float64)
    t = torch.tensor(0.3, dtype=torch.float64)
    assert count_greater(x, t).tolist() == [1, 0]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert count_greater(x, t).tolist() == [1, 0]


def test_count_true_equals_sum() -> None:
    """Invariant: the byte-sum count equals ``sum`` on rows longer than 255 (no uint8 wrap)."""
    x = torch.rand(7, 5000, generator=torch.Generator().manual_seed(0)) > 0.1
    assert torch.equal(count_true(x), x.sum(dim=1))


def test_float_units_are_the_integer_units() -> None:
    """Invariant: the draw's float32 units are the same whole numbers as ``weight_units``
    (0, 1, tiny and subnormal weights, float32 neighbours), and their block cdf is the
    integer one exactly, so the float32 draw picks what the int64 draw picks."""
    from fne_dist.fne.sampling import float_units, unit_cdf, weight_units

    gen = torch.Generator().manual_seed(9)
    w = torch.rand(6, N, generator=gen)
    w[w < 0.3] = 0.0
    w[0, :5] = torch.tensor([1.0, 1e-45, 2.0**-15, 2.0**-15 - 2.0**-40, 0.999999])
    w[1] = 1.0  # the largest block sums
    units = float_units(w)
    assert units.dtype == torch.float32
    assert torch.equal(units.long(), weight_units(w))
    assert torch.equal(unit_cdf(units), unit_cdf(weight_units(w)))
    u = torch.rand(6, generator=gen, dtype=torch.float64)
    w64 = w.double()
    assert torch.equal(inverse_cdf_draw(w, u)[0], inverse_cdf_draw(w64, u)[0])


@pytest.mark.parametrize("hard_cut", [True, False])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("fallback", ["hardest", "unflagged"])
@pytest.mark.parametrize("gate", ["open", "closed"])
def test_listed_form_with_given_log_odds_picks_what_the_dense_form_picks(
    hard_cut: bool, k: int, fallback: str, gate: str
) -> None:
    """Invariant: with the posterior's log-odds given for every pair (a posterior that is not a
    function of s, such as the default's image-image one), the CPU form draws what the dense
    form draws and reports the same counts, detection and expected shares: flagged candidates
    inside and outside the window, rows whose window is empty (the fallback, skipping flagged
    candidates under ``unflagged``, within the batch block), the oracle's groups or none."""
    g = _gaussians(mu_pos=0.75, sd_pos=0.05, sd_neg=0.05, n_pos=400 if gate == "open" else 50)
    for seed, groups in ((2, False), (3, True)):
        sim, ids, cand_ids, pos_col, g_b, g_n = _problem(seed, groups=groups)
        sim[:3] *= 0.5  # three rows with an empty window: they fall back
        gen = torch.Generator().manual_seed(seed + 10)
        log_odds = (torch.rand(B, N, generator=gen) * 8 - 6).to(sim.dtype)  # ~25 % flagged
        log_odds[:3, :200] += 3.0  # the fallback rows' batch block: mostly flagged
        u = torch.rand(B, k, generator=gen, dtype=torch.float64)
        for reduction in ("sample", "expected"):
            cfg = FneConfig(negatives=k, hard_cut=hard_cut, eps=0.5, tau_fn=4.0,
                            fallback=fallback, reduction=reduction)  # fmt: skip
            rows = Rows(sim, pos_col, ids, u, None, g_b, log_odds, fallback_cols=200)
            args = (rows, CandidateLabels(cand_ids, g_n), g, cfg, RULES["fne"])
            dense, listed = select_dense(*args), select_listed(*args)
            # a draw that does not exist (valid False: an exhausted or empty row) names an
            # arbitrary column, which nothing reads (the loss weighs its hinge, similarity and
            # counts by valid: 0)
            valid = dense.valid_bk
            assert torch.equal(valid, listed.valid_bk)
            per_draw = {"index_bk", "sim_bk", "zero_hinge_bk"}
            for field in per_draw:
                assert torch.equal(getattr(dense, field)[valid], getattr(listed, field)[valid])
            for field in set(dense._fields) - per_draw:
                assert torch.equal(getattr(dense, field), getattr(listed, field)), (field, seed)
            assert int(dense.count("fallback").sum()) > 0 or hard_cut is False
            assert int(dense.count("fn").sum()) > 0


def test_listed_draw_equals_the_reference() -> None:
    """Invariant: one draw per anchor from weights listed row by row (the window's entries)
    is the reference's inverse-CDF draw over the dense row and the dense form's draw: zero
    weights in runs, empty rows (the fallback column, or no violator), a row of one tiny
    weight, uniforms next to 0 and 1, N not a multiple of the block."""
    from fne_dist.fne.sampling import draw_negatives, listed_draw

    gen = torch.Generator().manual_seed(21)
    w = torch.rand(40, N, generator=gen)
    w[w < 0.8] = 0.0
    w[1] = 0.0  # an empty row: its fallback
    w[2] = 0.0  # an empty row without a violator
    w[3, :] = 0.0
    w[3, 700] = 2.0**-30  # one tiny weight, in the last partial block
    flat = w.view(-1).nonzero().squeeze(1)
    starts = torch.searchsorted(flat, torch.arange(41) * N)
    hardest = torch.arange(40) + 5
    violates = torch.ones(40, dtype=torch.bool)
    violates[2] = False
    for u_value in (None, 0.0, 1.0 - 1e-12):
        u = (
            torch.rand(40, generator=gen, dtype=torch.float64)
            if u_value is None
            else torch.full((40,), u_value, dtype=torch.float64)
        )
        got = listed_draw(w.view(-1)[flat], flat, starts, N, u, hardest, violates)
        dense = draw_negatives(w, u[:, None], hardest, violates)
        for field in got._fields:
            assert torch.equal(getattr(got, field), getattr(dense, field)), (field, u_value)
        for i in range(40):
            j = ref.draw(w[i].double().tolist(), [0.0] * N, float(u[i]))
            assert int(got.index_Bk[i, 0]) == (int(hardest[i]) if j is None else j), i
        assert got.no_violator_B.tolist()[:3] == [False, False, True]


def _intra_problem(seed: int):
    """Anchor and candidate images whose image-image similarity x spans [-0.9, 0.9], a fit whose
    P_fn > ε region is x > ~0.55 (about 10 % of the pairs), and the cross-modal rows of
    ``_problem``."""
    from fne_dist.fne.mixture import Mixture
    from fne_dist.fne.posteriors.intra_mixture import IntraFit

    sim, ids, cand_ids, pos_col, g_b, g_n = _problem(seed, groups=True)
    gen = torch.Generator().manual_seed(seed + 100)
    img_a = torch.nn.functional.normalize(torch.randn(B, 8, generator=gen), dim=1)
    img_c = torch.nn.functional.normalize(torch.randn(N, 8, generator=gen), dim=1)
    img_c[:40] = img_a[torch.arange(40) % B] + 0.2 * torch.randn(40, 8, generator=gen)
    img_c = torch.nn.functional.normalize(img_c, dim=1)
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    fit = IntraFit(Mixture(t(0.05), t(0.8), t(0.02), t(0.0), t(0.1)))
    return sim, ids, cand_ids, pos_col, g_b, g_n, img_a, img_c, fit


@pytest.mark.parametrize("hard_cut", [True, False])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("fallback", ["hardest", "unflagged"])
def test_listed_form_with_a_pair_signal_picks_what_the_dense_form_picks(
    hard_cut: bool, k: int, fallback: str
) -> None:
    """Invariant: given the image-image signal x instead of every pair's log-odds (the
    default posterior, ``signal_quadratic``), the listed form draws what the dense form draws
    from the float64 log-odds, with the same fallbacks, window and unmasked counts, detection
    and expected shares; its P_fn > ε count (float32 quadratic) differs only by pairs whose
    float64 log-odds lie within ``SIGNAL_BAND`` of logit(ε)."""
    from dataclasses import replace

    from fne_dist.fne.posteriors import PairSims
    from fne_dist.fne.selection import signal_fn_count

    sim, ids, cand_ids, pos_col, g_b, g_n, img_a, img_c, fit = _intra_problem(4)
    sim[:3] *= 0.5  # three rows with an empty window: they fall back
    g = replace(_gaussians(0.75, 0.05, 0.05, 400), posterior=fit)
    x = fit.pair_signal(img_a, img_c)
    log_odds = fit.log_odds(PairSims(sim, img_a, img_c))
    gen = torch.Generator().manual_seed(7)
    u = torch.rand(B, k, generator=gen, dtype=torch.float64)
    for reduction, detect in (("sample", None), ("expected", None), ("sample", g_b)):
        cfg = FneConfig(negatives=k, hard_cut=hard_cut, eps=0.5, tau_fn=4.0,
                        fallback=fallback, reduction=reduction)  # fmt: skip
        fn_all = signal_fn_count(x, g, cfg, chunk_rows=3)
        dense_rows = Rows(sim, pos_col, ids, u, None, detect, log_odds, fallback_cols=200)
        signal_rows = dense_rows._replace(log_odds_bN=None, signal_bN=x, fn_all_b=fn_all)
        labels = CandidateLabels(cand_ids, g_n)
        dense = select_dense(dense_rows, labels, g, cfg, RULES["fne"])
        listed = select_listed(signal_rows, labels, g, cfg, RULES["fne"])
        valid = dense.valid_bk
        assert torch.equal(valid, listed.valid_bk)
        for field in ("index_bk", "sim_bk", "zero_hinge_bk"):
            assert torch.equal(getattr(dense, field)[valid], getattr(listed, field)[valid])
        for field in ("prob_bN", "detect_bF"):
            assert torch.equal(getattr(dense, field), getattr(listed, field)), field
        assert torch.equal(dense.counts_bC[:, :2], listed.counts_bC[:, :2])  # fallbacks
        assert torch.equal(dense.counts_bC[:, 3:], listed.counts_bC[:, 3:])  # unmasked, window
        near = _within_signal_band(x, fit, cfg.eps).sum(1).double()
        assert ((dense.count("fn") - listed.count("fn")).abs() <= near).all()
        assert int(dense.count("fn").sum()) > 0
        assert int(dense.count("fallback").sum()) > 0 or not hard_cut


SIGNAL_BAND = 1e-6
"""How far from logit(ε), relative to |α|x² + |β||x| + |γ| + 1, the float64 log-odds of a pair
whose float32 P_fn > ε flag differs may lie (a few float32 rounding steps)."""


def _within_signal_band(x: torch.Tensor, fit, eps: float) -> torch.Tensor:
    alpha, beta, gamma = (float(c) for c in fit.signal_coefficients())
    x64 = x.double()
    scale = abs(alpha) * x64.square() + abs(beta) * x64.abs() + abs(gamma) + 1.0
    exact = fit.signal_log_odds(x, torch.float64)
    return (exact - fn_log_odds_threshold(eps)).abs() <= SIGNAL_BAND * scale


def test_signal_fn_count_differs_from_the_float64_flags_only_within_the_band() -> None:
    """Invariant: the float32 quadratic's P_fn > ε count over a row equals the count of the
    float64 formula's flags (rounded to float32, as the dense form reads them), except for
    pairs whose float64 log-odds lie within ``SIGNAL_BAND`` of logit(ε): x swept densely
    through both roots of L = logit(ε)."""
    from dataclasses import replace

    from fne_dist.fne.selection import signal_fn_count

    *_, fit = _intra_problem(0)
    g = replace(_gaussians(0.75, 0.05, 0.05, 400), posterior=fit)
    cfg = FneConfig(eps=0.5)
    alpha, beta, gamma = (float(c) for c in fit.signal_coefficients())
    disc = math.sqrt(beta * beta - 4 * alpha * (gamma - fn_log_odds_threshold(cfg.eps)))
    roots = [(-beta + s * disc) / (2 * alpha) for s in (-1.0, 1.0)]
    sweep = [torch.linspace(r - 1e-5, r + 1e-5, 20_000, dtype=torch.float32) for r in roots]
    x = torch.cat([*sweep, torch.linspace(-1, 1, 20_000)]).reshape(6, -1)
    exact = fit.signal_log_odds(x, torch.float32) > fn_log_odds_threshold(cfg.eps)
    got = signal_fn_count(x, g, cfg, chunk_rows=4)
    near = _within_signal_band(x, fit, cfg.eps)
    assert ((got - exact.sum(1)).abs() <= near.sum(1)).all()
    far_exact = (exact & ~near).sum(1)
    assert (got >= far_exact).all() and (got <= far_exact + near.sum(1)).all()
    assert int(near.sum()) > 0  # the sweep does reach the band


@pytest.mark.parametrize("hard_cut", [True, False])
def test_loss_with_the_pair_signal_equals_the_loss_with_every_pairs_log_odds(
    monkeypatch: pytest.MonkeyPatch, hard_cut: bool
) -> None:
    """Invariant: the CPU step with the default posterior, taking the image-image signal (one
    product for t2i's similarities and the signal, the P_fn > ε count once per block of
    anchors for both directions), gives the loss, draws and diagnostics of the same step
    with every pair's float64 log-odds; 2 blocks of anchors, rows in several chunks."""
    from dataclasses import replace

    from fne_dist.fne import Anchors, Candidates, retrieval_loss
    from fne_dist.fne import loss as loss_module
    from fne_dist.fne.posteriors.intra_mixture import IntraFit

    _, ids, cand_ids, pos_col, _, _, img_a, img_c, fit = _intra_problem(5)
    gen = torch.Generator().manual_seed(8)
    unit = lambda n: torch.nn.functional.normalize(torch.randn(n, 8, generator=gen), dim=1)  # noqa: E731
    anchors = Anchors(img_a, unit(B), ids, pos_col)
    cands = Candidates(img_c, unit(N), cand_ids, n_batch=50)
    g = replace(_gaussians(0.3, 0.05, 0.05, 400), posterior=fit)
    cfg = FneConfig(posterior="intra_mixture", fallback="unflagged", eps=0.5, tau_fn=4.0,
                    hard_cut=hard_cut, block_rows=6, window_chunk_rows=4, chunk_rows=4)  # fmt: skip
    u = torch.rand(2, B, 1, generator=gen, dtype=torch.float64)
    monkeypatch.setattr(loss_module, "DENSE_CHUNK_ELEMENTS", 0)  # the listed form, as at scale
    new = retrieval_loss(anchors, cands, cfg, g, u)
    monkeypatch.setattr(IntraFit, "signal_quadratic", False)
    old = retrieval_loss(anchors, cands, cfg, g, u)
    torch.testing.assert_close(new.loss, old.loss, rtol=1e-6, atol=0)
    assert new.diagnostics.keys() == old.diagnostics.keys()
    for key, value in old.diagnostics.items():
        torch.testing.assert_close(new.diagnostics[key], value, rtol=1e-6, atol=0, msg=key)
    assert float(old.diagnostics["frac_pfn_gt_eps"]) > 0


def _unflagging_fit(prior: float, var_fn: float = 0.02):
    from fne_dist.fne.mixture import Mixture
    from fne_dist.fne.posteriors.intra_mixture import IntraFit

    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return IntraFit(Mixture(t(prior), t(0.6), t(var_fn), t(0.0), t(0.1)))


@pytest.mark.parametrize("prior", [1e-6, 1e-3, 0.05, 0.5])
def test_max_signal_log_odds_bounds_both_evaluations(prior: float) -> None:
    """Invariant: ``max_signal_log_odds`` is never below the log-odds the sampler computes for
    any signal x (the float32 quadratic of the P_fn > ε count and the float64 formula rounded
    to float32), x swept densely around the vertex and out to the float32 extremes, and it is
    within 0.01 of the exact supremum (tight enough to decide); +inf when the false negative
    component is the wider one (L unbounded above)."""
    from fne_dist.fne.posterior import quadratic_log_odds

    fit = _unflagging_fit(prior)
    alpha, beta, gamma = (float(c) for c in fit.signal_coefficients())
    vertex = -beta / (2 * alpha)
    sup = gamma - beta * beta / (4 * alpha)
    bound = fit.max_signal_log_odds()
    assert sup <= bound <= sup + 0.01
    x = torch.cat([
        torch.linspace(vertex - 1e-3, vertex + 1e-3, 100_001, dtype=torch.float32),
        torch.linspace(-3.0, 3.0, 100_001), torch.tensor([-1e30, 1e30, 3e38, -3e38]),
    ])  # fmt: skip
    for odds in (quadratic_log_odds(x, fit.signal_coefficients(), False),
                 fit.signal_log_odds(x, torch.float32)):  # fmt: skip
        assert float(odds.max()) <= bound
    assert _unflagging_fit(prior, var_fn=0.2).max_signal_log_odds() == math.inf


@pytest.mark.parametrize("hard_cut", [True, False])
def test_loss_of_a_fit_that_flags_nothing_skips_the_signal(
    monkeypatch: pytest.MonkeyPatch, hard_cut: bool
) -> None:
    """Invariant: when the fit's log-odds stay below logit(ε) for every signal, the CPU step
    computes no image-image signal and no P_fn > ε count, and gives bit for bit the loss,
    gradients and diagnostics of the same step with every pair's float64 log-odds (rows that
    fall back under ``unflagged`` included; without the hard cut, the wide-window form)."""
    from dataclasses import replace

    from fne_dist.fne import Anchors, Candidates, retrieval_loss
    from fne_dist.fne import loss as loss_module
    from fne_dist.fne.posteriors.intra_mixture import IntraFit

    _, ids, cand_ids, pos_col, _, _, img_a, img_c, _ = _intra_problem(6)
    fit = _unflagging_fit(1e-3)
    cfg = FneConfig(posterior="intra_mixture", fallback="unflagged", eps=0.5, tau_fn=4.0,
                    hard_cut=hard_cut, block_rows=6, window_chunk_rows=4, chunk_rows=4)  # fmt: skip
    assert fit.max_signal_log_odds() < fn_log_odds_threshold(cfg.eps)
    gen = torch.Generator().manual_seed(9)
    unit = lambda n: torch.nn.functional.normalize(torch.randn(n, 8, generator=gen), dim=1)  # noqa: E731
    img_a.requires_grad_()
    txt_a = unit(B).requires_grad_()
    anchors = Anchors(img_a, txt_a, ids, pos_col)
    cands = Candidates(img_c, unit(N), cand_ids, n_batch=50)
    g = replace(_gaussians(1.05, 0.05, 0.05, 400), posterior=fit)  # some windows empty
    u = torch.rand(2, B, 1, generator=gen, dtype=torch.float64)
    monkeypatch.setattr(loss_module, "DENSE_CHUNK_ELEMENTS", 0)  # the listed form, as at scale

    def step():
        out = retrieval_loss(anchors, cands, cfg, g, u)
        grads = torch.autograd.grad(out.loss, (img_a, txt_a))
        return out, grads

    def no_count(*args, **kwargs):
        raise AssertionError("the P_fn > eps count ran for a fit that flags nothing")

    with monkeypatch.context() as patch:
        patch.setattr(loss_module, "signal_fn_count", no_count)
        new, new_grads = step()
    monkeypatch.setattr(IntraFit, "signal_quadratic", False)
    old, old_grads = step()
    assert torch.equal(new.loss, old.loss)
    assert all(torch.equal(a, b) for a, b in zip(new_grads, old_grads, strict=True))
    assert new.diagnostics.keys() == old.diagnostics.keys()
    for key, value in old.diagnostics.items():
        assert torch.equal(new.diagnostics[key], value), key
    assert float(old.diagnostics["frac_pfn_gt_eps"]) == 0.0
    assert float(old.diagnostics["fallback"]) > 0 or not hard_cut
    assert float(old.diagnostics["frac_in_window"]) > 0

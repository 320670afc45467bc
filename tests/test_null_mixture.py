"""``fne.mixture_null_components`` ≥ 2 (fne_dist/fne/null_mixture.py): the mixture posteriors'
true-negative density as J Gaussians. Its EM step and log-odds are held equal to plain loops
over samples; on a skewed null with a small false-negative bump (the emoji's shape) it finds the
bump where the two-component mixture does not; J = 1 leaves the two-component path unchanged."""

from __future__ import annotations

import math

import torch

from fne_dist.fne import FneConfig, gaussians_from_stats, stats_of
from fne_dist.fne.mixture import bin_centres, histogram, refit
from fne_dist.fne.null_mixture import (
    NullMixture,
    fit_null_mixture,
    null_em_step,
    null_log_odds,
    null_start,
)
from fne_dist.fne.posteriors import PairSims, posterior_for
from fne_dist.fne.posteriors.cross_mixture import CrossNullFit, MixtureFit
from fne_dist.fne.posteriors.intra_mixture import IntraFit, IntraNullFit

F64 = torch.float64


def _emoji_like(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Similarities and false-negative labels: 1 % false negatives N(0.88, 0.06²) above a
    skewed null 0.75 N(−0.02, 0.13²) + 0.24 N(0.2, 0.2²) (the shape measured on the emoji)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=gen, dtype=F64)
    z = torch.randn(n, generator=gen, dtype=F64)
    fn = u < 0.01
    core = u < 0.76
    x = torch.where(fn, 0.88 + 0.06 * z, torch.where(core, -0.02 + 0.13 * z, 0.2 + 0.2 * z))
    return x.clamp(-1.0, 1.0), fn


def _mixture(w, mu, sd) -> NullMixture:
    t = lambda v: torch.tensor(v, dtype=F64)  # noqa: E731
    return NullMixture(t(w), t(mu), t(sd).square())


def _normal(x: float, mu: float, var: float) -> float:
    return math.exp(-0.5 * (x - mu) ** 2 / var) / math.sqrt(2 * math.pi * var)


def _densities(x: float, m: NullMixture) -> list[float]:
    """π_k N(x; μ_k, σ_k²) of every component, plain floats."""
    params = zip(m.weights_K.tolist(), m.mu_K.tolist(), m.var_K.tolist(), strict=True)
    return [w * _normal(x, mu, var) for w, mu, var in params]


def test_log_odds_is_bayes_rule_one_pair_at_a_time() -> None:
    """Invariant: L(x) = logit of π_f N_f(x) / Σ_k π_k N_k(x), element by element, including
    a far tail where the densities underflow in a plain ratio (the log-sum-exp form is finite)."""
    m = _mixture([0.6, 0.3, 0.1], [-0.1, 0.2, 0.8], [0.1, 0.2, 0.05])
    xs = torch.linspace(-0.6, 1.0, 33, dtype=F64)
    got = null_log_odds(xs, m)
    for x, L in zip(xs.tolist(), got.tolist(), strict=True):
        dens = _densities(x, m)
        if dens[-1] > 1e-300:
            assert math.isclose(L, math.log(dens[-1]) - math.log(sum(dens[:-1])), rel_tol=1e-9)
    assert torch.isfinite(null_log_odds(torch.tensor([-1.0, 1.0], dtype=F64) * 50, m)).all()


def test_em_step_equals_a_plain_loop() -> None:
    """Invariant: one vectorised EM step on weighted samples (bin centres with counts) equals
    the textbook E- and M-step written one sample at a time."""
    gen = torch.Generator().manual_seed(3)
    xs = torch.rand(40, generator=gen, dtype=F64) * 2 - 1
    ws = torch.rand(40, generator=gen, dtype=F64) * 5
    m = _mixture([0.5, 0.4, 0.1], [-0.3, 0.1, 0.6], [0.2, 0.3, 0.1])
    floor = torch.tensor(1e-6, dtype=F64)
    got = null_em_step(xs, ws, m, floor)
    K = 3
    resp = []
    for x, w in zip(xs.tolist(), ws.tolist(), strict=True):
        d = _densities(x, m)
        resp.append([w * dk / sum(d) for dk in d])
    for k in range(K):
        n = sum(r[k] for r in resp)
        mu = sum(r[k] * x for r, x in zip(resp, xs.tolist(), strict=True)) / n
        var = sum(r[k] * (x - mu) ** 2 for r, x in zip(resp, xs.tolist(), strict=True)) / n
        assert math.isclose(got.weights_K[k].item(), n / sum(ws.tolist()), rel_tol=1e-9)
        assert math.isclose(got.mu_K[k].item(), mu, rel_tol=1e-9)
        assert math.isclose(got.var_K[k].item(), var, rel_tol=1e-9)


def test_quantile_start() -> None:
    """Invariant: the start puts null component j at the (j + ½)/J quantile and the false
    negative one at the 0.99 quantile, each at a bin centre (within one bin of the sample's)."""
    x, _ = _emoji_like(50_000, 1)
    hist = histogram(x, torch.ones_like(x, dtype=torch.bool))
    m = null_start(hist, 2)
    want = torch.quantile(x, torch.tensor([0.25, 0.75, 0.99], dtype=F64))
    assert (m.mu_K - want).abs().max() <= 0.011, (m.mu_K, want)
    assert math.isclose(float(m.weights_K.sum()), 1.0)


def test_a_two_gaussian_null_finds_the_bump_the_two_component_mixture_misses() -> None:
    """Invariant (why the option exists): above a skewed null, the two-component fit spends its
    false-negative component on the null's tail (μ_f far below the bump, flags > 5× the false
    negatives), while J = 2 null components find the bump: π_f within 0.005 of 1 %, μ_f within
    0.03, and P_fn > ½ with precision ≥ 0.7 and recall ≥ 0.9 against the labels."""
    x, fn = _emoji_like(200_000, 2)
    hist = histogram(x, torch.ones_like(x, dtype=torch.bool))
    two = refit(hist)
    assert float(two.mu_fn) < 0.6 and float(two.prior) > 0.05, two
    m = fit_null_mixture(hist, 2)
    assert abs(float(m.prior) - 0.01) < 0.005 and abs(float(m.mu_K[-1]) - 0.88) < 0.03, m
    flagged = null_log_odds(x, m) > 0
    precision = float((flagged & fn).sum() / flagged.sum())
    recall = float((flagged & fn).sum() / fn.sum())
    assert precision >= 0.7 and recall >= 0.9, (precision, recall)
    assert torch.equal(m.mu_K, m.mu_K.sort().values)  # ordered: the last one is f


def test_one_null_component_keeps_the_two_component_posteriors() -> None:
    """Invariant: J = 1 (the default) gives exactly the two-component fits; J = 2 gives the
    null-mixture fits (not quadratic in s, so the sampler evaluates them on every pair), with
    log-odds equal to ``null_log_odds`` of the pair's signal."""
    x, _ = _emoji_like(20_000, 4)
    hist = histogram(x, torch.ones_like(x, dtype=torch.bool))
    g = gaussians_from_stats(stats_of(torch.zeros(0), torch.zeros(0)), 200, 1e-8, "separate")
    assert isinstance(posterior_for(FneConfig(posterior="intra_mixture")).fit(g, hist), IntraFit)
    assert isinstance(posterior_for(FneConfig(posterior="cross_mixture")).fit(g, hist), MixtureFit)
    cfg2 = dict(mixture_null_components=2)
    intra = posterior_for(FneConfig(posterior="intra_mixture", **cfg2)).fit(g, hist)
    cross = posterior_for(FneConfig(posterior="cross_mixture", **cfg2)).fit(g, hist)
    assert isinstance(intra, IntraNullFit) and isinstance(cross, CrossNullFit)
    assert not intra.quadratic and not cross.quadratic
    gen = torch.Generator().manual_seed(5)
    img_a = torch.nn.functional.normalize(torch.randn(3, 4, generator=gen, dtype=F64), dim=1)
    img_c = torch.nn.functional.normalize(torch.randn(6, 4, generator=gen, dtype=F64), dim=1)
    s = torch.rand(3, 6, generator=gen, dtype=F64)
    pairs = PairSims(s, img_a, img_c)
    m = fit_null_mixture(hist, 2)
    torch.testing.assert_close(intra.log_odds(pairs), null_log_odds(img_a @ img_c.T, m))
    torch.testing.assert_close(cross.log_odds(pairs), null_log_odds(s, m))
    assert set(intra.diagnostics()) >= {"prior_intra", "mu_fn_intra", "sigma_fn_intra"}
    assert bin_centres(200).shape == hist.shape


def test_fne_sum_with_the_null_mixture_equals_the_plain_loop() -> None:
    """Invariant: ``fne_sum`` (sum_weight one_minus, gate open) with the intra null-mixture
    posterior equals a plain loop: w_ij = 1 − P_fn(x_ij), P_fn by Bayes' rule over the J + 1
    Gaussians of x_ij = img_i · img_j computed one pair at a time; value and gradient."""
    from dataclasses import replace

    from fne_dist.fne.summed import SumSide, weighted_sum_of_hinges
    from tests.test_fn_summed import B, N, _problem
    from tests.test_sampler import _gaussians

    g, _ = _gaussians("gate open")
    m = _mixture([0.6, 0.3, 0.1], [-0.1, 0.2, 0.5], [0.15, 0.2, 0.1])
    g = replace(g, posterior=IntraNullFit(m))
    cfg = FneConfig(loss="fne_sum", posterior="intra_mixture", mixture_null_components=2)
    anchors, cands, ids, cand_ids, pos_col = _problem(7)
    side = SumSide(cands, cand_ids, None, anchors.detach(), cands)
    got, _ = weighted_sum_of_hinges(anchors, side, ids, pos_col, None, g, cfg)
    want = anchors.new_zeros(())
    for i in range(B):
        s_pos = anchors[i] @ cands[pos_col[i]]
        for j in range(N):
            if cand_ids[j] == ids[i] or j == pos_col[i]:
                continue
            x = float(anchors[i].detach() @ cands[j])
            d = _densities(x, m)
            w_ij = 1.0 - d[-1] / sum(d)
            want = want + w_ij * torch.relu(cfg.margin + anchors[i] @ cands[j] - s_pos)
    want = want / B
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    (g_got,) = torch.autograd.grad(got, anchors)
    (g_want,) = torch.autograd.grad(want, anchors)
    torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-12)


def _class_like(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Similarities and labels shaped like bench/quality.py's ten classes: 10 % false negatives
    N(0.5, 0.19²), a wide bump overlapping a symmetric null N(−0.05, 0.2²)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=gen, dtype=F64)
    z = torch.randn(n, generator=gen, dtype=F64)
    fn = u < 0.1
    return torch.where(fn, 0.5 + 0.19 * z, -0.05 + 0.2 * z).clamp(-1.0, 1.0), fn


def _two_component_log_odds(x: float, m) -> float:
    """logit P_fn of the two-component mixture, one value at a time."""
    f = float(m.prior) * _normal(x, float(m.mu_fn), float(m.var_fn))
    t = (1.0 - float(m.prior)) * _normal(x, float(m.mu_tn), float(m.var_tn))
    return math.log(f) - math.log(t)


def test_auto_null_uses_j_components_on_a_tail_and_two_on_a_bump() -> None:
    """Invariant (``fne.mixture_null_auto``): on the emoji's shape (a skewed null whose tail the
    one-null fit's false-negative component covers, σ_f > σ_t) the fit is the J-component one;
    on the classes' shape (a wide bump, σ_f ≤ σ_t) it is the two-component fit, its log-odds
    equal to Bayes' rule over the two Gaussians computed one value at a time. Both keep
    P_fn > ½ precision and recall ≥ 0.5 against the labels, the issue's goal for one setting."""
    from fne_dist.fne.null_mixture import is_tail, select_null_fit

    for shape, want_tail in ((_emoji_like, True), (_class_like, False)):
        x, fn = shape(200_000, 6)
        hist = histogram(x, torch.ones_like(x, dtype=torch.bool))
        assert bool(is_tail(hist)) is want_tail, shape.__name__
        m = select_null_fit(hist, 3)
        assert float(m.tail) == float(want_tail)
        if want_tail:
            want = fit_null_mixture(hist, 3)
            torch.testing.assert_close(null_log_odds(x[:50], m), null_log_odds(x[:50], want))
        else:
            two = refit(hist)
            for v, L in zip(x[:50].tolist(), null_log_odds(x[:50], m).tolist(), strict=True):
                assert math.isclose(L, _two_component_log_odds(v, two), rel_tol=1e-9, abs_tol=1e-9)
        flagged = null_log_odds(x, m) > 0
        precision = float((flagged & fn).sum() / flagged.sum())
        recall = float((flagged & fn).sum() / fn.sum())
        assert precision >= 0.5 and recall >= 0.5, (shape.__name__, precision, recall)


def test_auto_null_posterior_and_config() -> None:
    """Invariant: with ``fne.mixture_null_auto`` both mixture posteriors fit through the
    selection and log its choice (``frac_tail``); without null components to choose it fails
    at config time with one clear line."""
    import pytest

    x, _ = _emoji_like(20_000, 7)
    hist = histogram(x, torch.ones_like(x, dtype=torch.bool))
    g = gaussians_from_stats(stats_of(torch.zeros(0), torch.zeros(0)), 200, 1e-8, "separate")
    auto = dict(mixture_null_components=3, mixture_null_auto=True)
    intra = posterior_for(FneConfig(posterior="intra_mixture", **auto)).fit(g, hist)
    cross = posterior_for(FneConfig(posterior="cross_mixture", **auto)).fit(g, hist)
    assert isinstance(intra, IntraNullFit) and isinstance(cross, CrossNullFit)
    assert float(intra.diagnostics()["frac_tail_intra"]) == 1.0
    assert "frac_tail" in cross.diagnostics()
    with pytest.raises(ValueError, match="mixture_null_auto"):
        FneConfig(posterior="intra_mixture", mixture_null_auto=True).check()


def _reference_fit(hist: torch.Tensor, null_components: int) -> NullMixture:
    """``fit_null_mixture`` as it was written first: ``NULL_FIT_ITERS`` calls of
    ``null_em_step`` from ``null_start``, then the ordering and the prior's clamp."""
    from fne_dist.fne.mixture import MIX_PRIOR_MAX, MIX_PRIOR_MIN
    from fne_dist.fne.null_mixture import NULL_FIT_ITERS, NULL_MIN_VAR_SHARE

    centres, counts = bin_centres(hist.shape[0]), hist.to(F64)
    m = null_start(counts, null_components)
    var_min = (NULL_MIN_VAR_SHARE * m.var_K[0]).clamp_min(1e-8)
    for _ in range(NULL_FIT_ITERS):
        m = null_em_step(centres, counts, m, var_min)
    order = m.mu_K.argsort()
    weights = m.weights_K[order]
    prior = weights[-1].clamp(MIX_PRIOR_MIN, MIX_PRIOR_MAX)
    null = weights[:-1] * (1.0 - prior) / weights[:-1].sum().clamp_min(1e-12)
    return NullMixture(torch.cat([null, prior[None]]), m.mu_K[order], m.var_K[order])


def test_fast_em_fit_has_the_bits_of_the_step_by_step_fit() -> None:
    """Invariant: ``fit_null_mixture`` (its in-place EM loop, under TorchScript on the host, and
    eagerly as an accelerator runs it) gives bit for bit the fit of ``null_em_step`` called
    ``NULL_FIT_ITERS`` times, for J = 1 (``is_tail``'s fit), 2 and 3 on the emoji's and the
    classes' shapes, decayed running histograms (fractional counts), a sparse and an empty one.
    Why bits: the default run's printed results stay the same digits only if every step's P_fn
    does."""
    from fne_dist.fne import null_mixture

    hists = []
    for seed, shape in enumerate((_emoji_like, _class_like, _emoji_like)):
        x, _ = shape(20_000, 20 + seed)
        hists.append(histogram(x, torch.ones_like(x, dtype=torch.bool)))
    hists.append(0.99 * hists[0] + 0.5 * hists[1])  # a running total: fractional counts
    sparse = torch.zeros(200, dtype=F64)
    sparse[[10, 90, 91, 185]] = torch.tensor([3.0, 40.0, 7.5, 0.25], dtype=F64)
    hists += [sparse, torch.zeros(200, dtype=F64)]
    for i, hist in enumerate(hists):
        for j in (1, 2, 3):
            want = _reference_fit(hist, j)
            got = fit_null_mixture(hist, j)  # the host form (TorchScript where available)
            m = null_start(hist, j)
            floor = (null_mixture.NULL_MIN_VAR_SHARE * m.var_K[0]).clamp_min(1e-8)
            eager = null_mixture.em_iterations(
                bin_centres(200), hist, m.weights_K, m.mu_K, m.var_K, floor, 5
            )
            step = m
            for _ in range(5):
                step = null_em_step(bin_centres(200), hist, step, floor)
            fast = (got.weights_K, got.mu_K, got.var_K, *eager)
            ref = (want.weights_K, want.mu_K, want.var_K, step.weights_K, step.mu_K, step.var_K)
            for a, b in zip(fast, ref, strict=True):
                assert torch.equal(a, b), (i, j, a, b)

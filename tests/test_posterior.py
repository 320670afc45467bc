"""The false-negative posterior: closed form, monotonicity under pooling, never NaN."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fne_dist.fne import FneConfig, fn_log_odds, fn_posterior, gaussians_from_stats, stats_of
from fne_dist.fne import reference as ref
from fne_dist.fne.rules import FNE
from fne_dist.fne.weights import AnchorSims, sampling_weights


def _g(pos: list[float], neg: list[float], variance: str = "separate"):
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    return gaussians_from_stats(stats_of(t(pos), t(neg)), variance=variance)


def test_log_odds_equal_the_reference() -> None:
    """Invariant: the package's one log-odds (the expanded quadratic αs² + βs + γ) equals
    log π/(1−π) + log N(s; μ⁺, σ⁺²) − log N(s; μ⁻, σ⁻²) as ``fne.reference`` writes it, and
    P_fn equals the reference's Bayes rule (float64; float32 to its resolution), separate and
    pooled, at the paper's prior."""
    prior = 1e-4
    for variance in ("separate", "pooled"):
        g = _g([0.6, 0.7, 0.65, 0.5], [0.2, 0.35, 0.1, 0.3, 0.25], variance)
        g_ref = ref.Gaussians(*(float(x) for x in (g.mu_pos, g.var_pos, g.mu_neg, g.var_neg)), 4)
        s = torch.linspace(-1, 1, 201, dtype=torch.float64)
        expected = [
            math.log(prior / (1 - prior))
            + ref.log_normal(x, g_ref.mu_pos, g_ref.var_pos)
            - ref.log_normal(x, g_ref.mu_neg, g_ref.var_neg)
            for x in s.tolist()
        ]
        torch.testing.assert_close(
            fn_log_odds(s, g, prior), torch.tensor(expected, dtype=torch.float64)
        )
        p_ref = torch.tensor([ref.p_fn(x, g_ref, prior) for x in s.tolist()], dtype=torch.float64)
        torch.testing.assert_close(fn_posterior(s, g, prior), p_ref, rtol=1e-9, atol=1e-15)
        p32 = fn_posterior(s.float(), g, prior).double()
        torch.testing.assert_close(p32, p_ref, rtol=1e-4, atol=1e-6)


def test_separate_variance_is_not_monotone_but_pooled_is() -> None:
    """Invariant: with σ⁻ > σ⁺ near-duplicates (s ≫ μ⁺) get P_fn → 0 under "separate" (the
    faithful, non-monotone posterior), while "pooled" is non-decreasing in s everywhere."""
    pos, neg = [0.7, 0.72, 0.68, 0.71], [0.0, 0.5, -0.4, 0.3, 0.6]
    s = torch.linspace(-1, 1, 4001, dtype=torch.float64)
    sep = fn_posterior(s, _g(pos, neg), 0.01)
    assert sep[-1] < sep[torch.searchsorted(s, torch.tensor(0.7, dtype=torch.float64))]
    pooled = fn_posterior(s, _g(pos, neg, "pooled"), 0.01)
    assert (pooled[1:] >= pooled[:-1]).all()
    pooled32 = fn_posterior(s.float(), _g(pos, neg, "pooled"), 0.01)
    assert (pooled32[1:] >= pooled32[:-1]).all()  # also under float32 rounding


samples = st.lists(st.floats(-1, 1), max_size=6)


@settings(max_examples=200, deadline=None)
@given(
    pos=samples,
    neg=samples,
    prior=st.floats(1e-12, 0.999),
    variance=st.sampled_from(["separate", "pooled"]),
)
def test_posterior_and_weights_are_finite(pos, neg, prior, variance) -> None:
    """Invariant: for similarities in [−1, 1] and any statistics, including 0 or 1 samples and
    zero variance, P_fn ∈ [0, 1] and every weight is finite and ≥ 0 (float32 and float64)."""
    g = gaussians_from_stats(
        stats_of(torch.tensor(pos, dtype=torch.float64), torch.tensor(neg, dtype=torch.float64)),
        gate_size=0,
        variance=variance,
    )
    cfg = FneConfig(prior=prior)
    for dtype in (torch.float32, torch.float64):
        s = torch.linspace(-1, 1, 41, dtype=dtype)
        p = fn_posterior(s, g, prior)
        assert torch.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()
        sim = s.repeat(3, 1)
        mask = torch.zeros_like(sim, dtype=torch.bool)
        w = sampling_weights(AnchorSims.of(sim, s[[0, 20, 40]], mask), g, cfg, FNE).w_BN
        assert torch.isfinite(w).all() and (w >= 0).all() and (w <= 1).all()


def test_quadratic_log_odds_are_the_fused_addcmul_values() -> None:
    """Invariant: ``quadratic_log_odds`` (the output filled with β, then α·s added in place)
    gives bit for bit what ``torch.addcmul(β, s, α)`` (fused: one rounding) then ·s + γ gives,
    and γ + β·s pooled: float32, float64 and bfloat16, strided inputs, ±inf and NaN."""
    from fne_dist.fne.posterior import quadratic_log_odds

    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for scale in (1e-3, 1.0, 30.0):
            x = (torch.randn(5, 1031, generator=gen, dtype=torch.float64) * scale).to(dtype)
            x[0, :3] = torch.tensor([math.nan, math.inf, -math.inf], dtype=dtype)
            co = tuple(torch.randn((), generator=gen, dtype=torch.float64) * 40 for _ in "abc")
            alpha, beta, gamma = (c.to(dtype) for c in co)
            for s in (x, x[:, ::3], x.t()):
                want = torch.addcmul(beta, s, alpha).mul_(s).add_(gamma)
                torch.testing.assert_close(quadratic_log_odds(s, co, False), want, rtol=0,
                                           atol=0, equal_nan=True)  # fmt: skip
                want = torch.addcmul(gamma, s, beta)
                torch.testing.assert_close(quadratic_log_odds(s, co, True), want, rtol=0,
                                           atol=0, equal_nan=True)  # fmt: skip

"""``fne.posterior: cross_mixture``: the two-component candidate mixture (fne_dist/fne/mixture.py)
on synthetic mixtures with known parameters, its fast forms against plain loops, and its
wiring into the posterior and the training step."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from fne_dist.fne import FneConfig, SimilarityStats, gaussians_from_stats, stats_of
from fne_dist.fne import reference as ref
from fne_dist.fne.mixture import (
    MIN_VAR_SHARE,
    Mixture,
    em_fit,
    fit_histogram,
    histogram,
    mixture_from_sums,
    mixture_sums,
    refit,
    responsibilities,
)
from fne_dist.fne.posteriors import fit_of
from fne_dist.fne.posteriors.cross_mixture import MixtureFit

F64 = torch.float64


def _sample(prior: float, mu_f: float, sd_f: float, mu_t: float, sd_t: float, n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    is_fn = torch.rand(n, generator=gen, dtype=F64) < prior
    fn = mu_f + sd_f * torch.randn(n, generator=gen, dtype=F64)
    tn = mu_t + sd_t * torch.randn(n, generator=gen, dtype=F64)
    return torch.where(is_fn, fn, tn).clamp(-1.0, 1.0)


def _mix(prior, mu_f, var_f, mu_t, var_t) -> Mixture:
    return Mixture(*(torch.tensor(x, dtype=F64) for x in (prior, mu_f, var_f, mu_t, var_t)))


@pytest.mark.parametrize("prior", [0.1, 0.3])
def test_em_recovers_a_separated_mixture(prior: float) -> None:
    """Invariant: batch EM (unbinned) recovers π within 0.02 and both means within 0.02 on a
    mixture whose components are well separated (n = 20,000), from the moment start."""
    m = em_fit(_sample(prior, 0.6, 0.08, 0.0, 0.15, 20_000, seed=1))
    assert abs(float(m.prior) - prior) < 0.02, m
    assert abs(float(m.mu_fn) - 0.6) < 0.02 and abs(float(m.mu_tn)) < 0.02, m
    assert abs(math.sqrt(float(m.var_fn)) - 0.08) < 0.02, m


def test_histogram_fit_matches_the_unbinned_fit() -> None:
    """Invariant: EM on the 200-bin histogram (what training runs) gives the unbinned EM's
    parameters within 0.01 (binning moves a similarity by ≤ 0.005)."""
    sims = _sample(0.2, 0.5, 0.1, -0.05, 0.15, 20_000, seed=2)
    a = em_fit(sims, iters=300)
    b = fit_histogram(histogram(sims, torch.ones_like(sims, dtype=torch.bool)), None, 300)
    for x, y in zip(
        (a.prior, a.mu_fn, a.var_fn.sqrt(), a.mu_tn, a.var_tn.sqrt()),
        (b.prior, b.mu_fn, b.var_fn.sqrt(), b.mu_tn, b.var_tn.sqrt()),
        strict=True,
    ):
        assert abs(float(x) - float(y)) < 0.01, (a, b)


def test_training_fit_on_an_overlapping_mixture_is_close() -> None:
    """Invariant: the training fit (``refit``: 20 iterations from the moment start) on an
    overlapping mixture like the bench's (π 0.1, FN 0.25 ± 0.18, TN −0.02 ± 0.20) lands
    within 0.05 of π and 0.08 of μ_f: the documented regularised estimate, not a collapse."""
    sims = _sample(0.1, 0.25, 0.18, -0.02, 0.20, 50_000, seed=3)
    m = refit(histogram(sims, torch.ones_like(sims, dtype=torch.bool)))
    assert abs(float(m.prior) - 0.1) < 0.05 and abs(float(m.mu_fn) - 0.25) < 0.08, m


def test_histogram_equals_a_plain_count() -> None:
    """Invariant: each valid similarity adds 1 to bin floor((s + 1)·100), ends clamped."""
    gen = torch.Generator().manual_seed(4)
    sims = torch.rand(300, generator=gen, dtype=F64) * 2.2 - 1.1
    valid = torch.rand(300, generator=gen) < 0.7
    expected = torch.zeros(200, dtype=F64)
    for s, v in zip(sims.tolist(), valid.tolist(), strict=True):
        if v:
            expected[min(max(math.floor((s + 1.0) * 100.0), 0), 199)] += 1.0
    torch.testing.assert_close(histogram(sims, valid), expected)


def test_e_step_sums_equal_a_plain_loop() -> None:
    """Invariant: the six E-step sums equal a loop over samples with Bayes' rule written with
    ``fne.reference.log_normal`` (weights 0 drop a sample)."""
    m = _mix(0.15, 0.4, 0.02, 0.0, 0.04)
    gen = torch.Generator().manual_seed(5)
    sims = torch.rand(50, generator=gen, dtype=F64) * 2 - 1
    w = (torch.rand(50, generator=gen) < 0.8).to(F64) * 3.0
    out = [0.0] * 6
    for s, wt in zip(sims.tolist(), w.tolist(), strict=True):
        a = math.log(0.15) + ref.log_normal(s, 0.4, 0.02)
        b = math.log(0.85) + ref.log_normal(s, 0.0, 0.04)
        r = wt / (1.0 + math.exp(b - a))
        q = wt - r
        for k, v in enumerate((r, r * s, r * s * s, q, q * s, q * s * s)):
            out[k] += v
    torch.testing.assert_close(mixture_sums(sims, w, m), torch.tensor(out, dtype=F64))


def test_posterior_of_the_mixture_equals_the_reference_rule() -> None:
    """Invariant: Gaussians carrying a mixture give P_fn = the reference's Bayes rule with the
    mixture's π and components (the expanded quadratic of ``posterior`` = the plain form),
    whatever the configured prior and the positive Gaussians; the hard cut's μ⁺ is kept."""
    g = gaussians_from_stats(stats_of(0.8 + 0.01 * torch.randn(300), 0.3 + torch.zeros(300)))
    m = _mix(0.12, 0.3, 0.015, -0.05, 0.03)
    gm = replace(g, posterior=MixtureFit(m))
    s = torch.linspace(-1, 1, 41, dtype=F64)
    fast = fit_of(gm, 1e-4).log_odds_sim(s).sigmoid()
    plain = [ref.p_fn(x, ref.Gaussians(0.3, 0.015, -0.05, 0.03, 0), 0.12) for x in s.tolist()]
    torch.testing.assert_close(fast, torch.tensor(plain, dtype=F64))
    torch.testing.assert_close(responsibilities(s, m), fast)
    assert torch.equal(gm.mu_pos, g.mu_pos)


def test_m_step_orders_components_and_floors_variances() -> None:
    """Invariant: the component with the larger mean is the false-negative one (labels
    swapped on input come out swapped back), and no variance falls below MIN_VAR_SHARE of
    the pooled sample's (a spike cannot take a component to σ → 0)."""
    lo, hi = torch.tensor([0.1, 0.12], dtype=F64), torch.full((8,), 0.5, dtype=F64)
    sums = torch.stack([
        torch.tensor(2.0), lo.sum(), lo.square().sum(), torch.tensor(8.0), hi.sum(),
        hi.square().sum(),
    ]).to(F64)  # fmt: skip
    m = mixture_from_sums(sums)
    assert float(m.mu_fn) == pytest.approx(0.5) and float(m.prior) == pytest.approx(0.5)
    both = torch.cat([lo, hi])
    assert float(m.var_fn) >= MIN_VAR_SHARE * float(both.var(unbiased=False)) - 1e-12


def test_histograms_add_over_ranks_and_decay() -> None:
    """Invariant (distributed exactness): the histogram of a union is the sum of the parts'
    (what the all-reduce SUM computes), and SimilarityStats keeps H ← γ·H + h."""
    sims = _sample(0.2, 0.5, 0.1, 0.0, 0.2, 1000, seed=6)
    ones = torch.ones_like(sims, dtype=torch.bool)
    parts = histogram(sims[:400], ones[:400]) + histogram(sims[400:], ones[400:])
    torch.testing.assert_close(parts, histogram(sims, ones))
    stats = SimilarityStats()
    h1, h2 = histogram(sims[:500], ones[:500]), histogram(sims[500:], ones[500:])
    stats.add_posterior(h1, 0.9)
    stats.add_posterior(h2, 0.9)
    torch.testing.assert_close(stats.posterior_totals, 0.9 * h1 + h2)
    stats.new_epoch()  # not reset by the epoch: the decay forgets
    torch.testing.assert_close(stats.posterior_totals, 0.9 * h1 + h2)
    fresh = SimilarityStats()
    fresh.load_state_dict(stats.state_dict())
    assert torch.equal(fresh.posterior_totals, stats.posterior_totals)


def test_config_rules() -> None:
    """Invariant: the paper's posterior stays the library default; the mixture is one value of
    fne.posterior."""
    from fne_dist.config import config_from_dict

    assert FneConfig().posterior == "paper"
    cfg = config_from_dict({"fne": {"posterior": "cross_mixture"}})
    assert cfg.fne.posterior == "cross_mixture"


def test_forward_step_with_the_mixture() -> None:
    """Invariant: the training step with the cross_mixture posterior adds one histogram of the valid
    sampled candidates (mass ≤ B·r·2) and reports the fitted components, with π in (0, 0.5]."""
    from fne_dist.config import ModelConfig
    from fne_dist.memory import MomentumMemory
    from fne_dist.model import DualEncoder
    from fne_dist.momentum import make_momentum_copy
    from fne_dist.step import StepPosition, forward_step

    torch.manual_seed(0)
    model = DualEncoder(None, None, 6, 6, ModelConfig(embed_dim=4, head="linear"))
    momentum, memory = make_momentum_copy(model), MomentumMemory(20, 4, seed=0)
    stats = SimilarityStats()
    cfg = FneConfig(posterior="cross_mixture", stats_samples=3, gate_size=0)
    gen = torch.Generator().manual_seed(1)
    batch = {
        "img_feat": torch.randn(8, 6, generator=gen),
        "txt_feat": torch.randn(8, 6, generator=gen),
        "ids": torch.tensor([0, 0, 1, 2, 3, 4, 5, 6]),
        "groups": torch.tensor([0, 0, 0, 1, 1, 2, 2, -1]),
    }
    out = forward_step(model, momentum, batch, memory, stats, cfg, StepPosition(0, 0, False))
    assert stats.posterior_totals.numel() == 0  # the step changed nothing: the loop commits
    stats.add_step(out.stat_sums, cfg.mixture_decay)
    assert 0 < float(stats.posterior_totals.sum()) <= 8 * 3 * 2
    assert 0 < float(out.diagnostics["prior"]) <= 0.5
    assert {"mu_fn", "sigma_fn", "mu_tn", "sigma_tn"} <= set(out.diagnostics)
    assert torch.isfinite(out.loss)


def _m_step_per_component(totals: torch.Tensor, var_floor: float = 1e-8) -> Mixture:
    """The M-step one component at a time (the form before the 2×3 rows)."""
    from fne_dist.fne.mixture import MIX_PRIOR_MAX, MIX_PRIOR_MIN

    n_f, n_t = totals[0].clamp_min(1e-12), totals[3].clamp_min(1e-12)
    mu_f, mu_t = totals[1] / n_f, totals[4] / n_t
    n = (totals[0] + totals[3]).clamp_min(1e-12)
    mean = (totals[1] + totals[4]) / n
    total_var = ((totals[2] + totals[5]) / n - mean.square()).clamp_min(0.0)
    floor = (MIN_VAR_SHARE * total_var).clamp_min(var_floor)
    var_f = torch.maximum(totals[2] / n_f - mu_f.square(), floor)
    var_t = torch.maximum(totals[5] / n_t - mu_t.square(), floor)
    prior = (totals[0] / (totals[0] + totals[3]).clamp_min(1e-12)).clamp(
        MIX_PRIOR_MIN, MIX_PRIOR_MAX
    )
    swap = mu_f < mu_t
    return Mixture(
        torch.where(swap, 1.0 - prior, prior).clamp(MIX_PRIOR_MIN, MIX_PRIOR_MAX),
        torch.where(swap, mu_t, mu_f),
        torch.where(swap, var_t, var_f),
        torch.where(swap, mu_f, mu_t),
        torch.where(swap, var_f, var_t),
    )


def test_m_step_rows_equal_one_component_at_a_time_bit_for_bit() -> None:
    """Invariant: the M-step over the 2×3 rows of the sums gives the bits of the M-step
    written one component at a time, with and without the label swap, so every rank's
    per-step fit (and the default run's results) is unchanged."""
    gen = torch.Generator().manual_seed(4)
    for swap in (False, True):
        s = _sample(0.2, 0.4, 0.1, 0.0, 0.15, 500, seed=int(swap))
        m = _mix(0.1, 0.0 if swap else 0.5, 0.02, 0.5 if swap else 0.0, 0.03)
        w = torch.rand(500, generator=gen, dtype=F64)
        totals = mixture_sums(s, w, m)
        got, want = mixture_from_sums(totals), _m_step_per_component(totals)
        for field in ("prior", "mu_fn", "var_fn", "mu_tn", "var_tn"):
            assert torch.equal(getattr(got, field), getattr(want, field)), (swap, field)

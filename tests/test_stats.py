"""Sufficient statistics: exact merging, numpy agreement, the mutual-top-1 rule, policies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fne_dist.fne import (
    SimilarityStats,
    gaussians_from_stats,
    merge_stats,
    mutual_top1_stats,
    stats_of,
)


def test_merge_equals_union() -> None:
    """Invariant: merge(from(a), from(b)) equals from(a ∪ b) (rtol 1e-12), counts exact — what
    lets ranks all-reduce their statistics."""
    gen = torch.Generator().manual_seed(0)
    a_pos, b_pos = torch.rand(37, generator=gen), torch.rand(11, generator=gen)
    a_neg, b_neg = torch.rand(74, generator=gen), torch.rand(22, generator=gen)
    merged = merge_stats(stats_of(a_pos, a_neg), stats_of(b_pos, b_neg))
    union = stats_of(torch.cat([a_pos, b_pos]), torch.cat([a_neg, b_neg]))
    torch.testing.assert_close(merged, union, rtol=1e-12, atol=0)
    assert merged[0].item() == 48 and merged[3].item() == 96


def test_mean_and_variance_equal_numpy() -> None:
    """Invariant: μ and σ² are numpy's mean and var(ddof=1)."""
    gen = np.random.default_rng(1)
    pos, neg = gen.normal(0.6, 0.05, 300), gen.normal(0.2, 0.1, 600)
    g = gaussians_from_stats(stats_of(torch.tensor(pos), torch.tensor(neg)), gate_size=200)
    assert g.mu_pos.item() == pytest.approx(pos.mean(), rel=1e-12)
    assert g.var_pos.item() == pytest.approx(pos.var(ddof=1), rel=1e-9)
    assert g.mu_neg.item() == pytest.approx(neg.mean(), rel=1e-12)
    assert g.var_neg.item() == pytest.approx(neg.var(ddof=1), rel=1e-9)
    assert bool(g.gate_open) and bool(g.has_mu_pos)


def _plain_mutual_top1(a: list[list[float]], ids: list[int]) -> tuple[list[float], list[float]]:
    """The rule as the text states it, one pair at a time."""
    B = len(a)
    pos, neg = [], []
    for i in range(B):
        others = [j for j in range(B) if ids[j] != ids[i]]
        if not others:
            continue
        row = max(a[i][j] for j in others)
        col = max(a[j][i] for j in others)
        if a[i][i] >= row and a[i][i] >= col:  # ties go to the diagonal
            pos.append(a[i][i])
            neg += [row, col]
    return pos, neg


@pytest.mark.parametrize("seed", range(5))
def test_mutual_top1_equals_plain_rule(seed: int) -> None:
    """Invariant: the vectorised rule selects the pairs, positives and hardest negatives of the
    plain rule (same-id items excluded, ties to the diagonal)."""
    gen = torch.Generator().manual_seed(seed)
    B = 16
    a = torch.rand(B, B, generator=gen, dtype=torch.float64)
    a += torch.eye(B, dtype=torch.float64) * 0.5 * (seed % 3)  # more mutual pairs for some seeds
    a[3, 5] = a[3, 3]  # an exact tie: the diagonal must win
    a = a.round(decimals=2)  # many ties everywhere
    ids = torch.tensor([0, 0, 1, 2, 3, 3, 3, 4, 5, 6, 7, 8, 9, 10, 11, 11])
    pos, neg = _plain_mutual_top1(a.tolist(), ids.tolist())
    got = mutual_top1_stats(a, ids)
    want = stats_of(torch.tensor(pos, dtype=torch.float64), torch.tensor(neg, dtype=torch.float64))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_no_negatives_means_no_contribution() -> None:
    """Invariant: B = 1 or a batch of one id yields no samples (no −inf leaks into the sums)."""
    assert mutual_top1_stats(torch.ones(1, 1)).abs().sum().item() == 0
    assert mutual_top1_stats(torch.eye(3), torch.zeros(3, dtype=torch.long)).sum().item() == 0


def test_reset_and_carry_policies() -> None:
    """Invariant: "epoch" resets the sums; until a new positive, "zero" (the reference's running
    mean, the default) has μ⁺ = 0 (so the hard cut is s ≤ −margin), "skip" has no μ⁺ (no hard
    cut), "carry" keeps last epoch's μ⁺; "never" keeps accumulating."""
    batch = stats_of(torch.tensor([0.6, 0.8]), torch.tensor([0.1, 0.2, 0.3, 0.4]))
    zero, skip, carry, never = (
        SimilarityStats("epoch"),
        SimilarityStats("epoch", "skip"),
        SimilarityStats("epoch", "carry"),
        SimilarityStats("never"),
    )
    assert zero.no_pos_mu == "zero"
    for s in (zero, skip, carry, never):
        s.add(batch)
        s.new_epoch()
    g0 = zero.gaussians()
    assert bool(g0.has_mu_pos) and g0.mu_pos.item() == 0.0 and not bool(g0.gate_open)
    assert not bool(skip.gaussians().has_mu_pos)
    g = carry.gaussians()
    assert bool(g.has_mu_pos) and g.mu_pos.item() == pytest.approx(0.7)
    assert g.n_pos.item() == 0 and not bool(g.gate_open)
    assert never.gaussians().n_pos.item() == 2
    restored = SimilarityStats("epoch", "carry")
    restored.load_state_dict(carry.state_dict())
    assert restored.gaussians().mu_pos.item() == pytest.approx(0.7)


def test_gate_opens_strictly_above_gate_size() -> None:
    """Invariant: the Bayes part is used only once more than gate_size positives were seen."""
    pos = torch.full((200,), 0.5, dtype=torch.float64)
    assert not bool(gaussians_from_stats(stats_of(pos, pos), gate_size=200).gate_open)
    pos = torch.full((201,), 0.5, dtype=torch.float64)
    g = gaussians_from_stats(stats_of(pos, pos), gate_size=200)
    assert bool(g.gate_open) and g.var_pos.item() == 1e-8  # zero variance is floored


def test_pooled_variance_equals_numpy() -> None:
    """Invariant: "pooled" gives both Gaussians the pooled ddof=1 variance
    ((n⁺−1)σ⁺² + (n⁻−1)σ⁻²) / (n⁺ + n⁻ − 2), means unchanged."""
    gen = np.random.default_rng(2)
    pos, neg = gen.normal(0.6, 0.05, 30), gen.normal(0.2, 0.1, 60)
    g = gaussians_from_stats(stats_of(torch.tensor(pos), torch.tensor(neg)), variance="pooled")
    pooled = ((len(pos) - 1) * pos.var(ddof=1) + (len(neg) - 1) * neg.var(ddof=1)) / (
        len(pos) + len(neg) - 2
    )
    assert g.var_pos.item() == pytest.approx(pooled, rel=1e-9) == g.var_neg.item()
    assert g.mu_pos.item() == pytest.approx(pos.mean(), rel=1e-12)

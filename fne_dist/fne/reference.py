"""FNE's negative sampler on one screen: the paper's equations, one anchor at a time, in floats.

The definition the tests hold the fast forms (``weights``, ``sampling``, ``loss``) equal to;
nothing in training calls it. docs/algorithm.md §2-4; defaults are the paper's constants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Gaussians:
    mu_pos: float  # running mean of positive similarities; the reference starts it at 0
    var_pos: float
    mu_neg: float
    var_neg: float
    n_pos: int  # positive samples this epoch
    skip_cut: bool = False  # our "skip" policy: no hard cut before the epoch's first positive


def log_normal(s: float, mu: float, var: float) -> float:
    return -0.5 * ((s - mu) ** 2 / var + math.log(2 * math.pi * var))


def p_fn(s: float, g: Gaussians, prior: float = 1e-4) -> float:
    """Bayes' rule, π p⁺ / (π p⁺ + (1 − π) p⁻), with log-sum-exp."""
    a = math.log(prior) + log_normal(s, g.mu_pos, g.var_pos)
    b = math.log1p(-prior) + log_normal(s, g.mu_neg, g.var_neg)
    top = max(a, b)
    return math.exp(a - top) / (math.exp(a - top) + math.exp(b - top))


@dataclass(frozen=True)
class Constants:
    eps: float = 1e-3
    tau: float = 0.5
    margin: float = 0.2  # of the hard cut
    gate: int = 200
    prior: float = 1e-4
    hard_cut: bool = True


def weight(s: float, s_pos: float, masked: bool, g: Gaussians, c: Constants = Constants()) -> float:
    if masked:
        return 0.0  # a positive (same image id) is never a negative
    if c.hard_cut and not g.skip_cut and s <= g.mu_pos - c.margin:
        return 0.0  # hard cut: too easy to teach anything
    p = p_fn(s, g, c.prior)
    if g.n_pos > c.gate and p > c.eps:
        return math.exp(-c.tau * p)  # FN weight: likely false negatives down-weighted
    return math.exp(-c.tau * (s - s_pos) ** 2)  # kernel weight (cut-down strategy: P_fn ≤ ε)


def hinge(s: float, s_pos: float, masked: bool, margin: float = 0.2) -> float:
    return 0.0 if masked else max(0.0, margin + s - s_pos)


def draw(weights: list[float], hinges: list[float], u: float) -> int | None:
    """Inverse CDF: the first j with Σ_{≤j} w > u·Σw; all-zero weights: the hardest violator
    (first largest hinge), None if no hinge is positive."""
    total = sum(weights)
    if total > 0:
        target, acc = min(u * total, math.nextafter(total, 0.0)), 0.0
        for j, w in enumerate(weights):
            acc += w
            if acc > target:
                return j
        raise AssertionError("unreachable: the target is below the total")
    best = max(hinges)
    return hinges.index(best) if best > 0 else None

"""A plain-loop FNE sampler written from fne-algorithm.md §2-4, one anchor and one candidate at a
time with the math module: the second implementation the vectorised one is held equal to."""

from __future__ import annotations

import math


def log_normal(s: float, mu: float, var: float) -> float:
    return -0.5 * ((s - mu) ** 2 / var + math.log(2 * math.pi * var))


def posterior(
    s: float, mu_p: float, var_p: float, mu_n: float, var_n: float, prior: float
) -> float:
    """P_fn by Bayes' rule with log-sum-exp, exactly as the text states it."""
    a = math.log(prior) + log_normal(s, mu_p, var_p)
    b = math.log1p(-prior) + log_normal(s, mu_n, var_n)
    top = max(a, b)
    return math.exp(a - top) / (math.exp(a - top) + math.exp(b - top))


def gaussians(pos: list[float], neg: list[float], floor: float, pooled: bool) -> dict:
    """μ±, σ±² (ddof = 1, floored) from explicit samples."""

    def mean_var(xs: list[float]) -> tuple[float, float]:
        n = len(xs)
        mean = sum(xs) / n if n else 0.0
        var = sum((x - mean) ** 2 for x in xs) / (n - 1) if n > 1 else 0.0
        return mean, var

    mu_p, var_p = mean_var(pos)
    mu_n, var_n = mean_var(neg)
    if pooled:
        dof_p, dof_n = max(len(pos) - 1, 0), max(len(neg) - 1, 0)
        var_p = var_n = (dof_p * var_p + dof_n * var_n) / max(dof_p + dof_n, 1)
    return {
        "mu_p": mu_p,
        "var_p": max(var_p, floor),
        "mu_n": mu_n,
        "var_n": max(var_n, floor),
        "n_pos": len(pos),
    }


def weights_row(sims: list[float], pos_sim: float, masked: list[bool], g: dict, cfg) -> list[float]:
    """w_ij for one anchor (rule "fne")."""
    gate_open = g["n_pos"] > cfg.gate_size
    out = []
    for s, m in zip(sims, masked, strict=True):
        w = math.exp(-cfg.tau_kernel * (s - pos_sim) ** 2)
        p = posterior(s, g["mu_p"], g["var_p"], g["mu_n"], g["var_n"], cfg.prior)
        if gate_open and p > cfg.eps:
            w = math.exp(-cfg.tau_fn * p)
        if cfg.hard_cut and g["n_pos"] > 0 and s <= g["mu_p"] - cfg.cut_margin:
            w = 0.0
        if m:
            w = 0.0
        out.append(w)
    return out


def draw_row(weights: list[float], hinges: list[float], u: float) -> tuple[int | None, str]:
    """One draw by inverse CDF; fallback to the hardest violator; None if there is none."""
    total = sum(weights)
    if total > 0:
        target, acc = min(u * total, math.nextafter(total, 0.0)), 0.0
        for j, w in enumerate(weights):
            acc += w
            if acc > target:
                return j, "draw"
        raise AssertionError("unreachable: the target is below the total")
    best = max(hinges)
    if best > 0:
        return hinges.index(best), "fallback"
    return None, "no_violator"

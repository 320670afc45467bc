"""The mixture posteriors' true-negative density as J Gaussians (``fne.mixture_null_components``
J ≥ 2): one false-negative component against a J-component null, fitted to the same running
histogram as the two-component mixture of ``fne.mixture``.

Legend: H the histogram's bins (centres c_h, counts n_h), J null components, k = 0..J (J + 1
components in all), f the false-negative component (the one with the largest mean).

    x ~ π_f N(μ_f, σ_f²) + Σ_j π_j N(μ_j, σ_j²)                      (π_f + Σ_j π_j = 1)
    L(x) = log π_f + log N(x; μ_f, σ_f²) − log Σ_j π_j N(x; μ_j, σ_j²)   (= logit P_fn(x))

Why (docs/estimators.md, "the true negatives as two Gaussians"): the similarities of a learned
embedding's true negatives are skewed, with a long right tail, which one Gaussian cannot follow.
Measured
on the embedded emoji (group = emoji family; image-image similarity of one trained run's
train pairs): false negatives 0.93 ± 0.06 and 0.63 % of the candidates, true negatives
0.04 ± 0.19 with a 99th percentile of 0.65. With one null component the two-component fit spends
its "false negative" component on the negatives' tail (π 0.11, μ_f 0.35, σ_f 0.28): P_fn > 0.5
flags 6.8 % of the candidates and its precision is 0.09 (1,000 EM iterations instead of 20 do
not move it). With two (three) null components the tail has components of its own and the
false-negative one lands on the family mates (J = 2: π_f 0.014, μ_f 0.85; J = 3: 0.011, 0.88):
precision 0.44 (0.50) at recall 0.99 (0.98); the best threshold of the same similarity gets
0.53 at recall 0.96 (the tail holds true negatives as similar as family mates). On
bench/quality.py's generator (ten classes, 10 % false negatives) J = 2 gives precision 0.93 at
recall 0.58 (one null component: 0.69 / 0.84).

The fit: ``NULL_FIT_ITERS`` EM iterations per step on the histogram from a quantile start (null
component j at the histogram's (j + ½)/J quantile, the false-negative one at its
``FN_START_QUANTILE`` quantile with weight ``FN_START_PRIOR``, every variance the sample's),
a fixed count so there is no host sync, and the same input gives every rank the same fit.
Each variance is floored at ``NULL_MIN_VAR_SHARE`` of the sample's: a standard deviation of at
least a tenth of the sample's (≈ 2 bins on these data) keeps a component from collapsing onto
one bin (unbounded likelihood) while letting the false negatives' narrow bump (σ ≈ 0.06)
be a component. After the iterations the components are ordered by mean; the largest is f.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import host
from .mixture import MIX_PRIOR_MAX, MIX_PRIOR_MIN, Mixture, bin_centres, refit

NULL_FIT_ITERS = 100  # EM iterations per step (the small component converges in ~50-100)
FN_START_QUANTILE = 0.99  # the false-negative component starts in the upper tail
FN_START_PRIOR = 0.1  # and with this weight (a start, not an estimate)
NULL_MIN_VAR_SHARE = 0.01  # each variance ≥ this share of the sample's


@dataclass(frozen=True)
class NullMixture:
    """The fitted J + 1 components, ordered by mean (float64): index −1 is the false-negative
    one, 0..J−1 the null. ``weights_K`` sums to 1."""

    weights_K: Tensor
    mu_K: Tensor
    var_K: Tensor
    tail: Tensor | None = None  # ``select_null_fit`` only: 1.0 where the J-component null was used

    @property
    def prior(self) -> Tensor:
        """π_f, the false negatives' share of the candidates."""
        return self.weights_K[-1]


def _log_normal(x: Tensor, mu: Tensor, var: Tensor) -> Tensor:
    return -0.5 * ((x - mu).square() / var + torch.log(2 * torch.pi * var))


def component_log_joint(x: Tensor, m: NullMixture) -> Tensor:
    """log π_k + log N(x; μ_k, σ_k²) for every element of x and component k (x's shape + (K,))."""
    x = x.to(torch.float64)[..., None]
    return torch.log(m.weights_K) + _log_normal(x, m.mu_K, m.var_K)


def null_log_odds(x: Tensor, m: NullMixture) -> Tensor:
    """L(x) of the module doc, element-wise (float64; log-sum-exp: no NaN in far tails)."""
    lj = component_log_joint(x, m)
    return lj[..., -1] - lj[..., :-1].logsumexp(-1)


def null_start(hist: Tensor, null_components: int) -> NullMixture:
    """The quantile start of the module doc (no host sync: quantiles by searchsorted)."""
    centres = bin_centres(hist.shape[0], hist.device)
    w = hist.to(torch.float64)
    n = w.sum().clamp_min(1e-12)
    cdf = torch.cumsum(w, 0) / n
    qs = [(j + 0.5) / null_components for j in range(null_components)] + [FN_START_QUANTILE]
    q = torch.tensor(qs, dtype=torch.float64, device=hist.device)
    mu = centres[torch.searchsorted(cdf, q).clamp(max=hist.shape[0] - 1)]
    mean = (w * centres).sum() / n
    var = ((w * (centres - mean).square()).sum() / n).clamp_min(1e-4)
    weights = torch.full_like(q, (1.0 - FN_START_PRIOR) / null_components)
    weights[-1] = FN_START_PRIOR
    return NullMixture(weights, mu, var.expand(len(qs)).clone())


def null_em_step(centres: Tensor, counts: Tensor, m: NullMixture, var_min: Tensor) -> NullMixture:
    """One E- and M-step on weighted samples (bin centres with counts)."""
    lj = component_log_joint(centres, m)
    r = (lj - lj.logsumexp(-1, keepdim=True)).exp() * counts[:, None]
    n_K = r.sum(0).clamp_min(1e-12)
    mu = (r * centres[:, None]).sum(0) / n_K
    var = torch.maximum((r * (centres[:, None] - mu).square()).sum(0) / n_K, var_min)
    weights = (n_K / n_K.sum()).clamp(MIX_PRIOR_MIN, 1.0)
    return NullMixture(weights / weights.sum(), mu, var)


def em_iterations(
    centres: Tensor,
    counts: Tensor,
    weights: Tensor,
    mu: Tensor,
    var: Tensor,
    var_min: Tensor,
    iters: int,
    prior_min: float = MIX_PRIOR_MIN,
) -> tuple[Tensor, Tensor, Tensor]:
    """``iters`` of ``null_em_step`` on (weights, μ, σ²) (``prior_min``: ``MIX_PRIOR_MIN``, an
    argument because TorchScript reads no module globals), in fewer allocations: the same float64
    operations on every element in the same order, so the same bits (tests/test_null_mixture.py
    compares the two). The step's log-sum-exp is spelled out as torch's own (max, exp of the
    difference, sum, log, plus max) without its guard for an infinite max: every log-joint here
    is finite (weights ≥ ``MIX_PRIOR_MIN``, variances ≥ ``var_min`` > 0).

    Why: a fit is ~30 small-tensor calls per iteration, 100 iterations per training step, and
    each call's dispatch costs more than its arithmetic on a (bins × components) tensor; on
    the host ``fit_null_mixture`` runs this function compiled by TorchScript (``_host_em``),
    whose interpreter dispatches the same ATen kernels for about half the cost."""
    x = centres[:, None]
    c = counts[:, None]
    two_pi = 2 * math.pi
    for _ in range(iters):
        lj = x - mu  # log π_k + log N(x; μ_k, σ_k²), as component_log_joint
        lj.square_().div_(var).add_(torch.log(two_pi * var)).mul_(-0.5).add_(torch.log(weights))
        top = lj.amax(-1, keepdim=True)
        lse = (lj - top).exp_().sum(-1, keepdim=True).log_().add_(top)
        r = lj.sub_(lse).exp_().mul_(c)  # responsibilities × counts
        n_K = r.sum(0).clamp_min_(1e-12)
        mu = (r * x).sum(0).div_(n_K)
        var = torch.maximum((x - mu).square_().mul_(r).sum(0).div_(n_K), var_min)
        w = (n_K / n_K.sum()).clamp_(prior_min, 1.0)
        weights = w.div_(w.sum())
    return weights, mu, var


_SCRIPTED: list = []  # em_iterations compiled by TorchScript, on first use


def _host_em() -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
    """``em_iterations`` under TorchScript, for host tensors: the same ATen kernels (TorchScript
    fuses no CPU kernels unless told to: ``torch._C._jit_can_fuse_on_cpu()`` is False by
    default, and a process that turned it on gets the eager loop), dispatched for about half
    the cost of eager Python; compiled once per process (~0.1 s)."""
    if torch._C._jit_can_fuse_on_cpu():
        return em_iterations
    if not _SCRIPTED:
        with warnings.catch_warnings():  # torch 2.x marks torch.jit.script deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                _SCRIPTED.append(torch.jit.script(em_iterations))
            except Exception:  # a torch without TorchScript: the same numbers, eagerly
                _SCRIPTED.append(em_iterations)
    return _SCRIPTED[0]


def fit_null_mixture(
    hist: Tensor, null_components: int, iters: int = NULL_FIT_ITERS, var_floor: float = 1e-8
) -> NullMixture:
    """``iters`` EM iterations (``null_em_step``) on the histogram from ``null_start``, the
    components then ordered by mean and π_f clamped to the two-component mixture's range. No
    host sync."""
    centres = bin_centres(hist.shape[0], hist.device)
    counts = hist.to(torch.float64)
    m = null_start(counts, null_components)
    var_min = (NULL_MIN_VAR_SHARE * m.var_K[0]).clamp_min(var_floor)
    em = _host_em() if host.on_host(counts) else em_iterations
    fitted = em(centres, counts, m.weights_K, m.mu_K, m.var_K, var_min, iters, MIX_PRIOR_MIN)
    m = NullMixture(*fitted)
    order = m.mu_K.argsort()
    weights = m.weights_K[order]
    prior = weights[-1].clamp(MIX_PRIOR_MIN, MIX_PRIOR_MAX)
    null = weights[:-1] * (1.0 - prior) / weights[:-1].sum().clamp_min(1e-12)
    return NullMixture(torch.cat([null, prior[None]]), m.mu_K[order], m.var_K[order])


def is_tail(hist: Tensor) -> Tensor:
    """True (0-dim bool, no host sync) where the one-null fit's false-negative component is
    wider than its null: σ_f > σ_t of ``fit_null_mixture(hist, 1)`` (``fne.mixture_null_auto``).

    Why: false negatives are a cluster (a family's near-duplicates, a class's members), so
    their component stands out of the negatives narrower than them; a "false-negative"
    component wider than the null is the null's own skewed tail (measured on the last
    histograms of ``fne_sum_intra`` runs: emoji σ_f / σ_t 1.9, the tail; the synthetic ten
    classes 0.83, a bump)."""
    one = fit_null_mixture(hist, 1)
    return one.var_K[-1] > one.var_K[0]


def padded(m: Mixture, null_components: int) -> NullMixture:
    """The two-component mixture as a NullMixture with J null slots: the first holds the
    true-negative component, the others weight 0 (log 0 = −∞ drops out of every
    log-sum-exp), so its log-odds are the two-component ones."""
    pad = null_components - 1
    zero = torch.zeros((), dtype=torch.float64, device=m.prior.device)
    weights = torch.stack([1.0 - m.prior, *[zero] * pad, m.prior])
    mu = torch.stack([m.mu_tn, *[m.mu_tn] * pad, m.mu_fn])
    var = torch.stack([m.var_tn, *[m.var_tn] * pad, m.var_fn])
    return NullMixture(weights, mu, var)


LATCH_STATE = 2
"""Floats of ``fne.mixture_null_auto``'s carried state: (latched 0/1, tail steps in a row)."""


def latch_step(state: Tensor, tail: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """One step of ``fne.mixture_null_latch``: (use the J-component null?, the next state).

    ``state`` = (latched, run): run counts the steps in a row whose ``is_tail`` held; once it
    reaches ``steps`` the choice latches to the J-component null for the rest of the run
    (``steps`` = 0: never, the per-step choice). Before that each step uses its own ``tail``.

    Why one way: a skewed null is a property of the negatives, and it stays; what changes late
    in a long run is that the family mates' bump tightens and grows, so the one-null fit's
    "false-negative" component takes bump and tail together and is no longer wider than the
    null, and the per-step test hands the step to the two-component fit, whose component
    is the tail again (20-epoch emoji run: per-step precision 0.30-0.48 in epochs 15-19, the
    J = 3 fit 0.53-0.73 there). A data set whose null has no tail (the synthetic ten classes)
    never shows ``steps`` tail steps in a row, so it keeps the two-component fit.
    Pure and elementwise: no host sync, and every rank (same histogram, same state) agrees."""
    state = state.to(torch.float64)
    was = state[0] > 0
    # a latched run's count stays where it latched: the state then no longer depends on the
    # step's tail test, which is what lets a host run skip that fit (``auto_null_fit``)
    run = torch.where(was, state[1], torch.where(tail, state[1] + 1.0, torch.zeros_like(state[1])))
    latched = was | ((run >= steps) & (steps > 0))
    return tail | latched, torch.stack([latched.to(torch.float64), run])


def select_null_fit(
    hist: Tensor, null_components: int, var_floor: float = 1e-8, use_many: Tensor | None = None
) -> NullMixture:
    """``fne.mixture_null_auto``: the J-component null fit where ``use_many`` (default: this
    step's ``is_tail``; with the latch, ``latch_step``'s choice) holds, the two-component fit
    (``refit``, as with J = 1) elsewhere: by ``torch.where`` (no host sync, every rank the
    same)."""
    tail = is_tail(hist) if use_many is None else use_many
    if host.on_host(hist):
        # a host read is free on the CPU, so only the chosen fit is computed (each is ~100 EM
        # iterations of small ops: 3-9 ms a step); the values are the torch.where's below
        m = (
            fit_null_mixture(hist, null_components, var_floor=var_floor)
            if bool(tail)
            else padded(refit(hist, var_floor), null_components)
        )
        return NullMixture(m.weights_K, m.mu_K, m.var_K, tail=tail.to(torch.float64))
    many = fit_null_mixture(hist, null_components, var_floor=var_floor)
    two = padded(refit(hist, var_floor), null_components)
    pick = [torch.where(tail, a, b) for a, b in zip(
        (many.weights_K, many.mu_K, many.var_K), (two.weights_K, two.mu_K, two.var_K), strict=True
    )]  # fmt: skip
    return NullMixture(*pick, tail=tail.to(torch.float64))


def auto_null_fit(
    hist: Tensor, null_components: int, var_floor: float, state: Tensor | None, latch_steps: int
) -> tuple[NullMixture, Tensor | None]:
    """``fne.mixture_null_auto``'s fit and its next carried state: the per-step choice without a
    state (a caller that keeps none), else ``latch_step`` on ``state``."""
    if state is None:
        return select_null_fit(hist, null_components, var_floor), None
    if host.on_host(hist) and bool(state[0] > 0):
        # latched: the choice and the next state no longer read the tail test (``latch_step``)
        tail = torch.ones((), dtype=torch.bool, device=hist.device)
    else:
        tail = is_tail(hist)
    use_many, nxt = latch_step(state, tail, latch_steps)
    return select_null_fit(hist, null_components, var_floor, use_many), nxt


def null_diagnostics(m: NullMixture, suffix: str = "") -> dict[str, Tensor]:
    """The false-negative component and the null's mean and sd (0-dim tensors, for the logs);
    with ``fne.mixture_null_auto`` also ``frac_tail``, 1 on steps that used the J-component
    null (its epoch mean is the share of such steps)."""
    null_w = m.weights_K[:-1] / m.weights_K[:-1].sum()
    null_mu = (null_w * m.mu_K[:-1]).sum()
    null_var = (null_w * (m.var_K[:-1] + m.mu_K[:-1].square())).sum() - null_mu.square()
    out = {f"prior{suffix}": m.prior, f"mu_fn{suffix}": m.mu_K[-1],
           f"sigma_fn{suffix}": m.var_K[-1].sqrt(), f"mu_tn{suffix}": null_mu,
           f"sigma_tn{suffix}": null_var.clamp_min(0.0).sqrt()}  # fmt: skip
    if m.tail is not None:
        out[f"frac_tail{suffix}"] = m.tail
    return out

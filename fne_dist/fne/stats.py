"""Mergeable sufficient statistics of positive / negative similarities (docs/algorithm.md §3).

Legend: B anchors of one batch (or G for the gathered global batch).

The running Gaussians N(μ⁺, σ⁺²) and N(μ⁻, σ⁻²) are kept as six float64 sums
``(n⁺, Σs⁺, Σs⁺², n⁻, Σs⁻, Σs⁻²)``: adding two of them is exactly the statistics of the union, so
ranks can all-reduce them (SUM) and every rank derives the same Gaussians and gate. The reference
code uses an approximate online variance; the sums are exact (up to float64 rounding).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .posteriors import PosteriorFit

NoPosMu = Literal["zero", "skip", "carry"]
NO_POS_MU: tuple[str, ...] = get_args(NoPosMu)
"""What μ⁺ is before this epoch's first positive sample (see ``SimilarityStats``)."""

STATS_FIELDS = ("n_pos", "sum_pos", "sumsq_pos", "n_neg", "sum_neg", "sumsq_neg")
POSTERIOR_STATE = 2  # floats of the posterior's carried state (null_mixture.LATCH_STATE)
_STATE_END = len(STATS_FIELDS) + POSTERIOR_STATE


def with_posterior_state(batch_stats: Tensor, posterior_state: Tensor) -> Tensor:
    """A step's sums as ``SimilarityStats.add_step`` takes them: ``batch_stats`` (the six
    Gaussian sums, then the posterior's sums) with the posterior's next state between. One
    vector, so every caller that commits a step's sums commits the state with them."""
    return torch.cat([batch_stats[:6], posterior_state.to(batch_stats), batch_stats[6:]])


def empty_stats(device: torch.device | str | None = None) -> Tensor:
    """Statistics of no samples: a float64 vector of 6 zeros."""
    return torch.zeros(len(STATS_FIELDS), dtype=torch.float64, device=device)


def stats_of(pos: Tensor, neg: Tensor) -> Tensor:
    """Statistics of explicit positive and negative samples (1-D tensors of any length)."""
    pos, neg = pos.detach().to(torch.float64), neg.detach().to(torch.float64)
    n_pos = torch.tensor(float(pos.numel()), dtype=torch.float64, device=pos.device)
    n_neg = torch.tensor(float(neg.numel()), dtype=torch.float64, device=pos.device)
    return torch.stack([n_pos, pos.sum(), pos.square().sum(), n_neg, neg.sum(), neg.square().sum()])


def merge_stats(a: Tensor, b: Tensor) -> Tensor:
    """Statistics of the union of two sample sets (what an all-reduce SUM computes)."""
    return a + b


def mutual_top1_stats(sim_BB: Tensor, ids_B: Tensor | None = None) -> Tensor:
    """Statistics contributed by one in-batch online-vs-online matrix A = V·Tᵀ.

    Only pairs that are each other's top-1 in both directions contribute: one positive sample
    A_ii and two negatives, the hardest other caption of image i (max_j A_ij) and the hardest
    other image of caption i (max_j A_ji). Items sharing the anchor's id (other captions of the
    same image) are neither negatives nor competitors for top-1; ties go to the diagonal. A pair
    with no valid negative in the batch (B = 1, or all one id) contributes nothing.

    sim_BB: rows = images, columns = captions of the same batch; ids_B: image id per row.
    Returns a float64 vector of 6 sums, on sim_BB's device, without any host sync.
    """
    assert sim_BB.ndim == 2 and sim_BB.shape[0] == sim_BB.shape[1], sim_BB.shape
    a_BB = sim_BB.detach().to(torch.float64)
    B = a_BB.shape[0]
    eye_BB = torch.eye(B, dtype=torch.bool, device=a_BB.device)
    same_BB = eye_BB if ids_B is None else (ids_B[:, None] == ids_B[None, :]) | eye_BB
    neg_BB = a_BB.masked_fill(same_BB, -math.inf)
    hard_row_B = neg_BB.amax(dim=1)  # hardest other caption of image i
    hard_col_B = neg_BB.amax(dim=0)  # hardest other image of caption i
    diag_B = a_BB.diagonal()
    # ">=" is the tie rule: the diagonal wins a tie, so a duplicate does not hide a good pair.
    sel_B = (diag_B >= hard_row_B) & (diag_B >= hard_col_B) & torch.isfinite(hard_row_B)
    sel_B &= torch.isfinite(hard_col_B)
    w_B = sel_B.to(torch.float64)
    # where(), not multiplication: -inf * 0 would be NaN for rows without negatives.
    hr_B = torch.where(sel_B, hard_row_B, 0.0)
    hc_B = torch.where(sel_B, hard_col_B, 0.0)
    n = w_B.sum()
    return torch.stack(
        [
            n,
            (diag_B * w_B).sum(),
            (diag_B.square() * w_B).sum(),
            2.0 * n,
            hr_B.sum() + hc_B.sum(),
            hr_B.square().sum() + hc_B.square().sum(),
        ]
    )


@dataclass(frozen=True)
class Gaussians:
    """The two fitted similarity distributions and the gate, as 0-dim tensors (no host sync).

    ``has_mu_pos`` is false until a μ⁺ exists (a positive sample this epoch, a carried μ⁺, or
    the reference's running mean that starts at 0): the hard cut is skipped then.
    ``gate_open`` is n⁺ > gate_size: the Bayes part is used. With ``variance == "pooled"``,
    var_pos and var_neg hold the same pooled variance. ``posterior``: this step's fitted
    false-negative posterior (``fne.posteriors``); None: the paper's, from these Gaussians and
    the configured prior.
    """

    mu_pos: Tensor
    var_pos: Tensor
    mu_neg: Tensor
    var_neg: Tensor
    n_pos: Tensor
    has_mu_pos: Tensor
    gate_open: Tensor
    variance: str = "separate"
    posterior: PosteriorFit | None = None


def _mean_var(n: Tensor, s: Tensor, ss: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unfloored ddof=1 variance from sums (the variance is 0 for n <= 1)."""
    mean = s / n.clamp_min(1.0)
    var = (ss - n * mean.square()).clamp_min(0.0) / (n - 1.0).clamp_min(1.0)
    return mean, var


def gaussians_from_stats(
    stats: Tensor,
    gate_size: int = 200,
    var_floor: float = 1e-8,
    variance: str = "separate",
    carried_mu_pos: Tensor | None = None,
) -> Gaussians:
    """Derive μ±, σ±² (ddof = 1, floored), the gate and "is there a μ⁺" from 6 sums."""
    if variance not in ("separate", "pooled"):
        raise ValueError(f"variance must be 'separate' or 'pooled', got {variance!r}")
    n_pos, n_neg = stats[0], stats[3]
    mu_pos, var_pos = _mean_var(n_pos, stats[1], stats[2])
    mu_neg, var_neg = _mean_var(n_neg, stats[4], stats[5])
    if variance == "pooled":
        dof_pos, dof_neg = (n_pos - 1.0).clamp_min(0.0), (n_neg - 1.0).clamp_min(0.0)
        pooled = (dof_pos * var_pos + dof_neg * var_neg) / (dof_pos + dof_neg).clamp_min(1.0)
        var_pos = var_neg = pooled
    has_pos = n_pos > 0
    if carried_mu_pos is not None:
        mu_pos = torch.where(has_pos, mu_pos, carried_mu_pos.to(mu_pos))
        has_pos = has_pos | torch.isfinite(carried_mu_pos)
    return Gaussians(
        mu_pos=mu_pos,
        var_pos=var_pos.clamp_min(var_floor),
        mu_neg=mu_neg,
        var_neg=var_neg.clamp_min(var_floor),
        n_pos=n_pos,
        has_mu_pos=has_pos,
        gate_open=n_pos > gate_size,
        variance=variance,
    )


class SimilarityStats:
    """Running statistics since the start of the epoch, with the reset and "no μ⁺ yet" policies.

    Holds no rank knowledge: the training loop all-reduces a batch's statistics before ``add``.
    reset: "epoch" (reference: fresh estimates each (virtual) epoch) or "never".
    no_pos_mu, before this epoch's first positive sample: "zero" (the reference: its running
    mean starts at 0, so the hard cut is s ≤ −margin), "skip" (no hard cut) or "carry" (the
    last epoch's μ⁺; skip before any).
    """

    def __init__(
        self,
        reset: str = "epoch",
        no_pos_mu: str = "zero",
        device: torch.device | str | None = None,
    ) -> None:
        if reset not in ("epoch", "never"):
            raise ValueError(f"reset must be 'epoch' or 'never', got {reset!r}")
        if no_pos_mu not in NO_POS_MU:
            raise ValueError(f"no_pos_mu must be one of {NO_POS_MU}, got {no_pos_mu!r}")
        self.reset_policy = reset
        self.no_pos_mu = no_pos_mu
        self.totals = empty_stats(device)
        self.carried_mu_pos = torch.tensor(math.nan, dtype=torch.float64, device=device)
        # The posterior's running sums (``fne.posteriors``; the mixtures' decayed histogram of
        # candidate similarities, sized by its first add; none for the paper's). Never reset:
        # the decay forgets.
        self.posterior_totals = torch.zeros(0, dtype=torch.float64, device=device)
        # The posterior's carried state (``Posterior.fit``'s ``state``: fne.mixture_null_latch's
        # latch), replaced, not summed, by each committed step
        self.posterior_state = torch.zeros(POSTERIOR_STATE, dtype=torch.float64, device=device)

    def add(self, batch_stats: Tensor) -> None:
        self.totals = merge_stats(self.totals, batch_stats.to(self.totals))

    def add_step(self, step_sums: Tensor, decay: float) -> None:
        """Commit one step's (all-reduced) sums, laid out as ``step_sums``'s: the six Gaussian
        sums, the posterior's next state (it replaces the kept one), then the posterior's sums
        (``decay``: their forgetting factor)."""
        self.add(step_sums[:6])
        self.posterior_state = step_sums[6:_STATE_END].to(self.posterior_state)
        self.add_posterior(step_sums[_STATE_END:], decay)

    def with_step(self, step_sums: Tensor, decay: float) -> SimilarityStats:
        """What ``add_step`` would make of these statistics, as a new object; ``self`` is left
        as it is until the step is committed (every update builds new tensors, so the shallow
        copy shares nothing it changes: nothing is copied to be taken back)."""
        seen = copy.copy(self)
        seen.add_step(step_sums, decay)
        return seen

    def add_posterior(self, batch_sums: Tensor, decay: float) -> None:
        """T ← γ·T + one step's (all-reduced) posterior sums (nothing when it has none)."""
        if batch_sums.numel() == 0:
            return
        if self.posterior_totals.numel() == 0:
            self.posterior_totals = torch.zeros_like(batch_sums, dtype=torch.float64)
        self.posterior_totals = decay * self.posterior_totals + batch_sums.to(self.posterior_totals)

    def new_epoch(self) -> None:
        if self.reset_policy == "never":
            return
        n = self.totals[0]
        mu = self.totals[1] / n.clamp_min(1.0)
        self.carried_mu_pos = torch.where(n > 0, mu, self.carried_mu_pos)
        self.totals = torch.zeros_like(self.totals)

    def gaussians(
        self, gate_size: int = 200, var_floor: float = 1e-8, variance: str = "separate"
    ) -> Gaussians:
        carried = None
        if self.no_pos_mu == "carry":
            carried = self.carried_mu_pos
        elif self.no_pos_mu == "zero":
            carried = torch.zeros_like(self.carried_mu_pos)
        return gaussians_from_stats(self.totals, gate_size, var_floor, variance, carried)

    def state_dict(self) -> dict[str, Tensor]:
        return {
            "totals": self.totals.clone(),
            "carried_mu_pos": self.carried_mu_pos.clone(),
            # the key predates fne.posterior (the mixture's histogram): old checkpoints load
            "mix_totals": self.posterior_totals.clone(),
            "posterior_state": self.posterior_state.clone(),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.totals = state["totals"].to(self.totals)
        self.carried_mu_pos = state["carried_mu_pos"].to(self.carried_mu_pos)
        # a checkpoint's "em_totals" (the retired prior_mode: em) is ignored
        if "mix_totals" in state:  # checkpoints written before the mixtures have none
            self.posterior_totals = state["mix_totals"].to(self.posterior_totals)
        if "posterior_state" in state:  # older checkpoints: not latched, no tail steps counted
            self.posterior_state = state["posterior_state"].to(self.posterior_state)

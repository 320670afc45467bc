"""Hyper-parameters of the FNE loss and its baselines (defaults = the paper's reference values).

Kept here, next to the math, so a researcher can import the sampler without the rest of the
project (this module needs no pydantic). ``fne_dist.config`` embeds this dataclass as the ``fne``
section and validates YAML input against each field's type (a choice is a ``Literal``) and the
``ge``/``gt``/``le``/``lt`` bounds in its metadata; every int field is also bounded to int64
and every float to finite values there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from .estimators import StatsSource
from .posteriors import PosteriorName
from .stats import NoPosMu

Loss = Literal["fne", "window", "vse_pp", "vse0", "infonce", "fne_sum"]
LOSSES: tuple[str, ...] = get_args(Loss)


LIMITS = frozenset({"ge", "gt", "le", "lt"})


def setting(default: Any, doc: str, **limits: Any) -> Any:
    """A dataclass field whose metadata carries its documentation and valid range.

    ``limits`` are ``ge``/``gt``/``le``/``lt`` (bounds; a choice is the field's ``Literal``
    type); any other name is a typo that would silently leave the field unchecked, so it
    raises here.
    """
    unknown = set(limits) - LIMITS
    if unknown:
        raise TypeError(f"setting(): unknown limit(s) {sorted(unknown)}; use {sorted(LIMITS)}")
    return field(default=default, metadata={"doc": doc, **limits})


@dataclass
class FneConfig:
    """Loss selection and every constant of docs/algorithm.md §2-4 (one line of YAML each)."""

    loss: Loss = setting("fne", "training loss after warm-up")
    margin: float = setting(0.2, "triplet margin m", ge=0.0)
    prior: float = setting(1e-4, "prior π that a non-paired candidate is a match", gt=0.0, lt=1.0)
    eps: float = setting(
        1e-3, "ε: FN weight is used where P_fn > ε (cut-down strategy)", ge=0.0, lt=1.0
    )
    tau_kernel: float = setting(0.5, "τ of the kernel weight exp(-τ (s - s⁺)²)", ge=0.0)
    tau_fn: float = setting(0.5, "τ of the FN weight exp(-τ P_fn)", ge=0.0)
    hard_cut: bool = setting(True, "zero weight where s <= μ⁺ - hard_cut_margin")
    hard_cut_margin: float | None = setting(None, "margin of the hard cut (null = margin)", ge=0.0)
    gate_size: int = setting(200, "the Bayes part is used once n⁺ > gate_size this epoch", ge=0)
    variance: Literal["separate", "pooled"] = setting(
        "separate", "σ⁺ and σ⁻ separate (paper) or pooled"
    )
    var_floor: float = setting(1e-8, "floor of the variance estimates", gt=0.0)
    negatives: int = setting(
        1, "negatives per anchor and direction (k > 1: mean of k hinges)", ge=1
    )
    reduction: Literal["sample", "expected"] = setting(
        "sample",
        "fne and window: the loss of an anchor is the hinge of one negative drawn with weights "
        "w_j (sample, the paper) or the expectation of that hinge under the same weights, "
        "Σ_j w_j/Σw · hinge_j (expected: same target, no sampling noise in the gradient); rows "
        "whose weights sum to 0 keep the fallback either way",
    )
    sum_weight: Literal["one_minus", "exp", "hard"] = setting(
        "one_minus",
        "fne_sum: each candidate's weight in the sum of hinges, from its P_fn: 1 − P_fn "
        "(one_minus, the probability of a true negative), exp(−τ_fn P_fn) (exp) or "
        "1[P_fn <= eps] (hard: drop the flagged candidates); 1 while the gate is closed",
    )
    sum_kernel: bool = setting(
        False, "fne_sum: also multiply each weight by the kernel exp(-τ_kernel (s - s⁺)²)"
    )
    sum_cut: bool = setting(
        False, "fne_sum: also zero the weight where s <= μ⁺ - hard_cut_margin (the hard cut)"
    )
    sum_scope: Literal["candidates", "batch"] = setting(
        "candidates",
        "fne_sum: sum over [gathered batch ; memory] (candidates) or the gathered batch only "
        "(batch, vse0's candidates)",
    )
    stats_reset: Literal["epoch", "never"] = setting(
        "epoch", "reset the statistics every epoch or never"
    )
    no_pos_mu: NoPosMu = setting(
        "zero",
        "μ⁺ before this epoch's first positive: zero (the reference's running mean starts at 0: "
        "cut at s <= -hard_cut_margin), skip (no hard cut) or carry (last epoch's μ⁺)",
    )
    stats_scope: Literal["local", "global"] = setting(
        "local",
        "mutual-top-1 rule per rank (online B×B, reference meaning) or over the gathered G×G "
        "momentum matrix",
    )
    stats_source: StatsSource = setting(
        "mutual_top1",
        "what the Gaussians are fitted to: mutual_top1 (the paper: positives of mutually-top-1 "
        "pairs, negatives their hardest in-batch negative) or all_pairs (positives every known "
        "pair, negatives a random sample of [batch ; memory]; fne.estimators)",
    )
    posterior: PosteriorName = setting(
        "paper",
        "the false-negative posterior P_fn (fne.posteriors): paper (the positive-pair Gaussian "
        "against the negative one of the cross-modal similarity, fixed prior fne.prior), "
        "cross_mixture (a two-component mixture of sampled candidates' cross-modal "
        "similarities, π and both components fitted by online EM) or intra_mixture (the same "
        "mixture of the anchor's and candidate's image-image similarity)",
    )
    mixture_decay: float = setting(
        0.98,
        "posterior cross_mixture / intra_mixture: decay γ of the running histogram per step",
        gt=0.0,
        lt=1.0,
    )
    mixture_null_components: int = setting(
        1,
        "posterior cross_mixture / intra_mixture: Gaussian components of the true-negative "
        "density (1: the two-component mixture; 2: the negatives' skewed tail gets a component "
        "of its own, so the false-negative one fits the false negatives; fne.null_mixture)",
        ge=1,
        le=3,
    )
    mixture_null_auto: bool = setting(
        False,
        "posterior cross_mixture / intra_mixture with fne.mixture_null_components >= 2: use the "
        "J-component null only on steps where the one-null fit's false-negative component is "
        "wider than its null (the null's skewed tail, not a cluster), else the two-component "
        "mixture (fne.null_mixture.select_null_fit)",
    )
    mixture_null_latch: int = setting(
        50,
        "fne.mixture_null_auto: after this many training steps in a row that chose the "
        "J-component null (warm-up not counted), keep it for the rest of the run (a state in the "
        "checkpointed statistics; fne.null_mixture.latch_step); 0: decide every step afresh",
        ge=0,
    )
    fallback: Literal["hardest", "unflagged"] = setting(
        "hardest",
        "fne sampler, a row whose window weights sum to 0: draw the hardest violator (hardest, "
        "the paper) or the hardest one with P_fn <= eps (unflagged: the dense sampler then "
        "computes every candidate's log-odds)",
    )
    fallback_scope: Literal["candidates", "batch"] = setting(
        "candidates",
        "fne and window, a row whose window weights sum to 0: its fallback violator is sought "
        "over every candidate (candidates, the paper: [batch ; memory]) or over the gathered "
        "batch block only (batch: the in-batch VSE++ negative; a row with no in-batch "
        "violator contributes 0)",
    )
    stats_samples: int = setting(
        4,
        "random candidates per anchor and direction for all_pairs and the mixture posteriors",
        ge=1,
    )
    mask_groups: bool = setting(False, "oracle: mask candidates sharing the anchor's group label")
    vse_pp_memory: bool = setting(True, "vse_pp takes its hardest negative over [batch ; memory]")
    temperature: float = setting(0.07, "infonce: initial temperature (learnable)", gt=0.0)
    temperature_min: float = setting(0.001, "infonce: temperature clamp, lower end", gt=0.0)
    temperature_max: float = setting(0.5, "infonce: temperature clamp, upper end", gt=0.0)
    block_rows: int = setting(
        256, "anchors per similarity matmul of the sampler (bounds B×N memory)", ge=1
    )
    compile: bool = setting(
        False,
        "fuse the dense sampler with torch.compile on accelerators (CPU runs always use the "
        "eager window sampler, which is faster there)",
    )
    chunk_rows: int = setting(
        8,
        "anchors per element-wise chunk of the dense sampler (cache-sized); more while a "
        "chunk stays under 2^19 candidate pairs (short rows)",
        ge=1,
    )
    window_chunk_rows: int = setting(
        32,
        "anchors per chunk of the CPU window sampler (a few passes over B×N, so larger chunks "
        "cost less per-op overhead)",
        ge=1,
    )

    @property
    def cut_margin(self) -> float:
        return self.margin if self.hard_cut_margin is None else self.hard_cut_margin

    def check(self) -> None:
        """Cross-field rules that a per-field range cannot express. Settings of the FNE sampler
        are ignored by the losses that have none (vse_pp, vse0, infonce), so switching
        ``fne.loss`` alone always gives a valid config."""
        if self.reduction == "expected" and self.negatives != 1 and self.loss in ("fne", "window"):
            raise ValueError(
                "fne.reduction=expected averages over every candidate: use it with fne.negatives=1"
            )
        if self.mixture_null_auto and self.mixture_null_components < 2:
            raise ValueError(
                "fne.mixture_null_auto chooses between the two-component mixture and "
                "fne.mixture_null_components >= 2 null components: set it to 2 or 3"
            )
        if self.temperature_min > self.temperature_max:
            raise ValueError(
                f"fne.temperature_min ({self.temperature_min}) > fne.temperature_max "
                f"({self.temperature_max})"
            )
        if not self.temperature_min <= self.temperature <= self.temperature_max:
            raise ValueError(
                f"fne.temperature={self.temperature} outside [temperature_min, temperature_max]"
            )


_TAIL = (
    "was retired with fne.fn_signal=tail (the per-anchor robust z: below intra_mixture in "
    "bench/quality.py on both data sets); use fne.posterior=intra_mixture"
)
RETIRED: dict[str, str] = {
    "fn_model": "was replaced by fne.posterior: fn_model=positive is posterior=paper; "
    "fn_model=mixture is posterior=cross_mixture (with fn_signal=cross) or intra_mixture "
    "(with fn_signal=intra)",
    "fn_signal": "was replaced by fne.posterior: cross is posterior=paper or cross_mixture, "
    "intra is intra_mixture; both, tail and tail_both were retired (within one sd of "
    "intra_mixture in bench/quality.py): use fne.posterior=intra_mixture",
    "prior_mode": "was retired (em: within one sd of fixed in bench/quality.py): the prior is "
    "fne.prior, or fitted from data by fne.posterior=cross_mixture or intra_mixture",
    "infonce_fn": "was retired (false-negative cancelling InfoNCE: within one sd of plain "
    "infonce on both bench sets): use fne.loss=infonce",
    "tail_z": _TAIL,
    "tail_slope": _TAIL,
}
"""Keys of the ``fne`` section that no longer exist, and what replaced each (one line)."""


def retired_key(section: dict[str, Any]) -> str | None:
    """The one-line error for the first retired key of an ``fne`` mapping, or None."""
    for key, why in RETIRED.items():
        if key in section:
            return f"fne.{key}={section[key]} {why}"
    return None

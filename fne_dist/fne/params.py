"""Hyper-parameters of the FNE loss and its baselines (defaults = the paper's reference values).

Kept here, next to the math, so a researcher can import the sampler without the rest of the
project (this module needs no pydantic). ``fne_dist.config`` embeds this dataclass as the ``fne``
section and turns the ``metadata`` of each field (``ge``/``gt``/``le``/``lt``/``choices``) into
a pydantic validator for YAML input; every int field is also bounded to int64 and every float
to finite values there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .estimators import PRIOR_MODES, STATS_SOURCES
from .fn_signal import FN_SIGNALS, INFONCE_FN
from .mixture import FN_MODELS
from .stats import NO_POS_MU

LOSSES = ("fne", "window", "vse_pp", "vse0", "infonce")
REDUCTIONS = ("sample", "expected")


LIMITS = frozenset({"ge", "gt", "le", "lt", "choices"})


def setting(default: Any, doc: str, **limits: Any) -> Any:
    """A dataclass field whose metadata carries its documentation and valid range.

    ``limits`` are ``ge``/``gt``/``le``/``lt`` (bounds) and ``choices`` (a tuple); any other
    name is a typo that would silently leave the field unchecked, so it raises here.
    """
    unknown = set(limits) - LIMITS
    if unknown:
        raise TypeError(f"setting(): unknown limit(s) {sorted(unknown)}; use {sorted(LIMITS)}")
    return field(default=default, metadata={"doc": doc, **limits})


@dataclass
class FneConfig:
    """Loss selection and every constant of docs/algorithm.md §2-4 (one line of YAML each)."""

    loss: str = setting("fne", "training loss after warm-up", choices=LOSSES)
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
    variance: str = setting(
        "separate", "σ⁺ and σ⁻ separate (paper) or pooled", choices=("separate", "pooled")
    )
    var_floor: float = setting(1e-8, "floor of the variance estimates", gt=0.0)
    negatives: int = setting(
        1, "negatives per anchor and direction (k > 1: mean of k hinges)", ge=1
    )
    reduction: str = setting(
        "sample",
        "fne and window: the loss of an anchor is the hinge of one negative drawn with weights "
        "w_j (sample, the paper) or the expectation of that hinge under the same weights, "
        "Σ_j w_j/Σw · hinge_j (expected: same target, no sampling noise in the gradient); rows "
        "whose weights sum to 0 keep the fallback either way",
        choices=REDUCTIONS,
    )
    stats_reset: str = setting(
        "epoch", "reset the statistics every epoch or never", choices=("epoch", "never")
    )
    no_pos_mu: str = setting(
        "zero",
        "μ⁺ before this epoch's first positive: zero (the reference's running mean starts at 0: "
        "cut at s <= -hard_cut_margin), skip (no hard cut) or carry (last epoch's μ⁺)",
        choices=NO_POS_MU,
    )
    stats_scope: str = setting(
        "local",
        "mutual-top-1 rule per rank (online B×B, reference meaning) or over the gathered G×G "
        "momentum matrix",
        choices=("local", "global"),
    )
    stats_source: str = setting(
        "mutual_top1",
        "what the Gaussians are fitted to: mutual_top1 (the paper: positives of mutually-top-1 "
        "pairs, negatives their hardest in-batch negative) or all_pairs (positives every known "
        "pair, negatives a random sample of [batch ; memory]; fne.estimators)",
        choices=STATS_SOURCES,
    )
    prior_mode: str = setting(
        "fixed",
        "π of the posterior: fixed (the paper: fne.prior) or em (the mixing weight of the "
        "candidate similarities, stepwise EM over each epoch; fne.estimators)",
        choices=PRIOR_MODES,
    )
    fn_model: str = setting(
        "positive",
        "what a false negative's similarity looks like in P_fn: positive (the paper: the "
        "positive-pair Gaussian, with fne.prior) or mixture (a two-component mixture of "
        "sampled candidate similarities fitted by online EM: π and both components from data; "
        "fne.mixture)",
        choices=FN_MODELS,
    )
    mixture_decay: float = setting(
        0.98, "fn_model mixture: decay γ of the running EM sums per step", gt=0.0, lt=1.0
    )
    fn_signal: str = setting(
        "cross",
        "fn_model mixture: what P_fn is computed from: cross (the direction's cross-modal "
        "similarity), intra (image-image similarity of anchor and candidate), both (naive "
        "Bayes product of the two likelihood ratios) or tail (the image-image similarity's "
        "robust z within the anchor's candidates; fne.tail) or tail_both (the larger of the "
        "image-image and text-text robust z), for the fne sampler and "
        "infonce_fn (fne.fn_signal)",
        choices=FN_SIGNALS,
    )
    fallback: str = setting(
        "hardest",
        "fne sampler, a row whose window weights sum to 0: draw the hardest violator (hardest, "
        "the paper) or the hardest one with P_fn <= eps (unflagged; needs fn_signal other than "
        "cross, whose dense sampler has the log-odds)",
        choices=("hardest", "unflagged"),
    )
    fallback_scope: str = setting(
        "candidates",
        "fne and window, a row whose window weights sum to 0: its fallback violator is sought "
        "over every candidate (candidates, the paper: [batch ; memory]) or over the gathered "
        "batch block only (batch: the in-batch VSE++ negative; a row with no in-batch "
        "violator contributes 0)",
        choices=("candidates", "batch"),
    )
    tail_z: float = setting(
        3.0, "fn_signal tail: z₀, the robust z at which P_fn = 0.5 (fne.tail)", gt=0.0
    )
    tail_slope: float = setting(
        4.0, "fn_signal tail: k, the logistic's slope in z, P_fn = sigmoid(k(z − z₀))", gt=0.0
    )
    infonce_fn: str = setting(
        "off",
        "loss infonce: each negative's denominator term times 1 − P_fn (downweight) or 0 "
        "(eliminate) where P_fn > eps; needs fn_model mixture (fne.fn_signal)",
        choices=INFONCE_FN,
    )
    stats_samples: int = setting(
        4, "random candidates per anchor and direction for all_pairs, em and mixture", ge=1
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
        8, "anchors per element-wise chunk of the dense sampler (cache-sized)", ge=1
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
        """Cross-field rules that a per-field range cannot express."""
        if self.fn_model == "mixture" and self.prior_mode != "fixed":
            raise ValueError(
                "fne.fn_model=mixture estimates π itself: use it with fne.prior_mode=fixed"
            )
        if self.infonce_fn != "off" and (self.loss, self.fn_model) != ("infonce", "mixture"):
            raise ValueError(
                f"fne.infonce_fn={self.infonce_fn} needs fne.loss=infonce and fne.fn_model=mixture"
            )
        if self.fallback != "hardest" and (self.fn_model, self.loss) != ("mixture", "fne"):
            raise ValueError(f"fne.fallback={self.fallback} needs fne.loss=fne, fn_model=mixture")
        if self.fallback != "hardest" and self.fn_signal == "cross":
            raise ValueError(f"fne.fallback={self.fallback} needs fne.fn_signal other than cross")
        if self.fallback_scope != "candidates" and self.loss not in ("fne", "window"):
            raise ValueError(
                f"fne.fallback_scope={self.fallback_scope} needs fne.loss=fne or window "
                f"(got {self.loss}: no fallback)"
            )
        if self.reduction != "sample" and self.loss not in ("fne", "window"):
            raise ValueError(
                f"fne.reduction={self.reduction} needs fne.loss=fne or window (got {self.loss})"
            )
        if self.reduction == "expected" and self.negatives != 1:
            raise ValueError(
                "fne.reduction=expected averages over every candidate: use it with fne.negatives=1"
            )
        if self.fn_signal != "cross" and self.fn_model != "mixture":
            raise ValueError(f"fne.fn_signal={self.fn_signal} needs fne.fn_model=mixture")
        if self.temperature_min > self.temperature_max:
            raise ValueError(
                f"fne.temperature_min ({self.temperature_min}) > fne.temperature_max "
                f"({self.temperature_max})"
            )
        if not self.temperature_min <= self.temperature <= self.temperature_max:
            raise ValueError(
                f"fne.temperature={self.temperature} outside [temperature_min, temperature_max]"
            )

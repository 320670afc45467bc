"""What the end-of-run summary prints, and the per-epoch diagnostics behind it (pure helpers).

Two rules live here so the training loop only calls them:

* **The printed diagnostics are those of the loss in use** (``DIAGNOSTICS_OF``): the posterior
  (gate, n⁺, P_fn > ε) belongs to ``fne`` alone, the hard-cut window to ``fne`` and
  ``window``, drawn-negative counts (zero hinge, fallbacks, no violator) to the sampling losses,
  the temperature to ``infonce``; group shares and false-negative detection only where group
  labels exist (measured over labelled items: ``fne.groups``), else one line saying there are
  none; staleness only where a memory was read.
* **The summary reports the whole last epoch** (``EpochDiagnostics``): every step's diagnostics
  are summed on the device (no host sync) and read once per epoch, so ``metrics.json`` can hold
  every epoch and the summary the last one, not the last log window.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .fne.detection import detection_rates

DIAGNOSTICS_OF: dict[str, frozenset[str]] = {
    "fne": frozenset({"posterior", "window", "draws", "group_share", "detection", "memory"}),
    "window": frozenset({"window", "draws", "group_share", "detection", "memory"}),
    "vse_pp": frozenset({"draws", "group_share", "memory"}),
    "vse0": frozenset(),
    "fne_sum": frozenset({"posterior", "group_share", "detection", "memory"}),
    "infonce": frozenset({"temperature", "memory"}),
}
"""Diagnostic line kinds each loss produces; a line is printed only if its loss has it."""

RATIOS: dict[str, tuple[str, str]] = {"frac_neg_same_group": ("neg_same_group", "neg_labelled")}
"""Shares whose steps carry their numerator and denominator sums: over a window or an epoch
the share is Σ numerator / Σ denominator (a step without labelled draws adds nothing), never
a mean of per-step shares (NaN in such a step). NaN when the denominator is 0: not measured."""


def ratios_of_sums(means: dict[str, float]) -> dict[str, float]:
    """``means`` with each share of ``RATIOS`` recomputed from its (mean) sums."""
    out = dict(means)
    for key, (num, den) in RATIOS.items():
        if num in means and den in means:
            out[key] = means[num] / means[den] if means[den] > 0 else math.nan
    return out


def has_group_labels(diagnostics: dict[str, float]) -> bool:
    """Whether the logged diagnostics saw any labelled draw (no key: a loss without draws)."""
    n = diagnostics.get("neg_labelled", diagnostics.get("fnd_n_eval"))
    return n is not None and not math.isnan(n) and n > 0


def diagnostic_kinds(loss: str, diagnostics: dict[str, float], vse_pp_memory: bool = True) -> set:
    """The diagnostic line kinds to print for ``loss`` given the logged ``diagnostics``: those
    the loss produces whose numbers were logged (group keys exist only with labels)."""
    if loss not in DIAGNOSTICS_OF:
        raise ValueError(f"unknown loss {loss!r} (valid: {', '.join(DIAGNOSTICS_OF)})")
    kinds = set(DIAGNOSTICS_OF[loss])
    if "frac_neg_same_group" not in diagnostics or not has_group_labels(diagnostics):
        kinds.discard("group_share")
    if "fnd_n_eval" not in diagnostics or not has_group_labels(diagnostics):
        kinds.discard("detection")
    if loss == "vse_pp" and not vse_pp_memory:
        kinds.discard("memory")
    return kinds


def _pct(d: dict[str, float], key: str) -> str:
    value = d.get(key, math.nan)
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.2f}%"


def diagnostic_lines(
    loss: str, d: dict[str, float], staleness: float | None, vse_pp_memory: bool = True
) -> list[str]:
    """The printed diagnostic lines of ``loss`` (``d``: the last epoch's mean diagnostics)."""
    kinds = diagnostic_kinds(loss, d, vse_pp_memory)
    lines = []
    if "posterior" in kinds:
        gate = "open" if d.get("gate_open", 0) >= 0.5 else "closed"
        lines.append(
            f"FNE   gate {gate}, positives this epoch {d.get('n_pos', math.nan):.0f}, "
            f"μ+ {d.get('mu_pos', math.nan):.3f} σ+ {d.get('sigma_pos', math.nan):.3f}, "
            f"μ- {d.get('mu_neg', math.nan):.3f} σ- {d.get('sigma_neg', math.nan):.3f}, "
            f"P_fn>eps {_pct(d, 'frac_pfn_gt_eps')} of candidates"
            + (f", estimated prior {d['prior']:.2e}" if "prior" in d else "")
        )
    parts = []
    if "window" in kinds:
        parts.append(f"in the hard-cut window {_pct(d, 'frac_in_window')} of candidates")
    if "draws" in kinds:
        parts.append(
            f"zero-hinge draws {_pct(d, 'frac_zero_hinge')}, fallbacks "
            f"{d.get('fallback', 0):.2f}/step, no violator {d.get('no_violator', 0):.2f}/step"
        )
    if "group_share" in kinds:
        # fne_sum samples nothing: its share is of the violators' weight (fne.summed)
        what = "violators' weight" if loss == "fne_sum" else "sampled negatives"
        parts.append(f"{what} sharing the anchor's group {_pct(d, 'frac_neg_same_group')}")
    if "temperature" in kinds:
        parts.append(f"temperature {d.get('temperature', math.nan):.4f}")
    if "memory" in kinds and staleness is not None:
        parts.append(f"memory staleness {staleness:.3f}")
    lines += [f"{loss:<5} {p}" for p in parts]
    measured = "frac_neg_same_group" in d or "fnd_n_eval" in d
    if measured and not has_group_labels(d) and DIAGNOSTICS_OF[loss] & {"group_share", "detection"}:
        lines.append(
            "groups no group labels in the training data: group shares and false-negative "
            "detection not measured"
        )
    if "detection" in kinds:
        lines += detection_lines(d, with_posterior="posterior" in kinds)
    return lines


def detection_lines(d: dict[str, float], with_posterior: bool) -> list[str]:
    """False-negative detection against the group labels (``fne.detection``)."""
    r = detection_rates(d)
    pct = lambda x: "n/a" if math.isnan(x) else f"{100 * x:.1f}%"  # noqa: E731
    lines = [
        f"FN    false negatives among evaluable candidates {pct(r['fn_rate'])}; hard-cut window: "
        f"precision {pct(r['window_precision'])} recall {pct(r['window_recall'])}"
    ]
    if with_posterior:
        lines.append(
            f"FN    P_fn>eps: precision {pct(r['pfn_precision'])} recall {pct(r['pfn_recall'])}"
        )
    return lines


NO_GROUP_METRICS = "group-aware metrics: no group labels in this split"


def group_rsum_text(m: dict[str, float]) -> str:
    """The group rsum for a one-line report, or that the split has no group labels."""
    value = m.get("group_rsum", math.nan)
    return NO_GROUP_METRICS if math.isnan(value) else f"group-aware rsum {value:.1f}"


def retrieval_lines(split: str, m: dict[str, float]) -> list[str]:
    """Strict R@K (pessimistic ties) and, where labels exist, group rsum and group mAP."""
    lines = [
        f"{split:<5} i2t R@1/5/10 {m['i2t_r1']:.1f}/{m['i2t_r5']:.1f}/{m['i2t_r10']:.1f}   "
        f"t2i R@1/5/10 {m['t2i_r1']:.1f}/{m['t2i_r5']:.1f}/{m['t2i_r10']:.1f}   "
        f"rsum {m['rsum']:.1f} (ties against the match; {m.get('rsum_optimistic', math.nan):.1f}"
        " if ties counted as hits)"
    ]
    if not math.isnan(m.get("group_rsum", math.nan)):
        lines.append(
            f"{split:<5} group-aware rsum {m['group_rsum']:.1f}   group mAP {m['group_map']:.1f}"
        )
    else:
        lines.append(f"{split:<5} {NO_GROUP_METRICS}")
    return lines


class EpochDiagnostics:
    """Sums of every step's diagnostics since the epoch began, read once per epoch.

    ``add`` keeps float64 device tensors (no host sync); ``close_epoch`` reads them, appends
    ``{"epoch", "steps", mean of each key, detection rates}`` to ``epochs`` and starts over.
    """

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.steps = 0
        self.epochs: list[dict[str, Any]] = []

    def add(self, diagnostics: dict[str, Tensor]) -> None:
        for key, value in diagnostics.items():
            if key in RATIOS:  # recomputed from its sums (a NaN step would poison a sum)
                continue
            value = value.detach().to(torch.float64)
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.steps += 1

    def close_epoch(self, epoch: int) -> dict[str, Any]:
        """The epoch's means (and detection rates); {} if no step was added."""
        if not self.steps:
            return {}
        means = ratios_of_sums({key: float(t) / self.steps for key, t in self.sums.items()})
        row = {"epoch": epoch, "steps": self.steps, **means}
        row |= {f"fn_{k}": v for k, v in detection_rates(means).items()}
        self.epochs.append(row)
        self.sums, self.steps = {}, 0
        return row

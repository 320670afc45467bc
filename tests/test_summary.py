"""The printed summary shows the diagnostics of the loss in use, and the per-epoch means."""

from __future__ import annotations

import math

import pytest
import torch

from fne_dist.fne.detection import COLUMNS
from fne_dist.fne.params import LOSSES
from fne_dist.run_summary import (
    DIAGNOSTICS_OF,
    EpochDiagnostics,
    diagnostic_kinds,
    diagnostic_lines,
    retrieval_lines,
)

FULL = {
    "gate_open": 1.0, "n_pos": 300.0, "mu_pos": 0.8, "sigma_pos": 0.05, "mu_neg": 0.3,
    "sigma_neg": 0.1, "frac_pfn_gt_eps": 0.01, "frac_in_window": 0.02, "frac_zero_hinge": 0.1,
    "fallback": 0.0, "no_violator": 0.5, "frac_neg_same_group": 0.2, "temperature": 0.05,
    **{f"fnd_{c}": 1.0 for c in COLUMNS},
}  # fmt: skip


def test_every_loss_has_a_rule() -> None:
    """Invariant: the rule covers exactly the losses the harness offers."""
    assert set(DIAGNOSTICS_OF) == set(LOSSES)


@pytest.mark.parametrize("loss", LOSSES)
def test_lines_only_of_the_loss_in_use(loss: str) -> None:
    """Invariant: no loss prints a diagnostic it does not produce: infonce prints no
    'positives this epoch', window no posterior, vse0 nothing; only the losses that ask the
    posterior (fne, fne_sum) print P_fn."""
    text = "\n".join(diagnostic_lines(loss, FULL, staleness=0.9))
    posterior = loss in ("fne", "fne_sum")
    assert ("positives this epoch" in text) == posterior
    assert ("P_fn>eps" in text) == posterior
    assert ("hard-cut window" in text) == (loss in ("fne", "window", "fne_sum"))
    assert ("temperature" in text) == (loss == "infonce")
    assert ("staleness" in text) == (loss != "vse0")
    assert "nan" not in text
    if loss == "vse0":
        assert text == ""


def test_group_lines_need_group_keys() -> None:
    """Invariant: without group labels (no group keys logged) no group share or detection line
    is printed, rather than a share computed from one shared "unknown" group."""
    bare = {k: v for k, v in FULL.items() if not k.startswith("fnd_") and "group" not in k}
    assert "group_share" not in diagnostic_kinds("fne", bare)
    assert "detection" not in diagnostic_kinds("fne", bare)
    text = "\n".join(diagnostic_lines("fne", bare, None))
    assert "group" not in text and "FN " not in text and "staleness" not in text
    assert "precision" in "\n".join(diagnostic_lines("window", FULL, None))


def test_retrieval_lines_without_group_labels() -> None:
    """Invariant: the group-aware line says that labels are missing instead of a number."""
    strict = {f"{d}_r{k}": 10.0 for d in ("i2t", "t2i") for k in (1, 5, 10)}
    strict |= {"rsum": 60.0, "rsum_optimistic": 70.0}
    assert "no group labels" in retrieval_lines("test", strict)[1]
    assert "no group labels" in retrieval_lines("test", strict | {"group_rsum": math.nan})[1]
    line = retrieval_lines("test", strict | {"group_rsum": 80.0, "group_map": 40.0})[1]
    assert "group mAP 40.0" in line


def test_epoch_means_are_over_every_step_of_the_epoch() -> None:
    """Invariant: the epoch row is the mean of every step added since the last close (not of
    the last log window), and detection rates come from the summed columns."""
    acc = EpochDiagnostics()
    for step in range(4):
        diag = {"loss": torch.tensor(float(step))}
        diag |= {f"fnd_{c}": torch.tensor(0.0) for c in COLUMNS}
        diag |= {"fnd_n_actual": torch.tensor(2.0), "fnd_pfn_tp": torch.tensor(float(step % 2))}
        diag |= {"fnd_pfn_pred": torch.tensor(1.0)}
        acc.add(diag)
    row = acc.close_epoch(3)
    assert (row["epoch"], row["steps"], row["loss"]) == (3, 4, 1.5)
    assert row["fn_pfn_precision"] == 0.5 and row["fn_pfn_recall"] == 0.25
    assert math.isnan(row["fn_window_precision"])
    assert acc.close_epoch(4) == {} and len(acc.epochs) == 1

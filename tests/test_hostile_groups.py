"""Data without group labels: "no group label" is its own value (one constant,
``fne.groups.NO_GROUP``), never one group shared by every unlabelled item. Group shares, false-
negative detection and group-aware retrieval are computed over labelled items only and are
reported as not measured when there is none (img2dataset's shards printed a perfect group rsum
and 100 % of sampled negatives "sharing the anchor's family")."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.functional import normalize

from fne_dist.data.decode import decode_sample
from fne_dist.fne import Anchors, Candidates, FneConfig, retrieval_loss
from fne_dist.fne.groups import NO_GROUP, labelled, same_group
from fne_dist.fne.stats import Gaussians
from fne_dist.memory import EMPTY_ID
from fne_dist.reporters import format_summary
from fne_dist.retrieval_metrics import retrieval_metrics
from fne_dist.run_summary import EpochDiagnostics, diagnostic_lines, retrieval_lines

from .shard_factory import png


def _loss_diagnostics(groups: list[int], loss: str = "fne") -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    b = len(groups)
    img, txt = (normalize(torch.randn(b, 8, generator=gen), dim=1) for _ in range(2))
    ids, grp = torch.arange(b), torch.tensor(groups)
    f = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    g = Gaussians(f(0.5), f(0.01), f(0.0), f(0.01), f(500.0), f(1) > 0, f(1) > 0)
    u = torch.rand(2, b, 1, generator=gen, dtype=torch.float64)
    out = retrieval_loss(Anchors(img, txt, ids, torch.arange(b), grp),
                         Candidates(img, txt, ids, b, grp), FneConfig(loss=loss), g, u)  # fmt: skip
    return {k: float(v) for k, v in out.diagnostics.items() if v.numel() == 1}


def test_hostile_no_group_is_one_value_that_matches_nothing() -> None:
    """Invariant: a sample without group_id decodes to NO_GROUP; NO_GROUP and the memory's
    empty marker are unlabelled, and no two unlabelled items are group mates."""
    d = decode_sample({"__key__": "k", "png": png(), "txt": b"x", "json": b'{"image_id": 3}'})
    assert d.group == NO_GROUP
    g = torch.tensor([NO_GROUP, NO_GROUP, EMPTY_ID, 4, 4])
    assert labelled(g).tolist() == [False, False, False, True, True]
    mates = same_group(g[:, None], g[None, :])
    assert int(mates.sum()) == 4  # only the two labelled items, with each other and themselves


@pytest.mark.parametrize("loss", ["fne", "window", "vse_pp"])
def test_hostile_unlabelled_batch_measures_no_group_share(loss: str) -> None:
    """Invariant: over a batch without any group label the share of sampled negatives sharing
    the anchor's group is not measured (NaN, never 0 % or 100 %), its labelled-draw count is 0,
    and false-negative detection evaluates no candidate."""
    d = _loss_diagnostics([NO_GROUP] * 6, loss)
    assert math.isnan(d["frac_neg_same_group"]) and d["neg_labelled"] == 0.0
    assert d.get("fnd_n_eval", 0.0) == 0.0 and d.get("fnd_n_actual", 0.0) == 0.0


def test_hostile_epoch_share_is_over_labelled_draws() -> None:
    """Invariant: the epoch's group share is Σ same-group draws / Σ labelled draws over its
    steps (a step without labels adds nothing), the same number as one step holding all draws,
    not a mean of per-step shares diluted or poisoned by unlabelled steps."""
    labelled_step = _loss_diagnostics([0, 0, 1, 1, 2, 2])
    unlabelled_step = _loss_diagnostics([NO_GROUP] * 6)
    epochs = EpochDiagnostics()
    for step in (labelled_step, unlabelled_step, labelled_step):
        epochs.add({k: torch.tensor(v) for k, v in step.items()})
    row = epochs.close_epoch(0)
    expected = labelled_step["neg_same_group"] / labelled_step["neg_labelled"]
    assert row["frac_neg_same_group"] == pytest.approx(expected)
    assert row["frac_neg_same_group"] == pytest.approx(labelled_step["frac_neg_same_group"])


def _metrics(groups: list[int]) -> dict[str, float]:
    sim = torch.eye(4) + 0.1 * torch.arange(16.0).reshape(4, 4) / 16
    return retrieval_metrics(sim, torch.arange(4), torch.tensor(groups))


def test_hostile_summary_says_there_are_no_group_labels() -> None:
    """Invariant: without labels the summary prints no group number (no 'nan', no perfect
    score) but one line per split saying there are no group labels, and the diagnostics name
    no group share or detection rate."""
    m = _metrics([NO_GROUP] * 4)
    assert math.isnan(m["group_rsum"])
    lines = retrieval_lines("val", m)
    assert lines[-1] == "val   group-aware metrics: no group labels in this split"
    d = _loss_diagnostics([NO_GROUP] * 6)
    epochs = EpochDiagnostics()
    epochs.add({k: torch.tensor(v) for k, v in d.items()})
    row = epochs.close_epoch(0)
    text = "\n".join(diagnostic_lines("fne", row, None))
    assert "sharing the anchor's group" not in text and "precision" not in text
    assert "no group labels" in text
    result = {"test": m, "val": m, "diagnostics": row, "loss": "fne", "staleness": None,
              "steps": 1, "world_size": 1, "wall_time_s": 1.0}  # fmt: skip
    summary = format_summary(result, "run")
    assert "nan" not in summary.lower() and "group-aware rsum" not in summary


def test_hostile_labelled_data_keeps_its_group_lines() -> None:
    """Invariant: with labels the summary still reports the group rsum and the group share."""
    m = _metrics([0, 0, 1, 1])
    assert "group-aware rsum" in retrieval_lines("test", m)[-1]
    epochs = EpochDiagnostics()
    epochs.add({k: torch.tensor(v) for k, v in _loss_diagnostics([0, 0, 1, 1, 2, 2]).items()})
    text = "\n".join(diagnostic_lines("fne", epochs.close_epoch(0), None))
    assert "sharing the anchor's group" in text and "no group labels" not in text


def test_hostile_log_window_share_is_over_labelled_draws() -> None:
    """Invariant: a log window (train_log.jsonl, monitoring's same-group gauge) forms the share
    like the epoch: Σ/Σ over its steps, finite when any step had labelled draws."""
    from fne_dist.state import TrainState

    state = TrainState.fresh(torch.device("cpu"), warm=False)
    labelled_step = _loss_diagnostics([0, 0, 1, 1, 2, 2])
    for step in (labelled_step, _loss_diagnostics([NO_GROUP] * 6)):
        state.add_diagnostics(torch.tensor(1.0), {k: torch.tensor(v) for k, v in step.items()})
    window = state.take_window()
    assert window["frac_neg_same_group"] == pytest.approx(labelled_step["frac_neg_same_group"])
    assert all(not math.isnan(v) for k, v in window.items() if not k.startswith("fn"))

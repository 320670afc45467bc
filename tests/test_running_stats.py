"""Batch-norm running statistics are committed with the step, never copied to be undone."""

from __future__ import annotations

import copy

import torch
from torch import nn

from fne_dist.running_stats import deferred_running_stats


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5), nn.BatchNorm1d(5, momentum=None),
    )  # fmt: skip


def test_a_deferred_forward_equals_a_plain_one_once_committed() -> None:
    """Invariant: inside the deferral a training forward gives the same output bit for bit and
    leaves every buffer untouched; ``commit`` then moves them as the plain forwards would have
    (exponential and cumulative averages, two forwards in a row)."""
    model, plain = _model(), _model()
    x1, x2 = torch.randn(8, 3, 8, 8), torch.randn(8, 3, 8, 8) * 3 + 1
    before = copy.deepcopy(list(model.buffers()))
    with deferred_running_stats(model) as pending:
        y = [model(x1), model(x2)]
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), before, strict=True))
    expected = [plain(x1), plain(x2)]
    assert all(torch.equal(a, b) for a, b in zip(y, expected, strict=True))
    pending.commit()
    for got, want in zip(model.buffers(), plain.buffers(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert int(model[1].num_batches_tracked) == 2


def test_an_uncommitted_step_leaves_the_buffers_as_they_were() -> None:
    """Invariant: a step that is skipped (never committed), even one whose activations are
    NaN, leaves the running statistics as they were; layers track again afterwards, and eval
    mode and frozen layers are not touched."""
    model = _model()
    before = copy.deepcopy(list(model.buffers()))
    with deferred_running_stats(model):
        model(torch.full((8, 3, 8, 8), float("nan")))
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), before, strict=True))
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    model.eval()
    with deferred_running_stats(model) as pending:
        model(torch.randn(8, 3, 8, 8))
    assert pending.seen == []

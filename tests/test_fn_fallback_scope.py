"""``fne.fallback_scope: batch``: a row whose window weights sum to 0 takes the hardest margin
violator of the gathered batch block only, not of [batch ; memory] (fne/selection.py, loss.py),
on a hand-made example with a known answer and against a plain loop over ``fne.reference``."""

from __future__ import annotations

import pytest
import torch

from fne_dist.fne import Anchors, Candidates, FneConfig, SimilarityStats, retrieval_loss, stats_of
from fne_dist.fne import reference as ref
from fne_dist.fne.rules import FNE
from fne_dist.fne.selection import CandidateLabels, Rows, select_dense, select_listed
from tests.test_sampler import _gaussians, _problem, _reference_rows

F64 = torch.float64


def _every_window_empty() -> tuple[Anchors, Candidates, object]:
    """Two anchors, one-hot candidates [batch (cols 0, 1) ; memory (cols 2, 3)], μ⁺ 1.1 so the
    hard cut (s ≤ 0.9) empties every window. Rows (same for both directions):
    anchor 0 (s⁺ .9): batch col 1 .55 (hinge 0), memory col 2 .85 (hinge .15);
    anchor 1 (s⁺ .6): batch col 0 .45 (hinge .05), memory col 3 .5 (hinge .1)."""
    S = torch.tensor([[0.9, 0.55, 0.85, 0.1], [0.45, 0.6, 0.2, 0.5]], dtype=F64)
    eye = torch.eye(4, dtype=F64)
    a = Anchors(S.clone().requires_grad_(), S.clone(), torch.tensor([0, 1]), torch.tensor([0, 1]))
    c = Candidates(eye, eye, torch.tensor([0, 1, 5, 6]), 2)
    stats = SimilarityStats()
    stats.add(stats_of(torch.tensor([1.1]), torch.tensor([0.1, 0.2])))
    return a, c, stats.gaussians()


@pytest.mark.parametrize("reduction", ["sample", "expected"])
@pytest.mark.parametrize("loss", ["fne", "window"])
def test_batch_scope_by_hand(loss: str, reduction: str) -> None:
    """Known answer: over every candidate the fallbacks are the memory columns (hinges .15,
    .1: loss 2 · mean = .25, 4 fallbacks); over the batch block anchor 0 has no violator and
    anchor 1 takes col 0 (hinge .05: loss .05, 2 fallbacks, 2 rows without a violator)."""
    a, c, g = _every_window_empty()
    u = torch.full((2, 2, 1), 0.5, dtype=F64)
    cfg = FneConfig(loss=loss, reduction=reduction)
    wide = retrieval_loss(a, c, cfg, g, u)
    assert wide.loss.item() == pytest.approx(0.25)
    assert wide.diagnostics["fallback"].item() == 4
    narrow = retrieval_loss(a, c, FneConfig(loss=loss, reduction=reduction,
                                            fallback_scope="batch"), g, u)  # fmt: skip
    assert narrow.loss.item() == pytest.approx(0.05)
    assert narrow.diagnostics["fallback"].item() == 2
    assert narrow.diagnostics["no_violator"].item() == 2


def test_batch_scope_equals_the_plain_loop() -> None:
    """Invariant: with the fallback limited to the first n columns, both selectors draw what
    ``fne.reference.draw`` draws from the weights with the hinges of columns ≥ n set to 0 (a
    non-empty window is untouched; an empty one falls back inside the first n columns)."""
    g, g_ref = _gaussians("gate open")
    sim, ids, cand_ids, pos_col, mask = _problem(11, F64)
    n_batch = 100
    u = torch.rand(sim.shape[0], 1, generator=torch.Generator().manual_seed(5), dtype=F64)
    rows = _reference_rows(sim, pos_col, mask, g_ref, True)
    want = [
        ref.draw(w, hinges[:n_batch] + [0.0] * (len(hinges) - n_batch), float(u[i, 0]))
        for i, (w, hinges, *_) in enumerate(rows)
    ]
    assert sum(sum(r[0]) == 0 for r in rows) >= 2  # some rows do fall back
    rows_ = Rows(sim, pos_col, ids, u, fallback_cols=n_batch)
    for select in (select_dense, select_listed):
        p = select(rows_, CandidateLabels(cand_ids), g, FneConfig(), FNE)
        got = [
            int(j) if ok else None for j, ok in zip(p.index_bk[:, 0], p.valid_bk[:, 0], strict=True)
        ]
        assert got == want


def test_sampler_options_are_ignored_by_losses_that_draw_none() -> None:
    """Invariant: options that only a drawn negative uses (fallback_scope, reduction, the
    unflagged fallback, the posterior) are ignored by vse_pp: the config validates, so
    switching fne.loss alone never fails, and vse_pp's loss is the same with and without
    them."""
    a, c, g = _every_window_empty()
    plain = retrieval_loss(a, c, FneConfig(loss="vse_pp"), g).loss
    for extra in (
        dict(fallback_scope="batch"),
        dict(reduction="expected", negatives=4),
        dict(fallback="unflagged", posterior="intra_mixture"),
    ):
        cfg = FneConfig(loss="vse_pp", **extra)
        cfg.check()
        assert torch.equal(retrieval_loss(a, c, cfg, g).loss, plain), extra
    FneConfig(loss="window", fallback_scope="batch", reduction="expected").check()

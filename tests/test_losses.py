"""Each loss of the harness on hand-made similarity matrices whose answer is known.

Candidates are one-hot rows (D = N), so an anchor's embedding *is* its row of similarities:
S = anchors · Iᵀ = anchors.
"""

from __future__ import annotations

import math

import pytest
import torch

from fne_dist.fne import (
    Anchors,
    Candidates,
    FneConfig,
    SimilarityStats,
    retrieval_loss,
    step_uniforms,
)

# Two anchors, four candidates [batch (2) ; memory (2)]; anchor i's positive is column i.
S_I2T = [[0.9, 0.5, 0.8, 0.1], [0.3, 0.6, 0.2, 0.7]]
S_T2I = [[0.7, 0.6, 0.1, 0.0], [0.4, 0.8, 0.75, 0.2]]
IDS = [0, 1]
MEM_IDS = [5, 1]  # memory slot 3 holds another caption of image 1: a positive for anchor 1


def _setup(groups: list[int] | None = None, mem_groups: list[int] | None = None):
    img = torch.tensor(S_I2T, dtype=torch.float64, requires_grad=True)
    txt = torch.tensor(S_T2I, dtype=torch.float64, requires_grad=True)
    eye = torch.eye(4, dtype=torch.float64)
    g = None if groups is None else torch.tensor(groups)
    a = Anchors(img, txt, torch.tensor(IDS), torch.tensor([0, 1]), g)
    batch = Candidates(eye[:2], eye[:2], torch.tensor(IDS), 2, g)
    mem = Candidates(
        eye[2:],
        eye[2:],
        torch.tensor(MEM_IDS),
        0,
        None if mem_groups is None else torch.tensor(mem_groups),
    )
    return a, Candidates.concat(batch, mem)


def _no_stats():
    return SimilarityStats().gaussians()


def test_vse_pp_hardest_negative() -> None:
    """i2t: anchor 0 hinges [–, 0, .1, 0] → .1; anchor 1: col 3 is a positive (same id) so
    hinges [0, –, .0(.2+.2−.6<0), masked] → 0. t2i: anchor 0 → max(.1, 0, 0) = .1; anchor 1:
    cols 0 (0), 2 (.15), 3 masked → .15. Loss = mean(.1, 0) + mean(.1, .15)."""
    a, c = _setup()
    out = retrieval_loss(a, c, FneConfig(loss="vse_pp"))
    assert out.loss.item() == pytest.approx(0.05 + 0.125)
    assert out.diagnostics["no_violator"].item() == 1  # i2t anchor 1
    out = retrieval_loss(a, c, FneConfig(loss="vse_pp", vse_pp_memory=False))
    # batch only: i2t anchor 0 → 0 (.2+.5−.9), anchor 1 → 0 (.2+.3−.6 = −.1); t2i: .1 and 0
    assert out.loss.item() == pytest.approx(0.0 + 0.05)


def test_vse0_sum_of_hinges_over_batch() -> None:
    """VSE0 over the batch block only: i2t rows 0 → 0, 1 → 0; t2i rows 0 → .1, 1 → 0."""
    a, c = _setup()
    out = retrieval_loss(a, c, FneConfig(loss="vse0"))
    assert out.loss.item() == pytest.approx(0.0 + 0.05)


def test_infonce_multi_positive_softmax() -> None:
    """Softmax CE with temperature 0.07, targets uniform over same-id candidates, mean of the
    two directions, computed here by hand."""
    a, c = _setup()
    temp = torch.tensor(0.07, dtype=torch.float64)
    out = retrieval_loss(a, c, FneConfig(loss="infonce"), temperature=temp)

    def ce(row: list[float], positives: list[int]) -> float:
        z = [x / 0.07 for x in row]
        lse = math.log(sum(math.exp(v) for v in z))
        return -sum(z[j] - lse for j in positives) / len(positives)

    i2t = (ce(S_I2T[0], [0]) + ce(S_I2T[1], [1, 3])) / 2
    t2i = (ce(S_T2I[0], [0]) + ce(S_T2I[1], [1, 3])) / 2
    assert out.loss.item() == pytest.approx((i2t + t2i) / 2, rel=1e-9)


def test_window_draw_with_known_uniforms() -> None:
    """Window (stats with μ⁺ = 0.8, cut at s ≤ 0.6): i2t anchor 0 window = {col 2 (.8)} → its
    hinge .1; anchor 1 window = {col 3} but it is a positive → empty → fallback to hardest
    violator: none → 0. t2i anchor 0: window {} (cols .6/.1/0 ≤ .6) → fallback col 1 (hinge
    .1); anchor 1: window {col 2 (.75)} → hinge .15."""
    a, c = _setup()
    stats = SimilarityStats()
    from fne_dist.fne import stats_of

    stats.add(stats_of(torch.tensor([0.8]), torch.tensor([0.1, 0.2])))
    u = torch.full((2, 2, 1), 0.5, dtype=torch.float64)
    out = retrieval_loss(a, c, FneConfig(loss="window"), stats.gaussians(), u)
    assert out.loss.item() == pytest.approx(0.05 + 0.125)
    assert out.diagnostics["fallback"].item() == 1
    assert out.diagnostics["no_violator"].item() == 1


def test_fne_with_gate_closed_samples_by_kernel() -> None:
    """FNE before any statistics: no hard cut, gate closed → kernel weights exp(−½(s−s⁺)²)
    over unmasked columns. With u = 0 the first positive-weight column is drawn: i2t anchor 0
    → col 1 (hinge 0), anchor 1 → col 0 (hinge 0); t2i anchor 0 → col 1 (.1), anchor 1 → col 0
    (0). Loss = 0 + .05; zero-hinge draws 3 of 4."""
    a, c = _setup()
    u = torch.zeros((2, 2, 1), dtype=torch.float64)
    out = retrieval_loss(a, c, FneConfig(), _no_stats(), u)
    assert out.loss.item() == pytest.approx(0.05)
    assert out.diagnostics["frac_zero_hinge"].item() == pytest.approx(0.75)
    assert out.diagnostics["gate_open"].item() == 0


def test_mask_groups_oracle() -> None:
    """With mask_groups, candidates sharing the anchor's group are never negatives: anchor 0's
    hardest i2t negative (col 2, same group 9) is masked, leaving no violator."""
    a, c = _setup(groups=[9, 1], mem_groups=[9, 4])
    plain = retrieval_loss(a, c, FneConfig(loss="vse_pp"))
    oracle = retrieval_loss(a, c, FneConfig(loss="vse_pp", mask_groups=True))
    assert plain.diagnostics["frac_neg_same_group"].item() > 0
    assert oracle.diagnostics["frac_neg_same_group"].item() == 0
    assert oracle.loss.item() < plain.loss.item()


def test_gradient_equals_full_matrix_autograd() -> None:
    """Invariant: taking the gradient through the k selected similarities only (the harness's
    shortcut) gives the gradient of the textbook loss built on the full B×N matrix."""
    torch.manual_seed(0)
    B, K, D = 6, 20, 8
    img = torch.nn.functional.normalize(torch.randn(B, D, dtype=torch.float64), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(B, D, dtype=torch.float64), dim=1)
    img.requires_grad_()
    txt.requires_grad_()
    cimg, ctxt = (
        torch.randn(B + K, D, dtype=torch.float64),
        torch.randn(B + K, D, dtype=torch.float64),
    )
    ids, cids = torch.arange(B), torch.cat([torch.arange(B), torch.randint(0, 3 * B, (K,))])
    a = Anchors(img, txt, ids, torch.arange(B))
    c = Candidates(cimg, ctxt, cids, B)
    retrieval_loss(a, c, FneConfig(loss="vse_pp")).loss.backward()
    got = (img.grad.clone(), txt.grad.clone())
    img.grad = txt.grad = None

    def textbook(anchor, cand):
        sim = anchor @ cand.T
        pos = sim[torch.arange(B), torch.arange(B)][:, None]
        hinge = (0.2 + sim - pos).clamp_min(0).masked_fill(ids[:, None] == cids[None], 0)
        return hinge.max(dim=1).values.mean()

    (textbook(img, ctxt) + textbook(txt, cimg)).backward()
    torch.testing.assert_close(got[0], img.grad)
    torch.testing.assert_close(got[1], txt.grad)


def test_uniforms_do_not_depend_on_world_size() -> None:
    """Invariant: rank r's uniforms are rows r·B..(r+1)·B−1 of the global batch's, so W ranks ×
    B draw what 1 rank × W·B draws; different steps draw different uniforms."""
    whole = step_uniforms(3407, 12, global_batch=8, negatives=2)
    parts = [step_uniforms(3407, 12, 8, 2, rank=r, local_batch=4) for r in range(2)]
    assert torch.equal(torch.cat(parts, dim=1), whole)
    assert not torch.equal(step_uniforms(3407, 13, 8, 2), whole)
    assert whole.shape == (2, 8, 2) and (whole >= 0).all() and (whole < 1).all()


def test_unknown_loss_and_missing_inputs_fail_clearly() -> None:
    a, c = _setup()
    with pytest.raises(ValueError, match="unknown loss"):
        retrieval_loss(a, c, FneConfig(), loss="triplet")
    with pytest.raises(ValueError, match="Gaussians"):
        retrieval_loss(a, c, FneConfig())

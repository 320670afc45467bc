"""``fne.fn_signal: tail`` (fne_dist/fne/tail.py): the per-anchor robust z of the image-image
similarity, on hand-made rows with known answers, against a plain per-row form written here,
and through the fne sampler and infonce_fn."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fne_dist.fne import Anchors, Candidates, FneConfig, Gaussians, retrieval_loss
from fne_dist.fne.fn_signal import pair_log_odds
from fne_dist.fne.tail import MAD_TO_SD, robust_z, tail_log_odds

F64 = torch.float64


def _plain_z(x: torch.Tensor, null: torch.Tensor) -> torch.Tensor:
    """One row at a time, with sorting: the lower median of the null entries (what
    torch.nanmedian returns for an even count), and the lower median of |x − m| over them."""
    out = torch.empty_like(x, dtype=F64)
    for i in range(x.shape[0]):
        v = x[i][null[i]].to(F64).sort().values
        m = v[(len(v) - 1) // 2]
        dev = (v - m).abs().sort().values
        d = max(MAD_TO_SD * float(dev[(len(dev) - 1) // 2]), 1e-3)
        out[i] = (x[i].to(F64) - m) / d
    return out


def test_robust_z_by_hand() -> None:
    """Invariant: z = (x − median) / (1.4826 · MAD) over the null entries: on the row
    1, 2, 3, 4, 5 (median 3, MAD 1) a far outlier does not move the centre or the scale, and
    an entry outside the null (here 100, e.g. the anchor's own image) is scored but ignored."""
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 100.0]], dtype=F64)
    null = torch.tensor([[True, True, True, True, True, False]])
    want = (x - 3.0) / MAD_TO_SD
    torch.testing.assert_close(robust_z(x, null), want)
    with_outlier = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 100.0, 3.0]], dtype=F64)
    z = robust_z(with_outlier, torch.ones_like(with_outlier, dtype=torch.bool))
    torch.testing.assert_close(z[0, :5], ((x[0, :5] - 3.0) / MAD_TO_SD))


def test_robust_z_matches_a_plain_per_row_form() -> None:
    """Invariant: the batched, NaN-masked form equals a per-row loop with sorting, on random
    rows with random null masks (empty memory slots, the anchor's own id)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(7, 41, generator=gen, dtype=F64)
    null = torch.rand(7, 41, generator=gen) > 0.3
    null[:, 0] = True
    torch.testing.assert_close(robust_z(x, null), _plain_z(x, null))


def test_degenerate_rows_stay_finite() -> None:
    """Invariant: a row of identical similarities (scale floored) or with no null entry gives
    finite z, never NaN or inf (an empty memory at the first step)."""
    x = torch.tensor([[0.5, 0.5, 0.5, 0.9], [0.1, 0.2, 0.3, 0.4]], dtype=F64)
    null = torch.tensor([[True, True, True, True], [False, False, False, False]])
    z = robust_z(x, null)
    assert torch.isfinite(z).all()
    assert z[0, 3].item() == pytest.approx(0.4 / 1e-3)


def _rare_rows(rate: float, rows: int = 40, n: int = 1000, seed: int = 0):
    """Image-image similarities shaped like the measured emoji ones: the rest 0.57 ± 0.12,
    false negatives (a share ``rate`` of each row) 0.96 ± 0.03."""
    gen = torch.Generator().manual_seed(seed)
    x = 0.57 + 0.12 * torch.randn(rows, n, generator=gen, dtype=F64)
    fn = torch.rand(rows, n, generator=gen) < rate
    x = torch.where(fn, 0.96 + 0.03 * torch.randn(rows, n, generator=gen, dtype=F64), x)
    return x.clamp(-1, 1), fn


def test_tail_finds_rare_false_negatives() -> None:
    """Invariant: at the measured emoji separation (z of a false negative ≈ 3.3 ± 0.25) and
    rate (0.6 % of the candidates), P_fn > 0.5 (z > 3) catches the false negatives with
    precision and recall ≥ 0.7 each (expected ≈ 0.8 / 0.8 under this Gaussian null)."""
    x, fn = _rare_rows(0.006)
    pred = tail_log_odds(x, torch.ones_like(fn), 3.0, 4.0) > 0
    tp = (pred & fn).sum().item()
    assert tp / pred.sum().item() >= 0.7 and tp / fn.sum().item() >= 0.7


def test_median_mad_null_is_dragged_less_than_mean_sd_by_dense_false_negatives() -> None:
    """Invariant: with 10 % false negatives in the upper tail, the robust z of the false
    negatives stays above the plain mean/sd z (whose sd they inflate), so the tail rule
    degrades more slowly as false negatives get dense. (It still loses recall at z₀ = 3:
    median and MAD move by ~0.1 sd each, enough at this separation.)"""
    x, fn = _rare_rows(0.1)
    z_robust = robust_z(x, torch.ones_like(fn))
    z_plain = (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)
    assert z_robust[fn].mean() > z_plain[fn].mean() + 0.5


def test_pair_log_odds_tail_is_the_logistic_and_needs_the_null() -> None:
    """Invariant: signal tail gives L = k (z − z₀) whatever the fitted mixtures (none here),
    so P_fn = 0.5 exactly at z = z₀; without the null mask it fails with one clear error."""
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]], dtype=F64)
    g = Gaussians(*(torch.tensor(v, dtype=F64) for v in (0.5, 0.01, 0.1, 0.01, 1.0)),
                  torch.tensor(True), torch.tensor(True))  # fmt: skip
    null = torch.ones_like(x, dtype=torch.bool)
    out = pair_log_odds("tail", g, torch.zeros_like(x), x, null, (2.0, 5.0))
    torch.testing.assert_close(out, 5.0 * ((x - 3.0) / MAD_TO_SD - 2.0))
    with pytest.raises(ValueError, match="tail needs the candidates"):
        pair_log_odds("tail", g, torch.zeros_like(x), x)
    with pytest.raises(ValueError, match=r"needs fne\.fn_model=mixture"):
        FneConfig(fn_signal="tail").check()


def _pool(n: int = 30) -> tuple[Anchors, Candidates]:
    """Two anchors (ids 0, 1, groups 0, 1) and n candidates: the two anchors' own pairs, a
    group mate of anchor 0 (id 2) whose image is a near-copy of its image but whose caption is
    unrelated, and n − 3 unrelated items of their own groups."""
    gen = torch.Generator().manual_seed(5)
    img = F.normalize(torch.randn(n, 16, generator=gen, dtype=F64), dim=1)
    txt = F.normalize(torch.randn(n, 16, generator=gen, dtype=F64), dim=1)
    img[2] = F.normalize(img[0] + 0.05 * img[2], dim=0)
    ids = torch.arange(n)
    groups = torch.tensor([0, 1, 0, *range(2, n - 1)])
    a = Anchors(img[:2].clone(), txt[:2].clone(), ids[:2], torch.arange(2), groups[:2])
    return a, Candidates(img, txt, ids, 2, groups)


def _fitted() -> Gaussians:
    one = torch.tensor(1.0, dtype=F64)
    mix = (torch.tensor(0.8, dtype=F64), one * 0.01, torch.tensor(0.0, dtype=F64), one * 0.04)
    return Gaussians(one * 0.5, one * 0.01, one * 0.1, one * 0.01, one, torch.tensor(False),
                     torch.tensor(True), prior=one * 0.1, mixture=mix,
                     intra=(one * 0.1, one * 0.7, one * 0.02, one * 0.2, one * 0.03))  # fmt: skip


def test_fne_sampler_with_tail_flags_the_image_copy_only() -> None:
    """Invariant: through the fne sampler, fn_signal tail flags exactly the group mate whose
    image copies the anchor's (both directions: precision 1, recall 1 of P_fn > ε)."""
    a, c = _pool()
    cfg = FneConfig(fn_model="mixture", fn_signal="tail", eps=0.5)
    out = retrieval_loss(a, c, cfg, _fitted(), torch.full((2, 2, 1), 0.5, dtype=F64))
    d = out.diagnostics
    assert d["fnd_pfn_pred"].item() == 2 and d["fnd_pfn_tp"].item() == 2
    assert torch.isfinite(out.loss)


def test_infonce_fn_with_tail_drops_the_image_copy_from_the_denominator() -> None:
    """Invariant: infonce_fn eliminate with fn_signal tail equals plain InfoNCE over the
    candidates without the image copy (computed here by deleting that column)."""
    a, c = _pool()
    cfg = FneConfig(loss="infonce", fn_model="mixture", fn_signal="tail", infonce_fn="eliminate",
                    eps=0.5)  # fmt: skip
    temp = torch.tensor(0.1, dtype=F64)
    out = retrieval_loss(a, c, cfg, _fitted(), temperature=temp)
    keep = [j for j in range(c.ids_N.shape[0]) if j != 2]

    losses = []
    for anc, cand in ((a.img_BD, c.txt_ND), (a.txt_BD, c.img_ND)):
        l0 = -F.log_softmax(anc[0] @ cand[keep].T / temp, dim=0)[0]
        l1 = -F.log_softmax(anc[1] @ cand.T / temp, dim=0)[1]
        losses.append(0.5 * (l0 + l1))
    torch.testing.assert_close(out.loss, 0.5 * (losses[0] + losses[1]))


def test_tail_both_flags_a_duplicate_caption_with_an_unlike_image() -> None:
    """Invariant: tail_both is the OR of the two tail tests: z = max(z_image, z_text), so a
    candidate whose caption duplicates the anchor's is flagged although its image is ordinary,
    and without text similarities tail_both fails with one clear error."""
    gen = torch.Generator().manual_seed(1)
    img = 0.5 + 0.1 * torch.randn(1, 200, generator=gen, dtype=F64)
    txt = 0.3 + 0.1 * torch.randn(1, 200, generator=gen, dtype=F64)
    txt[0, 7] = 1.0  # the duplicate caption; its image stays in the bulk
    null = torch.ones_like(img, dtype=torch.bool)
    both = tail_log_odds(img, null, 3.0, 4.0, txt)
    want = 4.0 * (torch.maximum(robust_z(img, null), robust_z(txt, null)) - 3.0)
    torch.testing.assert_close(both, want)
    assert both[0, 7] > 0 and tail_log_odds(img, null, 3.0, 4.0)[0, 7] < 0
    g = Gaussians(*(torch.tensor(v, dtype=F64) for v in (0.5, 0.01, 0.1, 0.01, 1.0)),
                  torch.tensor(True), torch.tensor(True))  # fmt: skip
    with pytest.raises(ValueError, match="tail_both needs"):
        pair_log_odds("tail_both", g, img, img, null)


@pytest.mark.parametrize(("fallback", "want"), [("hardest", 1), ("unflagged", 2)])
def test_empty_window_fallback_skips_flagged_candidates_only_when_asked(
    fallback: str, want: int
) -> None:
    """Invariant: a row whose hard-cut window is empty falls back to the hardest violator
    (the paper); with fne.fallback unflagged, to the hardest violator with P_fn ≤ ε, so a
    flagged false negative is not drawn through the fallback. Row: positive 0.35, negatives
    0.28 (flagged), 0.25, 0.10; μ⁺ 0.5, margin 0.2: cut at 0.3, window empty, both 0.28 and
    0.25 violate the margin."""
    from fne_dist.fne.selection import select_dense

    one = torch.tensor(1.0, dtype=F64)
    g = Gaussians(one * 0.5, one * 0.01, one * 0.1, one * 0.01, one, torch.tensor(True),
                  torch.tensor(True))  # fmt: skip
    cfg = FneConfig(fn_model="mixture", fn_signal="tail", eps=0.5, fallback=fallback)
    cfg.check()
    sim = torch.tensor([[0.35, 0.28, 0.25, 0.10]], dtype=F64)
    log_odds = torch.tensor([[-9.0, 9.0, -9.0, -9.0]], dtype=F64)
    u = torch.full((1, 1), 0.5, dtype=F64)
    p = select_dense(sim, torch.tensor([0]), torch.tensor([0]), torch.arange(4), None, None, u,
                     g, cfg, "fne", log_odds_bN=log_odds)  # fmt: skip
    assert p.fallback_b.tolist() == [True]
    assert p.index_bk.tolist() == [[want]] and p.valid_bk.tolist() == [[True]]
    with pytest.raises(ValueError, match="fallback=unflagged needs"):
        FneConfig(fn_model="mixture", fallback="unflagged").check()

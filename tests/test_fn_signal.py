"""``fne.fn_signal`` / ``fne.infonce_fn``: the intra-modal false-negative posterior and InfoNCE
with false-negative cancellation (fne_dist/fne/fn_signal.py, fn_infonce.py), on hand-made
tensors with known answers and against plain forms written here."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from fne_dist.fne import Anchors, Candidates, FneConfig, Gaussians, retrieval_loss
from fne_dist.fne.fn_signal import (
    denominator_log_weights,
    histogram_bins,
    log_likelihood_ratio,
    pair_log_odds,
    signal_histograms,
    weighted_info_nce,
    with_signals,
)
from fne_dist.fne.mixture import HIST_BINS, Mixture

F64 = torch.float64


def _t(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


def _gauss() -> Gaussians:
    one = _t(1.0)
    return Gaussians(_t(0.5), _t(0.01), _t(0.1), _t(0.01), one, torch.tensor(True),
                     torch.tensor(True))  # fmt: skip


CROSS = Mixture(_t(0.2), _t(0.4), _t(0.01), _t(0.0), _t(0.04))
INTRA = Mixture(_t(0.1), _t(0.7), _t(0.02), _t(0.2), _t(0.03))


def _with_both(g: Gaussians) -> Gaussians:
    return replace(
        g, prior=CROSS.prior, mixture=(CROSS.mu_fn, CROSS.var_fn, CROSS.mu_tn, CROSS.var_tn),
        intra=(INTRA.prior, INTRA.mu_fn, INTRA.var_fn, INTRA.mu_tn, INTRA.var_tn),
    )  # fmt: skip


def _density(v: torch.Tensor, mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    return torch.distributions.Normal(mu, var.sqrt()).log_prob(v).exp()


def test_log_likelihood_ratio_is_the_ratio_of_densities() -> None:
    """Invariant: Λ(v) = log N(v; μ_f, σ_f²) − log N(v; μ_t, σ_t²), checked against
    torch.distributions densities."""
    v = torch.linspace(-0.5, 0.9, 15, dtype=F64)
    f, t = _density(v, INTRA.mu_fn, INTRA.var_fn), _density(v, INTRA.mu_tn, INTRA.var_tn)
    want = torch.log(f / t)
    torch.testing.assert_close(log_likelihood_ratio(v, INTRA), want)


def test_posterior_of_each_signal_is_bayes_rule() -> None:
    """Invariant: sigmoid(L) is Bayes' rule with the signal's prior: cross and intra each with
    their own mixture; both = π_intra f_i f_c / (π_intra f_i f_c + (1 − π_intra) t_i t_c)
    (naive Bayes, the two signals independent given the class)."""
    g = _with_both(_gauss())
    s = torch.tensor([[0.1, 0.4], [0.3, -0.2]], dtype=F64)
    x = torch.tensor([[0.2, 0.8], [0.6, 0.5]], dtype=F64)
    fc, tc = _density(s, CROSS.mu_fn, CROSS.var_fn), _density(s, CROSS.mu_tn, CROSS.var_tn)
    fi, ti = _density(x, INTRA.mu_fn, INTRA.var_fn), _density(x, INTRA.mu_tn, INTRA.var_tn)
    pc, pi = CROSS.prior, INTRA.prior
    want = {
        "cross": pc * fc / (pc * fc + (1 - pc) * tc),
        "intra": pi * fi / (pi * fi + (1 - pi) * ti),
        "both": pi * fi * fc / (pi * fi * fc + (1 - pi) * ti * tc),
    }
    for signal, p in want.items():
        torch.testing.assert_close(pair_log_odds(signal, g, s, x).sigmoid(), p)


def test_downweighted_denominator_by_hand() -> None:
    """Invariant: downweight gives −log(e^{z⁺} / (e^{z⁺} + Σ_j w_j e^{z_j})) with
    w_j = 1 − P_j where P_j > ε and 1 elsewhere; eliminate equals plain cross-entropy over the
    candidates with the flagged ones removed."""
    z = torch.tensor([[2.0, 1.5, 0.5, -1.0]], dtype=F64)  # column 0 the positive
    positive = torch.tensor([[True, False, False, False]])
    p = torch.tensor([[0.9, 0.6, 0.3, 0.05]], dtype=F64)  # P_fn; the positive's is ignored
    log_odds = torch.log(p) - torch.log1p(-p)
    log_w, flagged = denominator_log_weights(log_odds, ~positive, "downweight", eps=0.2)
    assert flagged.tolist() == [[False, True, True, False]]
    w = [1.0, 0.4, 0.7, 1.0]
    denom = sum(wj * math.exp(zj) for wj, zj in zip(w, z[0].tolist(), strict=True))
    want = -(2.0 - math.log(denom))
    assert weighted_info_nce(z, positive, log_w).item() == pytest.approx(want, rel=1e-12)
    log_w, _ = denominator_log_weights(log_odds, ~positive, "eliminate", eps=0.2)
    kept = z[:, [0, 3]]
    want = F.cross_entropy(kept, torch.tensor([0])).item()
    assert weighted_info_nce(z, positive, log_w).item() == pytest.approx(want, rel=1e-12)


def test_histograms_feed_each_signals_fit() -> None:
    """Invariant: with fn_signal both, the stats vector holds the cross histogram then the
    intra one, and each fit recovers its own known mixture's π within 0.03 (well-separated
    components, 40,000 samples)."""
    gen = torch.Generator().manual_seed(0)
    n = 40_000

    def sample(prior: float, mu_f: float, mu_t: float) -> torch.Tensor:
        is_fn = torch.rand(n, generator=gen, dtype=F64) < prior
        v = torch.where(is_fn, mu_f, mu_t) + 0.08 * torch.randn(n, generator=gen, dtype=F64)
        return v.clamp(-1, 1)

    cross, intra = sample(0.3, 0.5, -0.1), sample(0.1, 0.8, 0.2)
    valid = torch.ones(n, dtype=torch.bool)
    hist = signal_histograms("both", cross, intra, valid)
    assert hist.shape == (histogram_bins("both"),) == (2 * HIST_BINS,)
    g = with_signals(_gauss(), hist, "both", 1e-8)
    assert g.prior is not None and g.intra is not None
    assert abs(float(g.prior) - 0.3) < 0.03 and abs(float(g.mixture[0]) - 0.5) < 0.03
    assert abs(float(g.intra[0]) - 0.1) < 0.03 and abs(float(g.intra[1]) - 0.8) < 0.03
    only = with_signals(_gauss(), signal_histograms("intra", cross, intra, valid), "intra", 1e-8)
    assert only.mixture is None and abs(float(only.intra[0]) - 0.1) < 0.03


def _pairs() -> tuple[Anchors, Candidates]:
    """Two anchors (ids 0, 1; groups 5, 6), four candidates: their own pairs, a group mate of
    anchor 0 whose image matches anchor 0's (id 2, group 5) and an unrelated one (id 3, group 7)."""
    e = torch.eye(4, dtype=F64)
    img = torch.stack([e[0], e[1], 0.9 * e[0] + 0.436 * e[2], e[3]])
    txt = torch.stack([e[0], e[1], e[2], e[3]])
    ids, groups = torch.tensor([0, 1, 2, 3]), torch.tensor([5, 6, 5, 7])
    a = Anchors(img[:2].clone(), txt[:2].clone(), ids[:2], torch.arange(2), groups[:2])
    return a, Candidates(img, txt, ids, 4, groups)


def test_fn_infonce_cancels_the_image_matched_group_mate() -> None:
    """Invariant: with fn_signal intra and eliminate, the candidate whose image matches the
    anchor's (intra 0.9, P_fn ≈ 1) leaves the denominator: the loss equals plain infonce over
    [batch ; memory] without that column for anchor 0; and "P_fn > ε" scores it as the one
    true false negative found (precision 1, recall 1: the only same-group candidate)."""
    a, c = _pairs()
    intra_only = replace(_gauss(), intra=(INTRA.prior, INTRA.mu_fn, INTRA.var_fn, INTRA.mu_tn,
                                          INTRA.var_tn))  # fmt: skip
    cfg = FneConfig(loss="infonce", fn_model="mixture", fn_signal="intra", infonce_fn="eliminate",
                    eps=0.5)  # fmt: skip
    temp = torch.tensor(0.5, dtype=F64)
    out = retrieval_loss(a, c, cfg, intra_only, temperature=temp)

    def ce(anchor: torch.Tensor, cands: torch.Tensor, pos: int, drop: list[int]) -> float:
        keep = [j for j in range(4) if j not in drop]
        logits = (anchor @ cands[keep].T / 0.5)[None]
        return F.cross_entropy(logits, torch.tensor([keep.index(pos)])).item()

    i2t = (ce(a.img_BD[0], c.txt_ND, 0, [2]) + ce(a.img_BD[1], c.txt_ND, 1, [])) / 2
    t2i = (ce(a.txt_BD[0], c.img_ND, 0, [2]) + ce(a.txt_BD[1], c.img_ND, 1, [])) / 2
    assert out.loss.item() == pytest.approx((i2t + t2i) / 2, rel=1e-9)
    d = out.diagnostics
    assert d["fnd_pfn_pred"].item() == 2 and d["fnd_pfn_tp"].item() == 2  # both directions
    assert d["fnd_n_actual"].item() == 2


def test_options_need_their_loss() -> None:
    """Invariant: infonce_fn without infonce + mixture, and a non-cross signal without the
    mixture, fail at load with one line naming the option."""
    with pytest.raises(ValueError, match="infonce_fn"):
        FneConfig(loss="fne", fn_model="mixture", infonce_fn="downweight").check()
    with pytest.raises(ValueError, match="fn_signal"):
        FneConfig(loss="fne", fn_signal="intra").check()
    FneConfig(loss="fne", fn_model="mixture", fn_signal="intra").check()
    FneConfig(loss="infonce", fn_model="mixture", fn_signal="both", infonce_fn="eliminate").check()


def test_sampler_weights_take_the_given_log_odds() -> None:
    """Invariant: with log-odds given (fn_signal intra | both) the FNE weight is
    exp(−τ_fn P_fn) where P_fn > ε (gate open) and the kernel exp(−τ_k (s − s⁺)²) elsewhere,
    zero at or below the hard cut μ⁺ − margin, whatever the quadratic in s would say."""
    from fne_dist.fne.weights import sampling_weights

    g = _gauss()  # μ⁺ 0.5, cut at 0.3
    cfg = FneConfig(fn_model="mixture", fn_signal="intra", eps=0.5, tau_fn=4.0, tau_kernel=0.5)
    sim = torch.tensor([[0.9, 0.45, 0.4, 0.2]], dtype=F64)  # column 0: the positive
    mask = torch.tensor([[True, False, False, False]])
    p = torch.tensor([[0.5, 0.95, 0.1, 0.99]], dtype=F64)
    w = sampling_weights(sim, sim[:, 0], mask, g, cfg, log_odds_BN=torch.log(p / (1 - p)))
    want = [0.0, math.exp(-4.0 * 0.95), math.exp(-0.5 * 0.5**2), 0.0]
    torch.testing.assert_close(w.w_BN[0], torch.tensor(want, dtype=F64))
    assert w.n_fn_B.tolist() == [2]  # columns 1 and 3 (the cut does not matter for the count)


def test_fne_sampler_with_intra_signal_flags_the_image_matched_mate() -> None:
    """Invariant: the fne sampler with fn_signal intra scores P_fn on the image-image
    similarity: the one group mate with a matching image is flagged in both directions
    (precision 1, recall 1), although its cross-modal similarity is 0."""
    a, c = _pairs()
    g = replace(_gauss(), intra=(INTRA.prior, INTRA.mu_fn, INTRA.var_fn, INTRA.mu_tn,
                                 INTRA.var_tn), has_mu_pos=torch.tensor(False))  # fmt: skip
    cfg = FneConfig(fn_model="mixture", fn_signal="intra", eps=0.5)
    uniforms = torch.full((2, 2, 1), 0.5, dtype=F64)
    out = retrieval_loss(a, c, cfg, g, uniforms)
    d = out.diagnostics
    assert d["fnd_pfn_pred"].item() == 2 and d["fnd_pfn_tp"].item() == 2
    assert d["fnd_n_actual"].item() == 2
    assert torch.isfinite(out.loss)

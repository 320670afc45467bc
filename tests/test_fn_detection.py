"""False-negative detection measured against group labels: hand-made cases with known answers,
the CPU (window-slot) form equal to the dense definition, and the loss diagnostics."""

from __future__ import annotations

import math

import pytest
import torch

from fne_dist.fne import Anchors, Candidates, FneConfig, retrieval_loss
from fne_dist.fne.detection import (
    COLUMNS,
    RELIABILITY_EDGES,
    dense_detection,
    dense_reliability,
    detection_rates,
    host_reliability,
)
from fne_dist.fne.rules import RULES
from fne_dist.fne.selection import (
    WINDOW_MAX_FRACTION,
    CandidateLabels,
    Rows,
    select_dense,
    select_listed,
)
from fne_dist.fne.stats import Gaussians


def _pooled(mu_pos: float, mu_neg: float, var: float) -> Gaussians:
    """Pooled Gaussians: with prior 0.5 the log-odds are (μ⁺−μ⁻)/σ² · (s − (μ⁺+μ⁻)/2)."""
    f = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return Gaussians(f(mu_pos), f(var), f(mu_neg), f(var), f(1000.0), f(1.0) > 0, f(1.0) > 0,
                     "pooled")  # fmt: skip


def _columns(row: torch.Tensor) -> dict[str, float]:
    return {key: float(v) for key, v in zip(COLUMNS, row, strict=True)}


def test_hand_made_detection_sums() -> None:
    """Invariant: the sums count, over unmasked candidates with known labels, the true false
    negatives (same group) and what each detector predicts. Anchor 0 (group 0), candidates
    s = [.9, .8, .55, .3, .2, .85] with groups [0, 1, 0, 0, -1, 0], column 5 its positive:
    evaluable 0-3, FNs {0, 2, 3}; P_fn > .5 ⇔ s > .5 → {0, 1, 2}; window s > .6 → {0, 1}.
    Anchor 1 has no label: it contributes nothing."""
    g = _pooled(0.8, 0.2, 0.01)
    cfg = FneConfig(prior=0.5, eps=0.5, margin=0.2)
    sim = torch.tensor([[0.9, 0.8, 0.55, 0.3, 0.2, 0.85]] * 2)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, 5] = True
    groups_b, cand_groups = torch.tensor([0, -1]), torch.tensor([0, 1, 0, 0, -1, 0])
    window = (sim > 0.6) & ~mask
    out = dense_detection(sim, mask, (groups_b, cand_groups), window, g, cfg, True)
    a0, a1 = _columns(out[0]), _columns(out[1])
    assert (a0["n_eval"], a0["n_actual"]) == (4, 3)
    assert (a0["pfn_pred"], a0["pfn_tp"]) == (3, 2)
    assert (a0["window_pred"], a0["window_tp"]) == (2, 1)
    # Reliability over the window {0, 1}: P_fn = sigmoid(60·0.4), sigmoid(60·0.3), both in
    # the last bin [0.5, 1]; one of the two is a true false negative.
    assert (a0["rel5_n"], a0["rel5_fn"]) == (2, 1)
    assert a0["rel5_p"] == pytest.approx(2.0, abs=1e-7)
    assert sum(a0[f"rel{r}_n"] for r in range(5)) == 0
    assert all(v == 0 for v in a1.values())
    rates = detection_rates({f"fnd_{k}": v for k, v in a0.items()})
    assert rates["pfn_precision"] == pytest.approx(2 / 3)
    assert rates["pfn_recall"] == pytest.approx(2 / 3)
    assert rates["window_precision"] == pytest.approx(1 / 2)
    assert rates["window_recall"] == pytest.approx(1 / 3)
    assert rates["fn_rate"] == pytest.approx(3 / 4)
    assert (rates["rel5_observed"], rates["rel5_count"]) == (0.5, 2)
    assert math.isnan(rates["rel0_predicted"])  # an empty bin has no rate


def test_reliability_bins_by_posterior() -> None:
    """Invariant: each in-window candidate lands in the bin of its P_fn; a calibrated
    posterior has observed ≈ predicted. Pooled log-odds 10(s − 0.5), prior 0.5: P_fn at
    s = 0.5 is 0.5 (last bin), at s = 0.1 is sigmoid(−4) ≈ 0.018 (bin [0.01, 0.1))."""
    g = _pooled(0.75, 0.25, 0.05)
    cfg = FneConfig(prior=0.5, eps=0.5)
    sim = torch.tensor([[0.5, 0.1, 0.1]])
    mask = torch.zeros(1, 3, dtype=torch.bool)
    out = _columns(dense_detection(sim, mask, (torch.tensor([2]), torch.tensor([2, 2, 3])),
                                   ~mask, g, cfg, True)[0])  # fmt: skip
    assert (out["rel5_n"], out["rel5_fn"]) == (1, 1)
    assert (out["rel3_n"], out["rel3_fn"]) == (2, 1)
    assert out["rel3_p"] == pytest.approx(2 * torch.sigmoid(torch.tensor(-4.0)).item(), rel=1e-5)


def _small_window_problem(seed: int):
    """Uniform similarities in [-0.9, 0.9], μ⁺ = 0.85 so the window (s > 0.65) holds ~14 % of
    the candidates (below the CPU form's limit): the window-slot form is the one used."""
    gen = torch.Generator().manual_seed(seed)
    b, n = 12, 500
    sim = (torch.rand(b, n, generator=gen, dtype=torch.float64) * 2 - 1) * 0.9
    ids = torch.arange(b) * 3
    cand_ids = torch.randint(0, 3 * b, (n,), generator=gen)
    pos_col = torch.randperm(n, generator=gen)[:b]
    cand_ids[pos_col] = ids
    sim[torch.arange(b), pos_col] = 0.9
    return (
        sim,
        ids,
        cand_ids,
        pos_col,
        torch.randint(-1, 4, (b,), generator=gen),
        (torch.randint(-1, 4, (n,), generator=gen)),
    )


@pytest.mark.parametrize("rule", ["fne", "window"])
@pytest.mark.parametrize("sd_neg", [0.05, 0.3])  # P_fn region inside the window, or not
def test_window_slot_form_equals_dense_definition(rule: str, sd_neg: float) -> None:
    """Invariant: the CPU form (sums from the window's slots plus label counts by binary
    search) reports exactly the dense definition's sums."""
    f = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    g = Gaussians(f(0.85), f(0.05**2), f(0.3), f(sd_neg**2), f(500.0), f(1) > 0, f(1) > 0)
    cfg = FneConfig(prior=0.01, eps=0.01)
    for seed in range(3):
        sim, ids, cand_ids, pos_col, g_b, g_n = _small_window_problem(seed)
        assert ((sim > 0.65).double().mean() < WINDOW_MAX_FRACTION).item()
        u = torch.rand(sim.shape[0], 1, generator=torch.Generator().manual_seed(seed))
        rows = Rows(sim, pos_col, ids, u.double(), detect_groups_b=g_b)
        args = (rows, CandidateLabels(cand_ids, g_n), g, cfg, RULES[rule])
        dense = select_dense(*args)
        listed = select_listed(*args)
        assert dense.detect_bF.shape == (sim.shape[0], len(COLUMNS))
        torch.testing.assert_close(listed.detect_bF, dense.detect_bF, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("window_share", [0.05, 0.3, 0.9])  # listed and keyed-in-full forms
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_host_reliability_is_bit_identical_to_the_dense_sums(
    window_share: float, dtype: torch.dtype
) -> None:
    """Invariant: the CPU reliability histogram gives the dense definition's float64 sums bit
    for bit (same values added in the same order; the dense form's outside slots add exact
    zeros), with P_fn on every bin edge, NaN and ±inf log-odds, many slots per bin and rows
    with no slot or every slot in the window."""
    gen = torch.Generator().manual_seed(0)
    b, n = 7, 3000
    edges = torch.tensor(RELIABILITY_EDGES[1:-1], dtype=torch.float64)
    at_edges = torch.logit(edges).repeat(n // len(edges) + 1)[:n]
    odds_bX = torch.randn(b, n, generator=gen, dtype=torch.float64) * 6 - 4
    odds_bX[1] = at_edges  # P_fn exactly on (the float of) each edge
    odds_bX[4, :3] = torch.tensor([math.nan, math.inf, -math.inf], dtype=torch.float64)
    odds_bX = odds_bX.to(dtype)
    in_win_bX = torch.rand(b, n, generator=gen) < window_share
    in_win_bX[2] = False  # a row with no slot in the window
    in_win_bX[3] = True
    in_win_bX[4, :3] = True
    same_bX = torch.rand(b, n, generator=gen) < 0.2
    dense = dense_reliability(odds_bX, in_win_bX, same_bX)
    host = host_reliability(odds_bX, in_win_bX, same_bX)
    assert dense.dtype == host.dtype == torch.float64 and dense.shape == host.shape
    assert torch.equal(host.nan_to_num(-1.0), dense.nan_to_num(-1.0))
    assert dense[2].abs().sum() == 0 and dense[:, :, 0].sum() == in_win_bX.sum()


def _batch(groups: bool, b: int = 6, d: int = 8):
    gen = torch.Generator().manual_seed(0)
    norm = torch.nn.functional.normalize
    img, txt = (
        norm(torch.randn(b, d, generator=gen), dim=1),
        norm(torch.randn(b, d, generator=gen), dim=1),
    )
    ids = torch.arange(b)
    grp = torch.tensor([0, 0, 1, 1, -1, -1]) if groups else None
    return Anchors(img, txt, ids, torch.arange(b), grp), Candidates(img, txt, ids, b, grp)


@pytest.mark.parametrize("loss", ["fne", "window", "vse_pp"])
def test_loss_reports_detection_sums_only_with_groups(loss: str) -> None:
    """Invariant: the detection sums appear in the diagnostics only when group labels exist
    and the rule has a window (fne, window); unlabelled anchors (−1) share no group, so the
    share of sampled group mates counts labelled draws only."""
    f = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    g = Gaussians(f(0.5), f(0.01), f(0.0), f(0.01), f(500.0), f(1) > 0, f(1) > 0)
    cfg = FneConfig(loss=loss)
    u = torch.rand(2, 6, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with_groups = retrieval_loss(*_batch(True), cfg, g, u).diagnostics
    without = retrieval_loss(*_batch(False), cfg, g, u).diagnostics
    assert not any(k.startswith("fnd_") for k in without)
    has = {k[4:] for k in with_groups if k.startswith("fnd_")}
    no_posterior = {c for c in COLUMNS if not c.startswith(("pfn_", "rel"))}
    assert has == {"fne": set(COLUMNS), "window": no_posterior, "vse_pp": set()}[loss]
    assert 0.0 <= float(with_groups["frac_neg_same_group"]) <= 1.0
    if loss != "vse_pp":
        # 4 labelled anchors × 2 directions; each sees 1 labelled group mate (not masked).
        assert float(with_groups["fnd_n_actual"]) == 8.0
        assert float(with_groups["fnd_n_eval"]) == 8 * 3.0


def test_unlabelled_anchors_skip_the_passes_with_the_definitions_sums() -> None:
    """Invariant: a chunk whose anchors carry no group label (data without groups) returns,
    without its b×N passes, exactly the definition's sums (``detection_sums`` over the
    evaluable slots: all 0), and the loss still reports every detection column."""
    from fne_dist.fne.detection import detection_sums, evaluable, known_unlabelled
    from fne_dist.fne.groups import same_group

    f = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    g = Gaussians(f(0.85), f(0.05**2), f(0.3), f(0.3**2), f(500.0), f(1) > 0, f(1) > 0)
    cfg = FneConfig(prior=0.01, eps=0.01)
    sim, _, cand_ids, _, g_b, g_n = _small_window_problem(0)
    g_b = torch.full_like(g_b, -1)
    assert known_unlabelled(g_b) and not known_unlabelled(g_b.clone().fill_(2))
    # off the host it answers without reading a value (a meta tensor has none to read)
    assert not known_unlabelled(torch.full((3,), -1, device="meta"))
    mask = cand_ids[None, :] == cand_ids[:1, None]
    window = sim > 0.65
    got = dense_detection(sim, mask, (g_b, g_n), window, g, cfg, True)
    same = same_group(g_b[:, None], g_n[None, :])
    want = detection_sums(sim, evaluable(g_b, g_n, mask), same, window, g, cfg, True)
    assert torch.equal(got, want) and got.dtype == want.dtype and not got.any()
    a, c = _batch(True)
    a.groups_B, c.groups_N = torch.full((6,), -1), torch.full((6,), -1)
    u = torch.rand(2, 6, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    diag = retrieval_loss(a, c, FneConfig(), g, u).diagnostics
    assert {k[4:] for k in diag if k.startswith("fnd_")} == set(COLUMNS)
    assert all(float(v) == 0.0 for k, v in diag.items() if k.startswith("fnd_"))

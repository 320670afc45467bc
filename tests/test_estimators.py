"""The statistics option beside the paper's (all_pairs) against plain computations, the random
candidate sample it shares with the mixture posteriors, and their mergeability over ranks."""

from __future__ import annotations

import pytest
import torch

from fne_dist.fne import FneConfig, SimilarityStats, gaussians_from_stats, stats_of
from fne_dist.fne.estimators import all_pairs_stats, random_candidate_sims, sample_columns
from fne_dist.fne.posteriors import CandidateSample, posterior_for

MU_POS, SD_POS, MU_NEG, SD_NEG = 0.8, 0.05, 0.3, 0.1


def _components(n: int = 5000):
    """Gaussians fitted to large samples of the two components (the gate open)."""
    gen = torch.Generator().manual_seed(99)
    pos = MU_POS + SD_POS * torch.randn(n, generator=gen, dtype=torch.float64)
    neg = MU_NEG + SD_NEG * torch.randn(n, generator=gen, dtype=torch.float64)
    return stats_of(pos, neg)


def test_all_pairs_stats_equal_plain_lists() -> None:
    """Invariant: all_pairs positives are every same-id entry of the in-batch matrix (diagonal
    included) and negatives exactly the valid random samples: the six sums equal stats_of on
    lists built by plain loops."""
    gen = torch.Generator().manual_seed(0)
    sim = torch.rand(6, 6, generator=gen, dtype=torch.float64)
    ids = torch.tensor([0, 0, 1, 2, 2, 2])
    neg = torch.rand(20, generator=gen, dtype=torch.float64)
    valid = torch.rand(20, generator=gen) < 0.6
    pos_list = [sim[i, j] for i in range(6) for j in range(6) if ids[i] == ids[j]]
    neg_list = [neg[k] for k in range(20) if valid[k]]
    expected = stats_of(torch.stack(pos_list), torch.stack(neg_list))
    torch.testing.assert_close(all_pairs_stats(sim, ids, neg, valid), expected)


def test_random_negatives_fit_the_candidate_population_not_the_hardest() -> None:
    """Invariant (why all_pairs exists): with dense false negatives, the random-sample μ⁻
    is the mean similarity of a random candidate, far below the positives' mean, while the
    paper's hardest-negative μ⁻ sits next to μ⁺. Ten classes; an embedding is its class
    centre plus noise, so a tenth of the candidates are false negatives."""
    gen = torch.Generator().manual_seed(3)
    b, n, d = 64, 512, 32
    centres = torch.nn.functional.normalize(torch.randn(10, d, generator=gen), dim=1)
    cls_b, cls_n = torch.arange(b) % 10, torch.randint(0, 10, (n,), generator=gen)
    noisy = lambda c: torch.nn.functional.normalize(  # noqa: E731
        centres[c] + 0.15 * torch.randn(len(c), d, generator=gen), dim=1
    )
    img, txt, cand = noisy(cls_b), noisy(cls_b), noisy(cls_n)
    ids, cand_ids = torch.arange(b), 1000 + torch.arange(n)
    cols = sample_columns(0, 0, b, 8, n)
    sims, valid = random_candidate_sims(img, txt, ids, cand, cand, cand_ids, cols)
    g_all = gaussians_from_stats(all_pairs_stats(img @ txt.T, ids, sims, valid))
    from fne_dist.fne import mutual_top1_stats

    g_paper = gaussians_from_stats(mutual_top1_stats(img @ txt.T, ids))
    true_mean = float((img @ cand.T).mean())
    assert abs(float(g_all.mu_neg) - true_mean) < 0.05
    assert float(g_paper.mu_pos - g_paper.mu_neg) < 0.1  # the paper's Gaussians coincide
    assert float(g_all.mu_pos - g_all.mu_neg) > 0.5


def test_sampled_sums_add_up_over_ranks() -> None:
    """Invariant (distributed exactness): rank r's random columns are rows r·B.. of the
    global draw, so the negative sums and the mixture posteriors' histograms of two ranks × B
    add up to one rank × 2B exactly (what the all-reduce SUM relies on)."""
    gen = torch.Generator().manual_seed(5)
    big, n, d = 8, 30, 6
    img, txt = torch.randn(big, d, generator=gen), torch.randn(big, d, generator=gen)
    cand_img, cand_txt = torch.randn(n, d, generator=gen), torch.randn(n, d, generator=gen)
    ids, cand_ids = torch.arange(big), torch.randint(-100, big, (n,), generator=gen)
    posteriors = [posterior_for(FneConfig(posterior=p)) for p in ("cross_mixture", "intra_mixture")]
    whole_cols = sample_columns(3, 7, big, 4, n)
    whole = random_candidate_sims(img, txt, ids, cand_img, cand_txt, cand_ids, whole_cols)
    whole_sample = CandidateSample(*whole, img, cand_img, whole_cols)
    parts_neg, parts_hist = [], []
    for rank in range(2):
        rows = slice(rank * 4, rank * 4 + 4)
        cols = sample_columns(3, 7, big, 4, n, rank, 4)
        assert torch.equal(cols, whole_cols[:, rows])
        sims, valid = random_candidate_sims(
            img[rows], txt[rows], ids[rows], cand_img, cand_txt, cand_ids, cols
        )
        parts_neg.append(all_pairs_stats(torch.zeros(1, 1), ids[:1], sims, valid)[3:])
        sample = CandidateSample(sims, valid, img[rows], cand_img, cols)
        parts_hist.append(torch.cat([p.sums(sample) for p in posteriors]))
    torch.testing.assert_close(
        parts_neg[0] + parts_neg[1], all_pairs_stats(torch.zeros(1, 1), ids[:1], *whole)[3:]
    )
    whole_hist = torch.cat([p.sums(whole_sample) for p in posteriors])
    torch.testing.assert_close(parts_hist[0] + parts_hist[1], whole_hist)


def test_stats_state_round_trip_and_old_checkpoints() -> None:
    """Invariant: the posterior's running sums are saved and restored; a state written with
    the retired prior_mode's EM sums, or before the mixtures existed, still loads."""
    stats = SimilarityStats()
    stats.add_posterior(torch.tensor([10.0, 1.0], dtype=torch.float64), 0.9)
    fresh = SimilarityStats()
    fresh.load_state_dict(stats.state_dict())
    assert torch.equal(fresh.posterior_totals, stats.posterior_totals)
    old = {k: v for k, v in stats.state_dict().items() if k != "mix_totals"}
    SimilarityStats().load_state_dict(old | {"em_totals": torch.zeros(2, dtype=torch.float64)})


def test_config_options_and_defaults() -> None:
    """Invariant: the faithful estimator stays the default; the options validate."""
    from fne_dist.config import ConfigError, config_from_dict

    cfg = FneConfig()
    assert (cfg.stats_source, cfg.posterior) == ("mutual_top1", "paper")
    ok = config_from_dict({"fne": {"stats_source": "all_pairs", "posterior": "intra_mixture"}})
    assert ok.fne.posterior == "intra_mixture"
    with pytest.raises(ConfigError, match="posterior"):
        config_from_dict({"fne": {"posterior": "bayes"}})


@pytest.mark.parametrize(
    "source,posterior",
    [("all_pairs", "paper"), ("mutual_top1", "intra_mixture"), ("all_pairs", "cross_mixture")],
)
def test_forward_step_with_each_option(source: str, posterior: str) -> None:
    """Invariant: the training step runs with each option at world size 1, adds the sums it
    documents (all_pairs: every same-id pair of the batch as a positive, B·r·2 random
    negatives at most; a mixture posterior: one histogram of the valid sampled candidates)
    and reports the fitted posterior's parameters."""
    from fne_dist.config import ModelConfig
    from fne_dist.memory import MomentumMemory
    from fne_dist.model import DualEncoder
    from fne_dist.momentum import make_momentum_copy
    from fne_dist.step import StepPosition, forward_step

    torch.manual_seed(0)
    model = DualEncoder(None, None, 6, 6, ModelConfig(embed_dim=4, head="linear"))
    momentum, memory = make_momentum_copy(model), MomentumMemory(20, 4, seed=0)
    stats = SimilarityStats()
    stats.add(_components())  # an open gate
    cfg = FneConfig(stats_source=source, posterior=posterior, stats_samples=3, gate_size=10)
    gen = torch.Generator().manual_seed(1)
    batch = {
        "img_feat": torch.randn(8, 6, generator=gen),
        "txt_feat": torch.randn(8, 6, generator=gen),
        "ids": torch.tensor([0, 0, 1, 2, 3, 4, 5, 6]),
        "groups": torch.tensor([0, 0, 0, 1, 1, 2, 2, -1]),
    }
    before = stats.totals.clone()
    out = forward_step(model, momentum, batch, memory, stats, cfg, StepPosition(0, 0, False))
    assert torch.equal(stats.totals, before) and stats.posterior_totals.numel() == 0
    stats.add_step(out.stat_sums, cfg.mixture_decay)  # the step changed nothing: commit it
    added = stats.totals - before
    if source == "all_pairs":
        assert float(added[0]) == 8 + 2  # the diagonal and the two same-id entries
        assert 0 < float(added[3]) <= 8 * 3 * 2
    mixture = posterior != "paper"
    assert (stats.posterior_totals.numel() > 0) == mixture
    if mixture:
        assert 0 < float(stats.posterior_totals.sum()) <= 8 * 3 * 2
    key = {"paper": None, "cross_mixture": "prior", "intra_mixture": "prior_intra"}[posterior]
    assert key is None or 0 < float(out.diagnostics[key]) <= 0.5
    assert torch.isfinite(out.loss)

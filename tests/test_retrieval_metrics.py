"""Retrieval ranks and recall: hand-checked cases, a plain-loop reference, folds, invariances."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fne_dist.retrieval_metrics as rm
from fne_dist.retrieval_metrics import (
    fold_metrics,
    ranks_i2t,
    ranks_t2i,
    recall_at,
    retrieval_metrics,
)

STRICT_KEYS = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"]
GROUP_KEYS = ["group_" + k for k in STRICT_KEYS]


# ---------------------------------------------------------------------------------------------
# plain-Python reference: sorted lists, a different algorithm from the vectorised one


def _sorted_relevance(scores: list[float], relevant: list[bool], ties: str) -> list[bool]:
    """Relevance of the candidates once sorted by descending score; among equal scores the
    irrelevant items come first (pessimistic) or last (optimistic): the tie rules, reached
    here by sorting, not by counting."""
    first = (lambda c: relevant[c]) if ties == "pessimistic" else (lambda c: not relevant[c])
    order = sorted(range(len(scores)), key=lambda c: (-scores[c], first(c)))
    return [relevant[c] for c in order]


def _rank_by_sorting(scores: list[float], relevant: list[bool], ties: str = "pessimistic") -> int:
    """Position of the first relevant item once sorted."""
    return _sorted_relevance(scores, relevant, ties).index(True)


def _ap_by_sorting(scores: list[float], relevant: list[bool], ties: str = "pessimistic") -> float:
    """Average precision: mean over the relevant items of the precision at their position."""
    rel = _sorted_relevance(scores, relevant, ties)
    hits = [sum(rel[: pos + 1]) / (pos + 1) for pos, r in enumerate(rel) if r]
    return sum(hits) / len(hits)


def _reference_ranks(
    sim: list[list[float]],
    t2i: list[int],
    groups: list[int] | None = None,
    ties: str = "pessimistic",
    of=_rank_by_sorting,
) -> tuple[list, list]:
    """(image→text, text→image) ranks (or ``of`` = AP) of every query; relevance by group when
    ``groups`` is given (a negative label: relevant only to itself)."""
    imgs, txts = range(len(sim)), range(len(t2i))
    key = list(imgs) if groups is None else [g if g >= 0 else -1 - i for i, g in enumerate(groups)]
    i2t = [of(sim[i], [key[t2i[t]] == key[i] for t in txts], ties) for i in imgs]
    t2i_ranks = [
        of([sim[i][t] for i in imgs], [key[i] == key[t2i[t]] for i in imgs], ties) for t in txts
    ]
    return i2t, t2i_ranks


def _reference_recall(ranks: list[int], k: int) -> float:
    return 100.0 * sum(r < k for r in ranks) / len(ranks)


@st.composite
def benchmarks(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sim_IT, text_to_image_T, groups_I): 1-7 captions per image, shuffled caption order,
    scores on a coarse grid so that ties are frequent, random groups (some unlabelled)."""
    counts = draw(st.lists(st.integers(1, 7), min_size=1, max_size=6))
    seed = draw(st.integers(0, 2**31 - 1))
    levels = draw(st.sampled_from([3, 5, 1000]))  # 3 levels: ties everywhere
    gen = torch.Generator().manual_seed(seed)
    t2i_T = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    t2i_T = t2i_T[torch.randperm(t2i_T.numel(), generator=gen)]
    sim_IT = torch.randint(0, levels, (len(counts), t2i_T.numel()), generator=gen) / levels
    groups_I = torch.randint(-1, 3, (len(counts),), generator=gen)  # -1: no group label
    return sim_IT, t2i_T, groups_I


# ---------------------------------------------------------------------------------------------
# hand-made case: 4 images with 1, 5, 6 and 7 captions (T = 19)
#
# captions: image 0 → {0}; image 1 → {1..5}; image 2 → {6..11}; image 3 → {12..18}.
# Scores: ground truth 0.5, background 0.1, "distractors" 0.9; caption 5's ground truth is 0.05
# (below the background: image 1's ranking must use its *best* caption, not every caption).
DISTRACTORS = {0: [], 1: [0, 6, 12], 2: [0, 1, 2, 3, 12, 13, 14], 3: list(range(12))}


def _hand_made() -> tuple[torch.Tensor, torch.Tensor]:
    t2i_T = torch.tensor([0] + [1] * 5 + [2] * 6 + [3] * 7)
    sim_IT = torch.full((4, 19), 0.1)
    sim_IT[t2i_T, torch.arange(19)] = 0.5
    sim_IT[1, 5] = 0.05
    for i, cols in DISTRACTORS.items():
        sim_IT[i, cols] = 0.9
    return sim_IT, t2i_T


def test_hand_made_strict_ranks_and_recall() -> None:
    """Invariant: image rank = #captions above its best ground truth (any number of captions per
    image); caption rank = #images above its own image."""
    sim_IT, t2i_T = _hand_made()
    # image→text: one distractor list per image, all above 0.5 → rank = its length.
    assert ranks_i2t(sim_IT, t2i_T).tolist() == [0, 3, 7, 12]
    # text→image: rank = #other images that used the caption as a distractor (0.9 > 0.5);
    # caption 5 (gt 0.05) loses to all three other images (0.1, 0.1, 0.9).
    expected_t2i = [3, 2, 2, 2, 1, 3, 2, 1, 1, 1, 1, 1, 2, 1, 1, 0, 0, 0, 0]
    assert ranks_t2i(sim_IT, t2i_T).tolist() == expected_t2i
    m = retrieval_metrics(sim_IT, t2i_T)
    assert m["i2t_r1"] == 100 * 1 / 4  # rank 0 only
    assert m["i2t_r5"] == 100 * 2 / 4  # ranks 0, 3
    assert m["i2t_r10"] == 100 * 3 / 4  # ranks 0, 3, 7
    # 4 captions at rank 0 (15..18); every caption has rank ≤ 3 < 5.
    assert m["t2i_r1"] == 100 * 4 / 19
    assert m["t2i_r5"] == m["t2i_r10"] == 100.0
    # Finer cutoffs over the 4 candidate images: 4 + 8 (rank 1) + 5 (rank 2) + 2 (rank 3).
    assert recall_at(ranks_t2i(sim_IT, t2i_T), ks=(2, 3, 4)) == {
        2: 100 * 12 / 19,
        3: 100 * 17 / 19,
        4: 100.0,
    }


def test_hand_made_group_ranks() -> None:
    """Invariant: with groups, any caption (image) of the same group counts as a hit, and a
    distractor tied with the best hit does not push it down."""
    sim_IT, t2i_T = _hand_made()
    groups_I = torch.tensor([0, 1, 1, 2])  # images 1 and 2 share a group
    m = retrieval_metrics(sim_IT, t2i_T, groups_I)
    # image→text: image 1 now hits caption 6 (0.9), tied by distractors 0 and 12 (rank 2);
    # image 2 hits captions 1-3 (0.9), tied by distractors 0, 12, 13, 14 (rank 4); images 0
    # and 3 are alone in their group → ranks [0, 2, 4, 12]. Optimistic: [0, 0, 0, 12].
    assert (m["group_i2t_r1"], m["group_i2t_r5"]) == (100 * 1 / 4, 100 * 3 / 4)
    assert (m["group_i2t_r1_optimistic"], m["group_i2t_r10_optimistic"]) == (75.0, 75.0)
    # text→image, rank 0: captions 15-18 only (4); captions 1-3 and 6 hit a group image at
    # 0.9 but image 3 ties it (0.9) and ranks ahead: rank 1, like 4, 7-11, 13, 14 (12 in all);
    # rank 2: caption 12, and caption 5 (its best group image scores 0.1, tied by image 0's
    # 0.1); rank 3: caption 0. Optimistic: the 4 tied captions move to rank 0, 5 to rank 1.
    assert m["group_t2i_r1"] == 100 * 4 / 19
    assert m["group_t2i_r1_optimistic"] == 100 * 8 / 19
    assert m["group_t2i_r5"] == 100.0
    g_i2t, g_t2i = rm._group_ranks(sim_IT, t2i_T, groups_I, "pessimistic")
    assert g_i2t.tolist() == [0, 2, 4, 12]
    assert recall_at(g_t2i, (2, 3)) == {2: 100 * 16 / 19, 3: 100 * 18 / 19}
    assert rm._group_ranks(sim_IT, t2i_T, groups_I, "optimistic")[1][5] == 1
    # The strict metrics are unchanged by passing groups.
    assert {k: v for k, v in m.items() if not k.startswith("group_")} == retrieval_metrics(
        sim_IT, t2i_T
    )


def test_ties_count_against_the_ground_truth() -> None:
    """Invariant (headline tie rule): a distractor tied with the match ranks ahead of it, so an
    all-equal row ranks every query last among its distractors; the optimistic rule counts only
    strictly higher scores (every query first)."""
    sim_IT = torch.zeros(3, 4)
    t2i_T = torch.tensor([0, 1, 2, 2])
    # image 2 has 2 ground truths: the other 2 captions tie; images 0, 1: 3 others tie.
    assert ranks_i2t(sim_IT, t2i_T).tolist() == [3, 3, 2]
    assert ranks_t2i(sim_IT, t2i_T).tolist() == [2, 2, 2, 2]
    assert ranks_i2t(sim_IT, t2i_T, ties="optimistic").tolist() == [0, 0, 0]
    assert ranks_t2i(sim_IT, t2i_T, ties="optimistic").tolist() == [0, 0, 0, 0]
    sim_IT[0, 0] = 1e-6  # image 0 now beats every other caption and image
    assert ranks_i2t(sim_IT, t2i_T).tolist() == [0, 3, 2]
    assert ranks_t2i(sim_IT, t2i_T).tolist() == [0, 2, 2, 2]
    m = retrieval_metrics(sim_IT, t2i_T)
    assert m["i2t_r1"] == 100 / 3 and m["i2t_r1_optimistic"] == 100.0


def test_identical_captions_are_not_all_first() -> None:
    """Invariant: N images each with one caption, all captions embedded identically (the same
    sentence): pessimistic text→image R@1 is 0 and image→text R@1 is 0 (every caption ties),
    not the 100 the optimistic rule reports; a plain loop agrees."""
    n = 10
    gen = torch.Generator().manual_seed(0)
    img_ND = torch.nn.functional.normalize(torch.randn(n, 8, generator=gen), dim=1)
    txt_D = torch.nn.functional.normalize(torch.randn(8, generator=gen), dim=0)
    # Every caption column is the same vector of scores (a blocked matmul could round the
    # identical columns differently, which is not what this test is about).
    sim_IT, t2i_T = (img_ND @ txt_D)[:, None].expand(n, n).contiguous(), torch.arange(n)
    m = retrieval_metrics(sim_IT, t2i_T)
    assert m["i2t_r1"] == 0.0 and m["i2t_r1_optimistic"] == 100.0
    ref_i2t, ref_t2i = _reference_ranks(sim_IT.tolist(), t2i_T.tolist())
    assert ranks_i2t(sim_IT, t2i_T).tolist() == ref_i2t == [n - 1] * n
    assert ranks_t2i(sim_IT, t2i_T).tolist() == ref_t2i


# ---------------------------------------------------------------------------------------------
# agreement with the plain loop


@settings(max_examples=150, deadline=None)
@given(benchmarks())
def test_vectorised_matches_sorted_list_reference(
    bench: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> None:
    """Invariant: strict and group ranks and every R@K equal a per-query sort of plain lists,
    for any captions-per-image layout and frequent ties."""
    sim_IT, t2i_T, groups_I = bench
    sim, t2i, groups = sim_IT.tolist(), t2i_T.tolist(), groups_I.tolist()
    m = retrieval_metrics(sim_IT, t2i_T, groups_I)
    for ties, suffix in (("pessimistic", ""), ("optimistic", "_optimistic")):
        ref_i2t, ref_t2i = _reference_ranks(sim, t2i, ties=ties)
        ref_gi2t, ref_gt2i = _reference_ranks(sim, t2i, groups, ties)
        assert ranks_i2t(sim_IT, t2i_T, ties).tolist() == ref_i2t
        assert ranks_t2i(sim_IT, t2i_T, ties).tolist() == ref_t2i
        # Group metrics average over the labelled queries only.
        lab_i = [g >= 0 for g in groups]
        ref_gi2t = [r for r, ok in zip(ref_gi2t, lab_i, strict=True) if ok]
        ref_gt2i = [r for r, t in zip(ref_gt2i, t2i, strict=True) if lab_i[t]]
        for k in (1, 5, 10):
            assert m[f"i2t_r{k}{suffix}"] == _reference_recall(ref_i2t, k)
            assert m[f"t2i_r{k}{suffix}"] == _reference_recall(ref_t2i, k)
            if ref_gi2t:
                assert m[f"group_i2t_r{k}{suffix}"] == _reference_recall(ref_gi2t, k)
                assert m[f"group_t2i_r{k}{suffix}"] == _reference_recall(ref_gt2i, k)
        if not ref_gi2t:  # no label at all: every group metric is NaN (not measured)
            assert all(math.isnan(v) for key, v in m.items() if key.startswith("group_"))
            continue
        ap_i, ap_t = _reference_ranks(sim, t2i, groups, ties, of=_ap_by_sorting)
        ap_i = [a for a, ok in zip(ap_i, lab_i, strict=True) if ok]
        ap_t = [a for a, t in zip(ap_t, t2i, strict=True) if lab_i[t]]
        assert m[f"group_i2t_map{suffix}"] == pytest.approx(100 * sum(ap_i) / len(ap_i))
        assert m[f"group_t2i_map{suffix}"] == pytest.approx(100 * sum(ap_t) / len(ap_t))


def test_group_map_hand_made_with_ties() -> None:
    """Invariant: group AP by hand. Image 0 (group 0) over captions scored [.9, .5, .5, .1],
    relevant (group 0) = captions 0 and 2: pessimistic puts the tied irrelevant caption 1 ahead
    of caption 2 → AP = (1/1 + 2/3)/2; optimistic → (1/1 + 2/2)/2."""
    sim_IT = torch.tensor([[0.9, 0.5, 0.5, 0.1], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    t2i_T = torch.tensor([0, 1, 2, 1])  # caption 2 is image 2's, image 2 is in group 0
    groups_I = torch.tensor([0, 1, 0])
    ap_i, _ = rm._group_ap(sim_IT, t2i_T, groups_I, "pessimistic")
    assert ap_i[0].item() == pytest.approx((1 + 2 / 3) / 2)
    ap_i, _ = rm._group_ap(sim_IT, t2i_T, groups_I, "optimistic")
    assert ap_i[0].item() == pytest.approx(1.0)


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_row_blocks_do_not_change_ranks(chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Invariant: the row blocking that bounds memory (1,024 rows in production) is invisible:
    tiny blocks with a ragged last block give the reference ranks."""
    monkeypatch.setattr(rm, "_CHUNK_ROWS", chunk)
    gen = torch.Generator().manual_seed(chunk)
    t2i_T = torch.randperm(40, generator=gen) % 7  # 7 images, 5-6 captions each
    sim_IT = torch.randint(0, 4, (7, 40), generator=gen) / 4
    groups_I = torch.tensor([0, 1, 0, 2, 1, 3, 0])
    ref_i2t, ref_t2i = _reference_ranks(sim_IT.tolist(), t2i_T.tolist())
    ref_g = _reference_ranks(sim_IT.tolist(), t2i_T.tolist(), groups_I.tolist())
    assert ranks_i2t(sim_IT, t2i_T).tolist() == ref_i2t
    assert ranks_t2i(sim_IT, t2i_T).tolist() == ref_t2i
    m = retrieval_metrics(sim_IT, t2i_T, groups_I, ks=(1, 2, 3))
    for k in (1, 2, 3):
        assert m[f"group_i2t_r{k}"] == _reference_recall(ref_g[0], k)
        assert m[f"group_t2i_r{k}"] == _reference_recall(ref_g[1], k)


# ---------------------------------------------------------------------------------------------
# group-aware recall vs strict recall


@settings(max_examples=100, deadline=None)
@given(benchmarks())
def test_group_recall_bounds_strict_recall(
    bench: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> None:
    """Invariant: group recall ≥ strict recall (a ground truth is always in its own group), and
    equal when every image is its own group."""
    sim_IT, t2i_T, groups_I = bench
    groups_I = groups_I.clamp_min(0)  # every query labelled: the same queries both ways
    m = retrieval_metrics(sim_IT, t2i_T, groups_I)
    for key in STRICT_KEYS:
        assert m["group_" + key] >= m[key]
    assert m["group_rsum"] >= m["rsum"]
    own = retrieval_metrics(sim_IT, t2i_T, torch.arange(sim_IT.shape[0]) * 10 + 3)
    for key in [*STRICT_KEYS, "rsum"]:
        assert own["group_" + key] == own[key]


# ---------------------------------------------------------------------------------------------
# COCO 1K fold protocol


def test_folds_average_per_fold_metrics() -> None:
    """Invariant: fold_metrics on two blocks of images (captions interleaved in caption order)
    is the mean of retrieval_metrics on each block with only its own captions."""
    gen = torch.Generator().manual_seed(0)
    fold = 3
    t2i_T = torch.randperm(20, generator=gen) % 6  # 6 images, 3-4 captions each, shuffled
    sim_IT = torch.rand(6, 20, generator=gen)
    groups_I = torch.tensor([0, 0, 1, 1, 2, 0])
    per_fold = []
    for lo in (0, fold):
        cols = ((t2i_T >= lo) & (t2i_T < lo + fold)).nonzero().flatten()
        per_fold.append(
            retrieval_metrics(
                sim_IT[lo : lo + fold][:, cols], t2i_T[cols] - lo, groups_I[lo : lo + fold]
            )
        )
    got = fold_metrics(sim_IT, t2i_T, groups_I, fold_size=fold)
    assert got.keys() == per_fold[0].keys()
    for key, value in got.items():
        assert value == pytest.approx((per_fold[0][key] + per_fold[1][key]) / 2)
    # One fold holding everything is the plain metric.
    assert fold_metrics(sim_IT, t2i_T, groups_I, fold_size=6) == retrieval_metrics(
        sim_IT, t2i_T, groups_I
    )


def test_folds_ignore_cross_fold_distractors() -> None:
    """Invariant: a fold ranks only against its own captions and images, so strong
    cross-fold distractors change the full metric but not the fold metric."""
    t2i_T = torch.tensor([0, 1, 2, 3])
    sim_IT = torch.eye(4) * 0.5
    sim_IT[0, 3] = sim_IT[3, 0] = 0.9  # image 0 ↔ caption 3 lie in different folds
    assert fold_metrics(sim_IT, t2i_T, fold_size=2)["rsum"] == 600.0
    assert retrieval_metrics(sim_IT, t2i_T)["rsum"] < 600.0


@pytest.mark.parametrize("fold_size", [4, 5, 7])
def test_folds_reject_uneven_split(fold_size: int) -> None:
    """Invariant: a number of images that is not a multiple of the fold size is an error,
    not a silently dropped or short fold."""
    sim_IT, t2i_T = torch.rand(6, 6), torch.arange(6)
    with pytest.raises(ValueError, match="not a multiple of fold_size"):
        fold_metrics(sim_IT, t2i_T, fold_size=fold_size)


# ---------------------------------------------------------------------------------------------
# invariances and the perfect case


@settings(max_examples=60, deadline=None)
@given(benchmarks(), st.integers(0, 2**31 - 1))
def test_permuting_captions_or_images_changes_nothing(
    bench: tuple[torch.Tensor, torch.Tensor, torch.Tensor], seed: int
) -> None:
    """Invariant: reordering captions (columns + text_to_image) or images (rows, groups, and the
    indices in text_to_image) leaves every metric unchanged, ties included."""
    sim_IT, t2i_T, groups_I = bench
    n_img, n_txt = sim_IT.shape
    gen = torch.Generator().manual_seed(seed)
    base = retrieval_metrics(sim_IT, t2i_T, groups_I)
    perm_T = torch.randperm(n_txt, generator=gen)
    # mAP is a float mean over queries: equal up to the order of the summation.
    base = pytest.approx(base, rel=1e-12, nan_ok=True)
    assert retrieval_metrics(sim_IT[:, perm_T], t2i_T[perm_T], groups_I) == base
    perm_I = torch.randperm(n_img, generator=gen)  # new row r holds old image perm_I[r]
    new_index_I = torch.argsort(perm_I)  # old image → its new row
    assert retrieval_metrics(sim_IT[perm_I], new_index_I[t2i_T], groups_I[perm_I]) == base


@pytest.mark.parametrize("counts", [[1, 1, 1], [5, 5, 5, 5], [1, 5, 6, 7]])
def test_perfect_similarity_scores_100(counts: list[int]) -> None:
    """Invariant: scores that single out each caption's image give 100 everywhere, rsum 600."""
    t2i_T = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    sim_IT = torch.nn.functional.one_hot(t2i_T, len(counts)).T.float()
    m = retrieval_metrics(sim_IT, t2i_T, torch.zeros(len(counts), dtype=torch.long))
    assert all(m[k] == 100.0 for k in STRICT_KEYS + GROUP_KEYS)
    assert m["rsum"] == m["group_rsum"] == 600.0


@settings(max_examples=30, deadline=None)
@given(benchmarks())
def test_rsum_is_the_sum_of_the_six_recalls(
    bench: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> None:
    """Invariant: rsum (group_rsum) is exactly the sum of the six strict (group) recalls."""
    m = retrieval_metrics(*bench)
    assert m["rsum"] == pytest.approx(sum(m[k] for k in STRICT_KEYS))
    if not math.isnan(m["group_rsum"]):
        assert m["group_rsum"] == pytest.approx(sum(m[k] for k in GROUP_KEYS))
        assert m["group_map"] == pytest.approx((m["group_i2t_map"] + m["group_t2i_map"]) / 2)
    strict = {*STRICT_KEYS, "rsum"}
    group = {*GROUP_KEYS, "group_rsum", "group_i2t_map", "group_t2i_map", "group_map"}
    both = strict | group  # the same keys with or without labels (NaN without)
    assert set(m) == both | {k + "_optimistic" for k in both}
    assert set(rm.group_metric_keys()) == group
    assert set(retrieval_metrics(*bench[:2])) == strict | {k + "_optimistic" for k in strict}


def test_unlabelled_groups_are_not_one_group() -> None:
    """Invariant ("no group label" is its own value): with every label −1, every group metric
    is NaN (not measured; not a perfect 600 from one shared group), also through the folds; an
    unlabelled image is relevant only to its own captions, so labelled queries never score a
    hit on it."""
    sim_IT, t2i_T = torch.rand(4, 4), torch.arange(4)
    m = retrieval_metrics(sim_IT, t2i_T, torch.full((4,), -1))
    assert all(math.isnan(v) for k, v in m.items() if k.startswith("group_"))
    folds = fold_metrics(sim_IT, t2i_T, torch.tensor([-1, -1, 3, 3]), fold_size=2)
    assert (
        folds["group_rsum"]
        == retrieval_metrics(sim_IT[2:, 2:], t2i_T[:2], torch.tensor([3, 3]))["group_rsum"]
    )  # the unlabelled fold is left out of the mean
    sim_IT = torch.eye(4) * 0.1
    sim_IT[0, 1] = sim_IT[1, 0] = 0.9  # images 0 and 1 unlabelled, swapped best captions
    m = retrieval_metrics(sim_IT, t2i_T, torch.tensor([-1, -1, 5, 5]))
    assert m["group_i2t_r1"] == 100.0  # the labelled images 2 and 3 only
    assert m["i2t_r1"] == 50.0


def test_no_autograd_graph_and_int64_ranks() -> None:
    """Invariant: evaluation on scores that require grad builds no graph, and ranks are int64."""
    sim_IT = torch.rand(3, 5, requires_grad=True)
    t2i_T = torch.tensor([0, 1, 2, 0, 1])
    assert ranks_i2t(sim_IT, t2i_T).dtype == torch.long
    assert ranks_t2i(sim_IT, t2i_T).dtype == torch.long
    assert retrieval_metrics(sim_IT, t2i_T, torch.tensor([0, 0, 1]))["rsum"] >= 0


# ---------------------------------------------------------------------------------------------
# input validation


def _bad_inputs() -> list[tuple[str, tuple, str]]:
    sim, t2i = torch.rand(3, 4), torch.tensor([0, 1, 2, 2])
    nan = sim.clone()
    nan[1, 2] = float("nan")
    return [
        ("1-D scores", (torch.rand(4), t2i), "2-D"),
        ("integer scores", (torch.ones(3, 4, dtype=torch.long), t2i), "floating point"),
        ("no texts", (torch.rand(3, 0), torch.tensor([], dtype=torch.long)), "at least one"),
        ("wrong length", (sim, torch.tensor([0, 1, 2])), r"shape \(4,\)"),
        ("float map", (sim, t2i.float()), "integer"),
        ("index too large", (sim, torch.tensor([0, 1, 2, 3])), r"\[0, 2\]"),
        ("negative index", (sim, torch.tensor([0, 1, 2, -1])), r"\[0, 2\]"),
        ("image without caption", (sim, torch.tensor([0, 0, 2, 2])), "at least one caption"),
        ("groups wrong length", (sim, t2i, torch.tensor([0, 1])), "groups_I"),
        ("float groups", (sim, t2i, torch.tensor([0.0, 1.0, 2.0])), "groups_I"),
        ("NaN score", (nan, t2i), "NaN"),
    ]


@pytest.mark.parametrize("name,args,match", _bad_inputs(), ids=[b[0] for b in _bad_inputs()])
def test_invalid_inputs_raise_one_line_value_error(name: str, args: tuple, match: str) -> None:
    """Invariant: malformed benchmarks fail loudly with a one-line message naming the problem,
    in every entry point, instead of returning a plausible number."""
    calls = [lambda: retrieval_metrics(*args), lambda: fold_metrics(*args, fold_size=1)]
    if len(args) == 2:  # the rank functions take no groups
        calls += [lambda: ranks_i2t(*args), lambda: ranks_t2i(*args)]
    for call in calls:
        with pytest.raises(ValueError, match=match) as info:
            call()
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("ks", [(), (0,), (1, -5), (1.5,)])
def test_invalid_cutoffs_raise(ks: tuple) -> None:
    """Invariant: R@K needs positive integer cutoffs."""
    with pytest.raises(ValueError, match="ks"):
        recall_at(torch.tensor([0, 1]), ks)


@pytest.mark.parametrize("fold_size", [0, -1, 2.0])
def test_invalid_fold_size_raises(fold_size: object) -> None:
    """Invariant: the fold size must be a positive int."""
    with pytest.raises(ValueError, match="fold_size"):
        fold_metrics(torch.rand(4, 4), torch.arange(4), fold_size=fold_size)  # type: ignore[arg-type]

"""Retrieval ranks and recall: hand-checked cases, a plain-loop reference, folds, invariances."""

from __future__ import annotations

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


def _rank_by_sorting(scores: list[float], relevant: list[bool]) -> int:
    """Position of the first relevant item once sorted by descending score.

    Among equal scores the relevant items are placed first: that is the documented tie rule
    (ties counted in favour of the ground truth), reached here by sorting, not by counting.
    """
    order = sorted(range(len(scores)), key=lambda c: (-scores[c], not relevant[c]))
    return next(pos for pos, c in enumerate(order) if relevant[c])


def _reference_ranks(
    sim: list[list[float]], t2i: list[int], groups: list[int] | None = None
) -> tuple[list[int], list[int]]:
    """(image→text ranks, text→image ranks); relevance by group when ``groups`` is given."""
    imgs, txts = range(len(sim)), range(len(t2i))
    key = groups if groups is not None else list(imgs)
    i2t = [_rank_by_sorting(sim[i], [key[t2i[t]] == key[i] for t in txts]) for i in imgs]
    t2i_ranks = [
        _rank_by_sorting([sim[i][t] for i in imgs], [key[i] == key[t2i[t]] for i in imgs])
        for t in txts
    ]
    return i2t, t2i_ranks


def _reference_recall(ranks: list[int], k: int) -> float:
    return 100.0 * sum(r < k for r in ranks) / len(ranks)


@st.composite
def benchmarks(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sim_IT, text_to_image_T, groups_I): 1-7 captions per image, shuffled caption order,
    scores on a coarse grid so that ties are frequent, random groups."""
    counts = draw(st.lists(st.integers(1, 7), min_size=1, max_size=6))
    seed = draw(st.integers(0, 2**31 - 1))
    levels = draw(st.sampled_from([3, 5, 1000]))  # 3 levels: ties everywhere
    gen = torch.Generator().manual_seed(seed)
    t2i_T = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    t2i_T = t2i_T[torch.randperm(t2i_T.numel(), generator=gen)]
    sim_IT = torch.randint(0, levels, (len(counts), t2i_T.numel()), generator=gen) / levels
    groups_I = torch.randint(0, 3, (len(counts),), generator=gen)
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
    # image→text: image 1 now hits caption 6 (0.9), image 2 hits captions 1-3 (0.9);
    # images 0 and 3 are alone in their group → ranks [0, 0, 0, 12].
    assert (m["group_i2t_r1"], m["group_i2t_r10"]) == (100 * 3 / 4, 100 * 3 / 4)
    # text→image, rank 0: captions 1-3 and 6 (a 0.9 in the group), 15-18 (8 captions);
    # rank 1: caption 4, 5 (0.1 ties image 0's 0.1: not counted), 7-11, 13, 14 (9 captions);
    # rank 2: caption 12; rank 3: caption 0.
    assert m["group_t2i_r1"] == 100 * 8 / 19
    assert m["group_t2i_r5"] == 100.0
    assert recall_at(torch.tensor([0] * 8 + [1] * 9 + [2] + [3]), (2, 3)) == {
        2: 100 * 17 / 19,
        3: 100 * 18 / 19,
    }
    # The strict metrics are unchanged by passing groups.
    assert {k: m[k] for k in [*STRICT_KEYS, "rsum"]} == retrieval_metrics(sim_IT, t2i_T)


def test_ties_count_for_the_ground_truth() -> None:
    """Invariant (documented tie rule): a rank counts only strictly higher scores, so an
    all-equal row ranks every query first."""
    sim_IT = torch.zeros(3, 4)
    t2i_T = torch.tensor([0, 1, 2, 2])
    assert ranks_i2t(sim_IT, t2i_T).tolist() == [0, 0, 0]
    assert ranks_t2i(sim_IT, t2i_T).tolist() == [0, 0, 0, 0]
    sim_IT[0, 1] = 1e-6  # one strictly better distractor
    assert ranks_i2t(sim_IT, t2i_T).tolist() == [1, 0, 0]
    assert ranks_t2i(sim_IT, t2i_T).tolist() == [0, 1, 0, 0]


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
    ref_i2t, ref_t2i = _reference_ranks(sim, t2i)
    ref_gi2t, ref_gt2i = _reference_ranks(sim, t2i, groups)
    assert ranks_i2t(sim_IT, t2i_T).tolist() == ref_i2t
    assert ranks_t2i(sim_IT, t2i_T).tolist() == ref_t2i
    m = retrieval_metrics(sim_IT, t2i_T, groups_I)
    for k in (1, 5, 10):
        assert m[f"i2t_r{k}"] == _reference_recall(ref_i2t, k)
        assert m[f"t2i_r{k}"] == _reference_recall(ref_t2i, k)
        assert m[f"group_i2t_r{k}"] == _reference_recall(ref_gi2t, k)
        assert m[f"group_t2i_r{k}"] == _reference_recall(ref_gt2i, k)


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
    assert m["group_rsum"] == pytest.approx(sum(m[k] for k in GROUP_KEYS))
    assert set(m) == {*STRICT_KEYS, *GROUP_KEYS, "rsum", "group_rsum"}
    assert set(retrieval_metrics(*bench[:2])) == {*STRICT_KEYS, "rsum"}


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

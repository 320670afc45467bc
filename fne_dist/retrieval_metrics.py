"""Image↔text retrieval evaluation as pure tensor functions (VSE++ / SCAN / FNE protocol).

Legend: I images, T captions (texts), sim_IT[i, t] the similarity of image i and caption t
(cosine of L2-normalised embeddings in practice; any finite or infinite score works, NaN does
not), text_to_image_T[t] the image caption t describes. An image may have any number (≥ 1) of
captions: COCO has images with 6 or 7, so nothing here assumes 5.

Ranks (0 = best):

* image→text: the rank of image i is the best (smallest) rank among all its ground-truth
  captions in the list of all T captions sorted by sim_IT[i].
* text→image: the rank of caption t is the rank of its image among all I images sorted by
  sim_IT[:, t].

R@K is the percentage (0-100) of queries with rank < K; rsum is R@1+R@5+R@10 both ways.

Ties (``ties``). The headline rule is *pessimistic*: the rank of a query is the number of
irrelevant candidates whose score is at least the best score of a relevant candidate, so a
distractor tied with the match ranks ahead of it. Identical captions (identical embeddings) thus
cannot all be "first": the number is what a user can rely on, and it needs no order (ranks are
a function of the scores alone). The *optimistic* rule (only candidates scoring strictly above
count) is kept as a second number, keys suffixed ``_optimistic``; the two differ only by ties.

Group-aware ("semantic") recall, for data rich in false negatives: with a group label per image
(e.g. an emoji family), a retrieved caption is correct for image i when its image has the group
of i, and a retrieved image is correct for caption t when it has the group of t's image. Every
ground truth is in its own group, so group ranks are never worse than strict ranks. A negative
label means "no group label" (``fne.groups``; shards without ``group_id``): it is its own
value, not a shared group. Group metrics are averaged over the labelled queries only (an
image with a label, a caption whose image has one); an unlabelled candidate is relevant only
as a strict ground truth; without any label the group keys hold NaN (not measured; the keys
stay, so metrics.json and monitoring see one schema).

Group mAP (``group_i2t_map``, ``group_t2i_map``, their mean ``group_map``; percentages): the
average precision of each labelled query over the full ranking with relevant = same group,
averaged over queries. Ties as above: pessimistic orders tied irrelevant candidates before tied
relevant ones, optimistic after.

COCO 1K protocol: ``fold_metrics`` splits the images into consecutive folds (1,000 images in
COCO 5K → 5 folds) with their captions and averages the metrics over folds.

Cost: two passes over sim_IT per direction and tie rule (more with groups), in row blocks of
``_CHUNK_ROWS`` so the temporaries stay at a few tens of MB even for I=5,000 × T=25,000; group
mAP sorts every row and column once per tie rule (two sorts each).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .fne.groups import labelled

# Queries scored per block: 1,024 × 25,000 float32 = 100 MB of temporaries at most. Read at call
# time (not a default argument) so tests can shrink it to exercise block boundaries.
_CHUNK_ROWS = 1024

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)
TIES = ("pessimistic", "optimistic")
OPTIMISTIC = "_optimistic"  # suffix of the second, optimistic-tie number


# ---------------------------------------------------------------------------------------------
# validation


def _check_inputs(sim_IT: Tensor, text_to_image_T: Tensor, groups_I: Tensor | None) -> None:
    """Raise ValueError (one line naming the problem) unless the inputs form a valid benchmark."""
    if sim_IT.dim() != 2:
        raise ValueError(f"sim_IT must be 2-D (images × texts), got shape {tuple(sim_IT.shape)}")
    if not sim_IT.is_floating_point():
        raise ValueError(f"sim_IT must be floating point, got {sim_IT.dtype}")
    n_img, n_txt = sim_IT.shape
    if n_img == 0 or n_txt == 0:
        raise ValueError(
            f"sim_IT must have at least one image and one text, got I={n_img} T={n_txt}"
        )
    if text_to_image_T.dim() != 1 or text_to_image_T.shape[0] != n_txt:
        raise ValueError(
            f"text_to_image_T must have shape ({n_txt},) to match sim_IT {tuple(sim_IT.shape)}, "
            f"got {tuple(text_to_image_T.shape)}"
        )
    if text_to_image_T.is_floating_point() or text_to_image_T.dtype == torch.bool:
        raise ValueError(f"text_to_image_T must be an integer tensor, got {text_to_image_T.dtype}")
    lo, hi = int(text_to_image_T.min()), int(text_to_image_T.max())
    if lo < 0 or hi >= n_img:
        raise ValueError(
            f"text_to_image_T must lie in [0, {n_img - 1}], got values in [{lo}, {hi}]"
        )
    counts_I = torch.bincount(text_to_image_T.long().cpu(), minlength=n_img)
    if bool((counts_I == 0).any()):
        missing = torch.nonzero(counts_I == 0).flatten()
        raise ValueError(
            f"every image needs at least one caption: {missing.numel()} image(s) have none, "
            f"first {missing[:5].tolist()}"
        )
    if groups_I is not None:
        if groups_I.dim() != 1 or groups_I.shape[0] != n_img:
            raise ValueError(f"groups_I must have shape ({n_img},), got {tuple(groups_I.shape)}")
        if groups_I.is_floating_point() or groups_I.dtype == torch.bool:
            raise ValueError(f"groups_I must be an integer tensor, got {groups_I.dtype}")
    # NaN compares false with everything: it would silently rank as a perfect hit.
    if bool(torch.isnan(sim_IT).any()):
        raise ValueError("sim_IT contains NaN")


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    """Cutoffs as a tuple of positive ints; ValueError otherwise."""
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks}")
    return ks


def _check_ties(ties: str) -> None:
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")


# ---------------------------------------------------------------------------------------------
# ranking core


def _count_ahead(
    sim_IT: Tensor, best: Tensor, dim: int, key_I: Tensor, key_T: Tensor, ties: str
) -> Tensor:
    """int64 count per query of the candidates ranked ahead of the query's ``best`` relevant
    score; (i, t) is relevant iff key_I[i] == key_T[t].

    optimistic: every candidate scoring strictly above ``best`` (none of them is relevant, as
    ``best`` is the relevant maximum); pessimistic: every irrelevant candidate scoring at least
    ``best``. dim=1: queries are images (rows), ``best`` is (I,), returns (I,). dim=0: queries
    are captions (columns), ``best`` is (T,), returns (T,). Both walk over contiguous row
    blocks: reducing a transposed view instead would stride through memory.
    """
    n_img = sim_IT.shape[0]
    counts = torch.zeros(sim_IT.shape[1 - dim], dtype=torch.long, device=sim_IT.device)
    for r0 in range(0, n_img, _CHUNK_ROWS):
        r1 = min(r0 + _CHUNK_ROWS, n_img)
        block_iT = sim_IT[r0:r1]
        best_b = best[r0:r1, None] if dim == 1 else best[None, :]
        if ties == "optimistic":
            ahead_iT = block_iT > best_b
        else:
            ahead_iT = (block_iT >= best_b) & (key_I[r0:r1, None] != key_T[None, :])
        # An int32 accumulator halves the cost of the bool sum (int64 by default); T < 2^31.
        if dim == 1:
            counts[r0:r1] = ahead_iT.sum(dim=1, dtype=torch.int32)
        else:
            counts += ahead_iT.sum(dim=0, dtype=torch.int32)
    return counts


def _best_by_key(sim_IT: Tensor, key_I: Tensor, key_T: Tensor, dim: int) -> Tensor:
    """Best score of a relevant candidate per query; (i, t) is relevant iff key_I[i] == key_T[t].

    dim=1: per image (I,), max over its relevant captions; dim=0: per caption (T,), max over
    its relevant images. Every query has a relevant candidate (validation: each image has a
    caption, each caption an image, and both share their own key), so no -inf leaks out.
    """
    n_img = sim_IT.shape[0]
    best = torch.full(
        (sim_IT.shape[1 - dim],), float("-inf"), dtype=sim_IT.dtype, device=sim_IT.device
    )
    for r0 in range(0, n_img, _CHUNK_ROWS):
        r1 = min(r0 + _CHUNK_ROWS, n_img)
        relevant_iT = key_I[r0:r1, None] == key_T[None, :]
        masked_iT = torch.where(relevant_iT, sim_IT[r0:r1], float("-inf"))
        if dim == 1:
            best[r0:r1] = masked_iT.amax(dim=1)
        else:
            best = torch.maximum(best, masked_iT.amax(dim=0))
    return best


def _prepare(
    sim_IT: Tensor, text_to_image_T: Tensor, groups_I: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Detach the scores (no autograd graph for evaluation) and put the indices on their device."""
    device = sim_IT.device
    t2i_T = text_to_image_T.to(device=device, dtype=torch.long)
    g_I = None if groups_I is None else groups_I.to(device=device, dtype=torch.long)
    return sim_IT.detach(), t2i_T, g_I


def _gt_scores(sim_IT: Tensor, t2i_T: Tensor) -> Tensor:
    """(T,) score of each caption with its own image."""
    return sim_IT[t2i_T, torch.arange(sim_IT.shape[1], device=sim_IT.device)]


def _i2t(sim_IT: Tensor, t2i_T: Tensor, ties: str) -> Tensor:
    """image→text ranks of validated, prepared inputs."""
    # Strict relevance needs no mask pass: the best ground truth of each image is a max over
    # the T gathered ground-truth scores.
    best_I = torch.full(
        (sim_IT.shape[0],), float("-inf"), dtype=sim_IT.dtype, device=sim_IT.device
    ).scatter_reduce(0, t2i_T, _gt_scores(sim_IT, t2i_T), reduce="amax")
    own_I = torch.arange(sim_IT.shape[0], device=sim_IT.device)
    return _count_ahead(sim_IT, best_I, 1, own_I, t2i_T, ties)


def _t2i(sim_IT: Tensor, t2i_T: Tensor, ties: str) -> Tensor:
    """text→image ranks of validated, prepared inputs."""
    own_I = torch.arange(sim_IT.shape[0], device=sim_IT.device)
    return _count_ahead(sim_IT, _gt_scores(sim_IT, t2i_T), 0, own_I, t2i_T, ties)


def group_keys(g_I: Tensor) -> Tensor:
    """Relevance key per image: its group label, or a key of its own (below every label) when
    it has none (a negative label), so that an unlabelled image shares nothing."""
    own_I = -1 - torch.arange(g_I.shape[0], device=g_I.device)
    return torch.where(labelled(g_I), g_I, own_I)


def _group_ranks(sim_IT: Tensor, t2i_T: Tensor, g_I: Tensor, ties: str) -> tuple[Tensor, Tensor]:
    """Group-aware (image→text, text→image) ranks of every query, labelled or not."""
    key_I = group_keys(g_I)
    key_T = key_I[t2i_T]
    best_I = _best_by_key(sim_IT, key_I, key_T, dim=1)
    best_T = _best_by_key(sim_IT, key_I, key_T, dim=0)
    return (
        _count_ahead(sim_IT, best_I, 1, key_I, key_T, ties),
        _count_ahead(sim_IT, best_T, 0, key_I, key_T, ties),
    )


def ranks_i2t(sim_IT: Tensor, text_to_image_T: Tensor, ties: str = "pessimistic") -> Tensor:
    """int64 (I,) rank of each image: #captions ranked ahead of its best ground truth."""
    _check_ties(ties)
    _check_inputs(sim_IT, text_to_image_T, None)
    sim_IT, t2i_T, _ = _prepare(sim_IT, text_to_image_T, None)
    return _i2t(sim_IT, t2i_T, ties)


def ranks_t2i(sim_IT: Tensor, text_to_image_T: Tensor, ties: str = "pessimistic") -> Tensor:
    """int64 (T,) rank of each caption: #images ranked ahead of its own image."""
    _check_ties(ties)
    _check_inputs(sim_IT, text_to_image_T, None)
    sim_IT, t2i_T, _ = _prepare(sim_IT, text_to_image_T, None)
    return _t2i(sim_IT, t2i_T, ties)


# ---------------------------------------------------------------------------------------------
# average precision


def _average_precision_rows(score_qC: Tensor, relevant_qC: Tensor, ties: str) -> Tensor:
    """(q,) average precision of each row over all C candidates; every row has a relevant one.

    Two stable sorts: first by relevance (irrelevant first for the pessimistic rule, relevant
    first for the optimistic one), then by descending score, which keeps that order in ties.
    """
    by_rel_qC = torch.argsort(relevant_qC.to(torch.int8), dim=1, stable=True,
                              descending=ties == "optimistic")  # fmt: skip
    score_qC = score_qC.gather(1, by_rel_qC)
    rel_qC = relevant_qC.gather(1, by_rel_qC)
    by_score_qC = torch.argsort(score_qC, dim=1, stable=True, descending=True)
    rel_qC = rel_qC.gather(1, by_score_qC).to(torch.float64)
    position_C = torch.arange(1, rel_qC.shape[1] + 1, dtype=torch.float64, device=rel_qC.device)
    precision_qC = rel_qC.cumsum(1) / position_C
    return (precision_qC * rel_qC).sum(1) / rel_qC.sum(1)


def _group_ap(sim_IT: Tensor, t2i_T: Tensor, g_I: Tensor, ties: str) -> tuple[Tensor, Tensor]:
    """Group average precision of every (image, caption) query, relevant = same group key."""
    key_I = group_keys(g_I)
    key_T = key_I[t2i_T]
    ap_I = torch.cat([
        _average_precision_rows(
            sim_IT[r0 : r0 + _CHUNK_ROWS], key_I[r0 : r0 + _CHUNK_ROWS, None] == key_T[None, :],
            ties,
        )
        for r0 in range(0, sim_IT.shape[0], _CHUNK_ROWS)
    ])  # fmt: skip
    sim_TI = sim_IT.T
    ap_T = torch.cat([
        _average_precision_rows(
            sim_TI[c0 : c0 + _CHUNK_ROWS], key_T[c0 : c0 + _CHUNK_ROWS, None] == key_I[None, :],
            ties,
        )
        for c0 in range(0, sim_TI.shape[0], _CHUNK_ROWS)
    ])  # fmt: skip
    return ap_I, ap_T


# ---------------------------------------------------------------------------------------------
# recall and the metric dictionaries


def recall_at(ranks: Tensor, ks: Sequence[int] = DEFAULT_KS) -> dict[int, float]:
    """{K: percentage (0-100) of ranks < K} for each K in ``ks``."""
    ks = _check_ks(ks)
    if ranks.dim() != 1 or ranks.numel() == 0:
        raise ValueError(f"ranks must be a non-empty 1-D tensor, got shape {tuple(ranks.shape)}")
    n = ranks.numel()
    # Integer counts then one float division: exact ties with hand-computed percentages.
    return {k: 100.0 * int((ranks < k).sum()) / n for k in ks}


def _metrics_of(
    ranks_i2t_I: Tensor, ranks_t2i_T: Tensor, ks: tuple[int, ...], prefix: str, suffix: str
) -> dict[str, float]:
    """``{prefix}i2t_r{K}{suffix}``, ``{prefix}t2i_r{K}{suffix}`` for each K and their sum
    ``{prefix}rsum{suffix}``."""
    out: dict[str, float] = {}
    for direction, ranks in (("i2t", ranks_i2t_I), ("t2i", ranks_t2i_T)):
        for k, r in recall_at(ranks, ks).items():
            out[f"{prefix}{direction}_r{k}{suffix}"] = r
    out[f"{prefix}rsum{suffix}"] = sum(out.values())
    return out


def _group_metrics(
    sim_IT: Tensor, t2i_T: Tensor, g_I: Tensor, ks: tuple[int, ...], ties: str
) -> dict[str, float]:
    """Group-aware R@K, rsum and mAP over the labelled queries (NaN if none is labelled)."""
    labelled_I = labelled(g_I)
    labelled_T = labelled_I[t2i_T]
    suffix = "" if ties == "pessimistic" else OPTIMISTIC
    if not bool(labelled_I.any()):  # not measured: NaN, so every consumer sees the same keys
        return dict.fromkeys(group_metric_keys(ks, suffix), math.nan)
    r_I, r_T = _group_ranks(sim_IT, t2i_T, g_I, ties)
    out = _metrics_of(r_I[labelled_I], r_T[labelled_T], ks, "group_", suffix)
    ap_I, ap_T = _group_ap(sim_IT, t2i_T, g_I, ties)
    i2t_map = 100.0 * float(ap_I[labelled_I].mean())
    t2i_map = 100.0 * float(ap_T[labelled_T].mean())
    out[f"group_i2t_map{suffix}"] = i2t_map
    out[f"group_t2i_map{suffix}"] = t2i_map
    out[f"group_map{suffix}"] = 0.5 * (i2t_map + t2i_map)
    return out


def group_metric_keys(ks: Sequence[int] = DEFAULT_KS, suffix: str = "") -> list[str]:
    """The group-aware keys of ``retrieval_metrics`` for one tie rule."""
    recall = [f"group_{d}_r{k}{suffix}" for d in ("i2t", "t2i") for k in ks]
    maps = [f"group_{m}{suffix}" for m in ("i2t_map", "t2i_map", "map")]
    return [*recall, f"group_rsum{suffix}", *maps]


def retrieval_metrics(
    sim_IT: Tensor,
    text_to_image_T: Tensor,
    groups_I: Tensor | None = None,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float]:
    """R@K both ways and rsum; with labelled ``groups_I`` also group-aware R@K and group mAP.

    Keys (pessimistic ties): ``i2t_r{K}``, ``t2i_r{K}`` for K in ``ks``, ``rsum``; with groups
    additionally ``group_i2t_r{K}``, ``group_t2i_r{K}``, ``group_rsum``, ``group_i2t_map``,
    ``group_t2i_map``, ``group_map``. Each key again with the suffix ``_optimistic`` (ties in
    favour of the match). Values are percentages.
    """
    ks = _check_ks(ks)
    _check_inputs(sim_IT, text_to_image_T, groups_I)
    sim_IT, t2i_T, g_I = _prepare(sim_IT, text_to_image_T, groups_I)
    out: dict[str, float] = {}
    for ties in TIES:
        suffix = "" if ties == "pessimistic" else OPTIMISTIC
        out |= _metrics_of(_i2t(sim_IT, t2i_T, ties), _t2i(sim_IT, t2i_T, ties), ks, "", suffix)
        if g_I is not None:
            out |= _group_metrics(sim_IT, t2i_T, g_I, ks, ties)
    return out


def fold_metrics(
    sim_IT: Tensor,
    text_to_image_T: Tensor,
    groups_I: Tensor | None = None,
    fold_size: int = 1000,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float]:
    """Mean over folds of ``retrieval_metrics`` (COCO 1K protocol with the default fold size).

    Fold f holds images [f·fold_size, (f+1)·fold_size) and exactly the captions of those images
    (wherever they sit in caption order); each fold is ranked on its own, then every metric is
    averaged over the folds that have it (group keys: the folds with a group label). I must be
    a multiple of ``fold_size``.
    """
    ks = _check_ks(ks)
    _check_inputs(sim_IT, text_to_image_T, groups_I)
    n_img = sim_IT.shape[0]
    if isinstance(fold_size, bool) or not isinstance(fold_size, int) or fold_size < 1:
        raise ValueError(f"fold_size must be a positive int, got {fold_size!r}")
    if n_img % fold_size != 0:
        raise ValueError(f"number of images I={n_img} is not a multiple of fold_size={fold_size}")
    sim_IT, t2i_T, g_I = _prepare(sim_IT, text_to_image_T, groups_I)
    n_folds = n_img // fold_size
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for f in range(n_folds):
        lo, hi = f * fold_size, (f + 1) * fold_size
        # F = the captions of this fold; they need not be contiguous in caption order.
        cols_F = torch.nonzero((t2i_T >= lo) & (t2i_T < hi)).flatten()
        fold = retrieval_metrics(
            sim_IT[lo:hi].index_select(1, cols_F),
            t2i_T[cols_F] - lo,
            None if g_I is None else g_I[lo:hi],
            ks,
        )
        for key, value in fold.items():
            if not math.isnan(value):  # a fold without group labels has NaN group metrics
                sums[key] = sums.get(key, 0.0) + value
                counts[key] = counts.get(key, 0) + 1
            sums.setdefault(key, 0.0)
    return {
        key: total / counts[key] if counts.get(key) else math.nan for key, total in sums.items()
    }

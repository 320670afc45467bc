"""A memory sharded across W ranks samples exactly what one rank with the whole memory samples
(docs/sharded-memory.md): W real gloo ranks, as threads of this process, against the
whole-memory sampler (``fne.loss``) on the same global batch and uniforms, in float64.

The problem: W·B anchors, K = 37 memory slots (not a multiple of W) holding ids of the batch's
anchors on the *other* ranks' shards (masked entries elsewhere), repeated ids, two identical
candidates on either side of a shard boundary (the tie rule of the fallback), and regimes in
which the windows are empty (the fallback, and rows without a violator).

Every embedding is a multiple of 2⁻⁶ (``_dyadic``), so every dot product is exact whatever
order a BLAS kernel sums it in: the similarities are then the same bits for any matrix shape,
and the test sees the sampler's own arithmetic only. (With arbitrary floats, MKL's float64
matmul gives different last bits for different shapes; docs/sharded-memory.md.)
"""

from __future__ import annotations

import json
import threading
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from fne_dist.distributed.sharded import (
    GlooComm,
    ShardStep,
    sampled_block,
    sharded_retrieval_loss,
    sharded_selection,
    sharded_staleness,
)
from fne_dist.fne import (
    Anchors,
    Candidates,
    FneConfig,
    SimilarityStats,
    retrieval_loss,
    stats_of,
)
from fne_dist.fne.detection import COLUMNS
from fne_dist.fne.estimators import random_candidate_sims, sample_columns
from fne_dist.fne.loss import _select
from fne_dist.fne.posteriors import CandidateSample, posterior_for
from fne_dist.fne.rules import RULE_OF_LOSS
from fne_dist.fne.sampling import step_uniforms
from fne_dist.memory import MomentumMemory, ShardRange

F64 = torch.float64
B, D, K, SEED = 4, 16, 37, 7


def _dyadic(x: torch.Tensor) -> torch.Tensor:
    """x rounded to multiples of 2⁻⁶: dot products of 16 of them are exact in float32/64."""
    return torch.round(x * 64) / 64


def _problem(world: int, seed: int = 0):
    """The global batch (online anchors, momentum block, ids, groups) and the memory's writes."""
    gen = torch.Generator().manual_seed(seed)
    G = world * B
    m_img = F.normalize(torch.randn(G, D, generator=gen, dtype=F64), dim=1)
    m_txt = F.normalize(m_img + 0.6 * torch.randn(G, D, generator=gen, dtype=F64), dim=1)
    img = F.normalize(m_img + 0.3 * torch.randn(G, D, generator=gen, dtype=F64), dim=1)
    txt = F.normalize(m_txt + 0.3 * torch.randn(G, D, generator=gen, dtype=F64), dim=1)
    ids = torch.arange(G) * 10
    ids[1] = ids[0]  # two captions of one image in the batch
    groups = ids // 20
    groups[3] = -1  # unlabelled
    # 30 writes: near-copies of the batch (ids of every rank's anchors, so masked entries live
    # on every shard), fresh ids, and two identical rows either side of the boundary
    n = 30
    src = torch.randint(0, G, (n,), generator=gen)
    w_img = F.normalize(m_img[src] + 0.4 * torch.randn(n, D, generator=gen, dtype=F64), dim=1)
    w_txt = F.normalize(m_txt[src] + 0.4 * torch.randn(n, D, generator=gen, dtype=F64), dim=1)
    w_ids = torch.where(torch.rand(n, generator=gen) < 0.4, ids[src], 1000 + torch.arange(n))
    w_groups = torch.where(w_ids < 1000, w_ids // 20, torch.randint(0, 3, (n,), generator=gen))
    img, txt, m_img, m_txt, w_img, w_txt = map(_dyadic, (img, txt, m_img, m_txt, w_img, w_txt))
    # anchor 2 (image→text) has no violator: its pair is the only text with a last coordinate
    for x in (img, m_txt, w_txt):
        x[:, -1] = 0.0
    img[2] = m_txt[2] = F.one_hot(torch.tensor(D - 1), D).to(F64)
    return dict(
        online=(img, txt), batch=(m_img, m_txt, ids, groups), writes=(w_img, w_txt, w_ids, w_groups)
    )


def _memory(prob: dict, shard: ShardRange, dtype: torch.dtype = F64) -> MomentumMemory:
    mem = MomentumMemory(K, D, seed=SEED, shard=shard, dtype=dtype)
    mem.img_KD, mem.txt_KD = _dyadic(mem.img_KD), _dyadic(mem.txt_KD)
    mem.txt_KD[:, -1] = 0.0
    w_img, w_txt, w_ids, w_groups = prob["writes"]
    mem.enqueue(w_img[:20], w_txt[:20], w_ids[:20], w_groups[:20])
    # ring slots (20 + i) mod K: make the slots just before and after the 2-rank boundary
    # (⌊K/2⌋ = 18) identical and the most similar to anchor 0 in both directions
    tie_img, tie_txt = prob["online"][1][0], prob["online"][0][0]
    w_img, w_txt = w_img[20:].clone(), w_txt[20:].clone()
    mem.enqueue(w_img, w_txt, w_ids[20:], w_groups[20:])
    boundary = K // 2
    for slot in (boundary - 1, boundary):
        if shard.lo <= slot < shard.hi:
            mem.img_KD[slot - shard.lo] = tie_img
            mem.txt_KD[slot - shard.lo] = tie_txt
            mem.ids_K[slot - shard.lo] = 5000
    return mem


def _gaussians(regime: str, cfg: FneConfig, prob: dict):
    """Gaussians whose window holds some candidates (``open``), none (``empty``: every row
    falls back), or a closed gate; with the posterior of ``cfg`` fitted to a sample."""
    stats = SimilarityStats()
    mu_pos = {"open": 0.45, "closed": 0.45, "empty": 2.0}[regime]
    n_pos = 50 if regime == "closed" else 400
    gen = torch.Generator().manual_seed(3)
    stats.add(
        stats_of(
            mu_pos + 0.1 * torch.randn(n_pos, generator=gen, dtype=F64),
            0.1 + 0.15 * torch.randn(2 * n_pos, generator=gen, dtype=F64),
        )
    )
    g = stats.gaussians(cfg.gate_size, cfg.var_floor, cfg.variance)
    posterior = posterior_for(cfg)
    totals = torch.zeros(0, dtype=F64)
    if posterior.samples:
        img = prob["online"][0]
        cand = torch.cat([prob["batch"][0], prob["writes"][0]])
        cols = torch.randint(0, cand.shape[0], (2, img.shape[0], 16), generator=gen)
        sims = (0.2 + 0.3 * torch.rand(2 * img.shape[0] * 16, generator=gen, dtype=F64)).clamp(
            -1, 1
        )
        sample = CandidateSample(sims, torch.ones_like(sims, dtype=torch.bool), img, cand, cols)
        totals = posterior.sums(sample)
    return replace(g, posterior=posterior.fit(g, totals))


def _whole(prob: dict, cfg: FneConfig, g, u_2Gk: torch.Tensor):
    """1 rank, the whole memory, every anchor of the global batch: ``fne.loss``'s selection."""
    img, txt = prob["online"]
    m_img, m_txt, ids, groups = prob["batch"]
    G = img.shape[0]
    mem = _memory(prob, ShardRange.of(K), prob.get("memory_dtype", F64))
    cands = Candidates.concat(Candidates(m_img, m_txt, ids, G, groups), mem.candidates())
    if cfg.loss == "vse_pp" and not cfg.vse_pp_memory:
        cands = cands.batch_only()
    a = Anchors(img, txt, ids, torch.arange(G), groups)
    rule = RULE_OF_LOSS[cfg.loss]
    return _select(a, cands, cfg, rule, g, (u_2Gk[0], u_2Gk[1])), cands


def _sharded(prob: dict, cfg: FneConfig, g, u_2Gk: torch.Tensor, world: int):
    """W gloo ranks (threads), each with its shard and its B anchors."""
    img, txt = prob["online"]
    m_img, m_txt, ids, groups = prob["batch"]
    G = img.shape[0]
    store = dist.HashStore()
    out: dict[int, object] = {}
    errors: list[BaseException] = []

    def rank_main(r: int) -> None:
        try:
            comm = GlooComm(dist.PrefixStore("sharded", store), r, world, timeout_s=30)
            mine = slice(r * B, (r + 1) * B)
            step = ShardStep(
                Anchors(img[mine], txt[mine], ids[mine], torch.arange(G)[mine], groups[mine]),
                Candidates(m_img, m_txt, ids, G, groups),
                _memory(prob, ShardRange.of(K, r, world), prob.get("memory_dtype", F64)),
                u_2Gk,
            )
            out[r] = (
                sharded_selection(step, cfg, g, RULE_OF_LOSS[cfg.loss], comm),
                sharded_retrieval_loss(step, cfg, g, None, comm),
            )
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]
    return [out[r] for r in range(world)]


def _hinges(anchor_BD, cand_ND, pos_B, picks, margin):
    """``fne.loss._one_direction``'s sampled hinge per anchor (mean over valid picks)."""
    neg = torch.einsum("bd,bkd->bk", anchor_BD, cand_ND[picks.index_bk])
    hinge = torch.relu(margin + neg - pos_B[:, None]) * picks.valid_bk
    return hinge.sum(1) / picks.valid_bk.sum(1).clamp_min(1)


def _same_losses(prob: dict, cfg: FneConfig, g, u_2Gk: torch.Tensor, sharded: list) -> None:
    """Each rank's loss and every diagnostic equal ``retrieval_loss`` with the whole memory
    for the same B anchors (the replicated run), exactly."""
    img, txt = prob["online"]
    m_img, m_txt, ids, groups = prob["batch"]
    G = img.shape[0]
    mem = _memory(prob, ShardRange.of(K), prob.get("memory_dtype", F64))
    cands = Candidates.concat(Candidates(m_img, m_txt, ids, G, groups), mem.candidates())
    for r, got in enumerate(sharded):
        mine = slice(r * B, (r + 1) * B)
        a = Anchors(img[mine], txt[mine], ids[mine], torch.arange(G)[mine], groups[mine])
        want = retrieval_loss(a, cands, cfg, g, u_2Gk[:, mine])
        assert torch.equal(got.loss, want.loss), (r, float(got.loss), float(want.loss))
        assert got.diagnostics.keys() == want.diagnostics.keys()
        for key, value in want.diagnostics.items():
            if key.startswith("fnd_rel") and key.endswith("_p"):  # Σ P_fn: float64, per segment
                torch.testing.assert_close(got.diagnostics[key], value, rtol=1e-12, atol=0)
            else:
                assert torch.equal(
                    got.diagnostics[key],
                    value,
                ) or (value.isnan() and got.diagnostics[key].isnan()), key


CASES = {
    "fne, gate open": (dict(), "open"),
    "fne, k=3": (dict(negatives=3), "open"),
    "fne, gate closed": (dict(), "closed"),
    "fne, every window empty (fallback, no violator, tie at the boundary)": (dict(), "empty"),
    "window": (dict(loss="window"), "open"),
    "window, k=2, every window empty": (dict(loss="window", negatives=2), "empty"),
    "vse_pp over the memory": (dict(loss="vse_pp", vse_pp_memory=True), "open"),
    "fne, fallback scope batch": (dict(fallback_scope="batch"), "empty"),
    "fne, unflagged fallback": (dict(fallback="unflagged"), "empty"),
    "fne, oracle group mask": (dict(mask_groups=True), "open"),
    "fne, no hard cut": (dict(hard_cut=False), "open"),
    "cross_mixture": (dict(posterior="cross_mixture"), "open"),
    "intra_mixture, k=2": (dict(posterior="intra_mixture", negatives=2), "open"),
    "intra_mixture, unflagged, empty": (
        dict(posterior="intra_mixture", fallback="unflagged"),
        "empty",
    ),
    "bf16 storage": (dict(), "open"),
}


THREE_RANKS = ("fne, k=3", "fne, every window empty (fallback, no violator, tie at the boundary)",
               "intra_mixture, k=2")  # fmt: skip


@pytest.mark.parametrize(("case", "world"), [(c, 2) for c in CASES] + [(c, 3) for c in THREE_RANKS])
def test_sharded_equals_the_whole_memory(case: str, world: int) -> None:
    """Invariant: W ranks holding K/W slots each draw, per anchor and direction, the same
    candidate (global column, similarity, validity), the same fallback / no-violator flags and
    counts and the same detection sums as 1 rank with the whole memory, and the sampled loss
    is the same, exactly in float64."""
    overrides, regime = CASES[case]
    cfg = FneConfig(**overrides)
    prob = _problem(world)
    prob["memory_dtype"] = torch.bfloat16 if case.startswith("bf16") else F64
    g = _gaussians(regime, cfg, prob)
    G = world * B
    u_2Gk = step_uniforms(SEED, 3, G, cfg.negatives)
    whole, cands = _whole(prob, cfg, g, u_2Gk)
    ranks_and_losses = _sharded(prob, cfg, g, u_2Gk, world)
    ranks = [r for r, _ in ranks_and_losses]
    _same_losses(prob, cfg, g, u_2Gk, [loss for _, loss in ranks_and_losses])
    img, txt = prob["online"]
    for d, anchors in enumerate((img, txt)):
        want = whole[d]
        got_cols = torch.cat([r.columns[d] for r in ranks])
        got = [r.i2t if d == 0 else r.t2i for r in ranks]
        valid = torch.cat([p.valid_bk for p in got])
        assert torch.equal(valid, want.valid_bk), case
        assert torch.equal(got_cols[valid], want.index_bk[valid]), case
        assert torch.equal(torch.cat([p.sim_bk for p in got])[valid], want.sim_bk[valid]), case
        assert torch.equal(torch.cat([p.counts_bC for p in got]), want.counts_bC), case
        detect = torch.cat([p.detect_bF for p in got])
        assert detect.shape == want.detect_bF.shape
        if detect.shape[1]:  # every count exact; the Σ P_fn columns are float64 sums per segment
            exact = [i for i, c in enumerate(COLUMNS) if not c.endswith("_p")]
            assert torch.equal(detect[:, exact], want.detect_bF[:, exact]), case
            torch.testing.assert_close(detect, want.detect_bF, rtol=1e-12, atol=1e-12)
        # the loss: each rank's hinges over its own small block equal the whole memory's
        cand_whole = cands.txt_ND if d == 0 else cands.img_ND
        pos = (anchors * cand_whole[torch.arange(G)]).sum(-1)
        loss_whole = _hinges(anchors, cand_whole, pos, want, cfg.margin)
        loss_ranks = []
        for r, (rk, p) in enumerate(zip(ranks, got, strict=True)):
            mine = slice(r * B, (r + 1) * B)
            block = rk.candidates.txt_ND if d == 0 else rk.candidates.img_ND
            loss_ranks.append(_hinges(anchors[mine], block, pos[mine], p, cfg.margin))
        assert torch.equal(torch.cat(loss_ranks), loss_whole), case
    empty = sum(
        float(p.count("fallback").sum() + p.count("no_violator").sum())
        for r in ranks
        for p in (r.i2t, r.t2i)
    )
    if regime == "empty":
        assert empty == 2 * world * B  # the case exercises the fallback: every window is empty


def test_the_cases_cover_the_edges() -> None:
    """The problem has what the equivalence must hold through: rows without a violator, masked
    ids on another rank's shard, and the boundary tie being anchor 0's hardest candidate."""
    world = 2
    prob = _problem(world)
    cfg = FneConfig()
    g = _gaussians("empty", cfg, prob)
    (i2t, _), cands = _whole(prob, cfg, g, step_uniforms(SEED, 3, world * B, 1))
    assert float(i2t.count("no_violator").sum()) > 0
    assert float(i2t.count("fallback").sum()) > 0
    G = world * B
    boundary = G + K // 2
    assert int(i2t.index_bk[0, 0]) == boundary - 1  # the first of two equal candidates
    sims = prob["online"][0][0] @ cands.txt_ND.T
    assert sims[boundary - 1] == sims[boundary]
    ids = prob["batch"][2]
    shard1 = cands.ids_N[G + K // 2 :]
    assert bool(torch.isin(ids[:B], shard1).any())  # rank 0's ids live on rank 1's shard


@pytest.mark.parametrize(
    ("capacity", "dim", "world"), [(37, 16, 2), (37, 7, 3), (5, 3, 8), (300, 33, 4)]
)
def test_shards_hold_the_whole_memory_slices(capacity: int, dim: int, world: int) -> None:
    """Invariant: each rank's shard holds exactly the whole memory's slots [⌊rK/W⌋, ⌊(r+1)K/W⌋)
    after seeded initialisation (generated in chunks, never whole) and after enqueues that wrap
    around the ring and cross shard boundaries (G > K included), with the same pointer."""
    whole = MomentumMemory(capacity, dim, seed=11)
    shards = [MomentumMemory(capacity, dim, seed=11, shard=ShardRange.of(capacity, r, world))
              for r in range(world)]  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    for G in (3, capacity - 1, capacity + 5, 2):
        img, txt = torch.randn(G, dim, generator=gen), torch.randn(G, dim, generator=gen)
        ids = torch.randint(0, 50, (G,), generator=gen)
        for m in (whole, *shards):
            m.enqueue(img, txt, ids, ids // 3)
        for name in ("img_KD", "txt_KD", "ids_K", "groups_K", "seq_K"):
            got = torch.cat([getattr(m, name) for m in shards])
            assert torch.equal(got, getattr(whole, name)), (name, G)
        assert all(m.ptr == whole.ptr and m.writes == whole.writes for m in shards)


def test_memory_init_chunks_consume_the_generator_like_one_tensor(monkeypatch) -> None:
    """Invariant: a shard generated a chunk at a time (tiny chunks here, D not a multiple of
    16) holds the whole memory's values, image and text tables alike."""
    import fne_dist.memory as memory_module

    monkeypatch.setattr(memory_module, "INIT_CHUNK_ELEMENTS", 40)
    whole = MomentumMemory(101, 5, seed=3)
    part = MomentumMemory(101, 5, seed=3, shard=ShardRange.of(101, 1, 3))
    assert torch.equal(part.img_KD, whole.img_KD[33:67])
    assert torch.equal(part.txt_KD, whole.txt_KD[33:67])


def test_bf16_storage_rounds_on_enqueue_and_upcasts_for_scoring() -> None:
    """Invariant: ``dtype=bfloat16`` stores the rounded embeddings (half the bytes) and the
    sampler sees them upcast; the sharded and the whole bf16 memories hold the same values."""
    whole = MomentumMemory(10, 4, seed=1, dtype=torch.bfloat16)
    half = MomentumMemory(10, 4, seed=1, shard=ShardRange.of(10, 1, 2), dtype=torch.bfloat16)
    x = torch.randn(6, 4)
    for m in (whole, half):
        m.enqueue(x, x, torch.arange(6))
    assert whole.img_KD.dtype == torch.bfloat16
    assert whole.img_KD.element_size() * 2 == torch.zeros(1).element_size()
    assert torch.equal(whole.img_KD[:6].float(), x.bfloat16().float())
    assert torch.equal(half.img_KD, whole.img_KD[5:])


def test_shard_checkpoints_restore_any_layout(tmp_path) -> None:
    """Invariant: a checkpoint stores one file per shard and is complete only with every one
    (``validate`` refuses a meta.json that lists fewer); the memory state read back for any
    shard (2 → 2, 2 → 3, whole → 2, 2 → whole) is the whole memory's slice with its pointer."""
    from fne_dist.checkpoint.format import FORMAT, META, CheckpointError, hash_files, save_tensors
    from fne_dist.checkpoint.validation import memory_shard_file, memory_state, validate

    whole = MomentumMemory(37, 5, seed=2)
    shards = [MomentumMemory(37, 5, seed=2, shard=ShardRange.of(37, r, 2)) for r in range(2)]
    x = torch.randn(50, 5)
    for m in (whole, *shards):
        m.enqueue(x, x + 1, torch.arange(50), torch.arange(50) % 4)
    sharded_dir, whole_dir = tmp_path / "sharded", tmp_path / "whole"
    sharded_dir.mkdir(), whole_dir.mkdir()
    for r, m in enumerate(shards):
        save_tensors(sharded_dir, memory_shard_file(r), m.state_dict())
    save_tensors(whole_dir, "memory.safetensors", whole.state_dict())
    meta = {"memory_shards": 2}
    for directory, m in ((sharded_dir, meta), (whole_dir, {})):
        for world in (1, 2, 3):
            for r in range(world):
                fresh = MomentumMemory(37, 5, seed=9, shard=ShardRange.of(37, r, world))
                fresh.load_state_dict(memory_state(directory, m, fresh.shard))
                lo, hi = fresh.shard.lo, fresh.shard.hi
                assert torch.equal(fresh.img_KD, whole.img_KD[lo:hi])
                assert torch.equal(fresh.seq_K, whole.seq_K[lo:hi])
                assert (fresh.ptr, fresh.writes) == (whole.ptr, whole.writes)
    names = [memory_shard_file(0)]  # a meta.json listing one of two shards is incomplete
    table = hash_files(sharded_dir, names)
    (sharded_dir / META).write_text(
        json.dumps({"format": FORMAT, "memory_shards": 2, "files": table})
    )
    with pytest.raises(CheckpointError, match=r"incomplete.*memory-rank-00001"):
        validate(sharded_dir)


def _threads(world: int, fn) -> list:
    """fn(rank, comm) on ``world`` gloo ranks (threads); their results in rank order."""
    store = dist.HashStore()
    out: dict[int, object] = {}
    errors: list[BaseException] = []

    def main(r: int) -> None:
        try:
            out[r] = fn(r, GlooComm(dist.PrefixStore("t", store), r, world, timeout_s=30))
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]
    return [out[r] for r in range(world)]


def test_staleness_and_the_candidate_sample_equal_the_whole_memory() -> None:
    """Invariant: the staleness sums of each rank's anchors (the newest slot of its id over
    every shard) and the stats' random candidate sample (similarities, validity and the
    posterior's sums of the mixture that samples) equal the whole memory's, exactly."""
    world, r_samples = 2, 5
    prob = _problem(world)
    img, txt = prob["online"]
    m_img, m_txt, ids, groups = prob["batch"]
    G = world * B
    gathered = Candidates(m_img, m_txt, ids, G, groups)
    whole = _memory(prob, ShardRange.of(K))
    cands = Candidates.concat(gathered, whole.candidates())
    cols_2Gr = sample_columns(SEED, 4, G, r_samples, G + K)
    cfg = FneConfig(posterior="intra_mixture")
    posterior = posterior_for(cfg)

    def rank_main(r: int, comm: GlooComm):
        memory = _memory(prob, ShardRange.of(K, r, world))
        stale = sharded_staleness(memory, gathered, B, comm)
        block, cols = sampled_block(memory, gathered, cols_2Gr, comm)
        mine = slice(r * B, (r + 1) * B)
        sims, valid = random_candidate_sims(
            img[mine], txt[mine], ids[mine], block.img_ND, block.txt_ND, block.ids_N, cols
        )
        sums = posterior.sums(CandidateSample(sims, valid, img[mine], block.img_ND, cols))
        return stale, sims, valid, sums

    for r, (stale, sims, valid, sums) in enumerate(_threads(world, rank_main)):
        mine = slice(r * B, (r + 1) * B)
        want_stale = torch.stack(whole.staleness(ids[mine], m_img[mine]))
        assert torch.equal(stale, want_stale), (stale, want_stale)
        cols = cols_2Gr[:, mine]
        want = random_candidate_sims(
            img[mine], txt[mine], ids[mine], cands.img_ND, cands.txt_ND, cands.ids_N, cols
        )
        assert torch.equal(sims, want[0]) and torch.equal(valid, want[1])
        want_sums = posterior.sums(CandidateSample(want[0], want[1], img[mine], cands.img_ND, cols))
        assert torch.equal(sums, want_sums)
    assert float(torch.stack(whole.staleness(ids, m_img))[1]) > 0  # some ids are in the memory


@pytest.mark.parametrize(
    "override",
    ["fne.loss=infonce", "fne.reduction=expected", "fne.loss=fne_sum"],
    ids=["infonce", "expected", "fne_sum"],
)
def test_a_sharded_memory_refuses_losses_over_every_candidate(override: str) -> None:
    """Invariant: memory.sharded with a loss that spans every memory candidate on the anchor's
    rank (infonce, the expected reduction, fne_sum over the memory) fails at load in one
    line naming both settings."""
    from fne_dist.config import ConfigError, load_config

    with pytest.raises((ConfigError, ValueError), match=r"memory\.sharded=true with fne"):
        load_config(None, ["memory.sharded=true", override])


def test_launch_sizing_counts_one_shard_per_rank() -> None:
    """Invariant: the launch-time size check counts ⌈K/W⌉ slots per rank with a sharded memory
    (no concatenated copy), so a memory that fits only sharded is not refused."""
    from fne_dist.config import load_config
    from fne_dist.sizing import host_needs, rank_needs

    sharded = load_config(None, ["memory.size=1048576", "memory.sharded=true"])
    whole = load_config(None, ["memory.size=1048576"])
    D = whole.model.embed_dim
    assert rank_needs(sharded, 64).memory == 2 * 16384 * D * 4 + 3 * 16384 * 8
    assert rank_needs(whole, 64).memory > 64 * rank_needs(sharded, 64).memory
    assert host_needs(sharded, 64) * 64 == host_needs(whole, 64)


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(posterior="intra_mixture", stats_source="all_pairs", fallback="unflagged")],
    ids=["paper", "intra_mixture+all_pairs"],
)
def test_the_training_step_is_the_same_with_a_sharded_memory(overrides: dict) -> None:
    """Invariant: ``forward_step`` (world size 1, no process group) through the sharded branch
    (its staleness, its candidate sample fetched from the shard, its loss) returns the loss,
    every diagnostic, the staleness and the statistics' sums of the whole-memory branch, over
    three steps with the enqueues in between (float32: the diagnostics that average similarities
    or P_fn, scored by matmuls of another shape, to their last bits)."""
    from fne_dist.config import ModelConfig
    from fne_dist.model import DualEncoder
    from fne_dist.momentum import make_momentum_copy
    from fne_dist.step import StepPosition, forward_step

    cfg = FneConfig(stats_samples=3, gate_size=0, **overrides)
    torch.manual_seed(0)
    model = DualEncoder(None, None, 6, 6, ModelConfig(embed_dim=4, head="linear"))
    momentum = make_momentum_copy(model)
    whole = MomentumMemory(19, 4, seed=0)
    shard = MomentumMemory(19, 4, seed=0, shard=ShardRange.of(19, 0, 1))
    assert shard.sharded and not whole.sharded
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        batch = {
            "img_feat": torch.randn(8, 6, generator=gen),
            "txt_feat": torch.randn(8, 6, generator=gen),
            "ids": torch.tensor([0, 0, 1, 2, 3, 4, 5, 6]) + 3 * step,
            "groups": torch.tensor([0, 0, 0, 1, 1, 2, 2, -1]),
        }
        outs = [
            forward_step(
                model, momentum, batch, m, SimilarityStats(), cfg, StepPosition(0, step, False)
            )
            for m in (whole, shard)
        ]
        a, b = outs
        assert torch.equal(a.loss, b.loss) and torch.equal(a.stat_sums, b.stat_sums)
        assert torch.equal(a.staleness, b.staleness)
        assert a.diagnostics.keys() == b.diagnostics.keys()
        for key, value in a.diagnostics.items():
            if key == "mean_neg_sim" or (key.startswith("fnd_rel") and key.endswith("_p")):
                # similarities (and P_fn of them) from float32 matmuls of other shapes
                torch.testing.assert_close(b.diagnostics[key], value, rtol=1e-5, atol=1e-7)
                continue
            same = torch.equal(value, b.diagnostics[key])
            assert same or (value.isnan() and b.diagnostics[key].isnan()), key
        for m in (whole, shard):
            g = a.gathered
            m.enqueue(g.img_ND, g.txt_ND, g.ids_N, g.groups_N)
    assert float(a.staleness[1]) > 0  # ids found in the memory

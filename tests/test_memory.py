"""The momentum memory: wrap-around, aligned ids, state round trip, id → slot index."""

from __future__ import annotations

import pytest
import torch

from fne_dist.memory import EMPTY_ID, MomentumMemory


def _one_by_one(K: int, D: int, rows: list[tuple[torch.Tensor, int]]) -> list[int]:
    """Plain ring buffer: slot of row t is t mod K; returns the ids per slot."""
    ids = [EMPTY_ID] * K
    for t, (_, rid) in enumerate(rows):
        ids[t % K] = rid
    return ids


@pytest.mark.parametrize("K,G", [(10, 3), (7, 7), (5, 12), (8224, 64), (1, 4)])
def test_wraparound_keeps_rows_aligned(K: int, G: int) -> None:
    """Invariant: enqueueing blocks of G (G need not divide K, may exceed K) leaves each slot
    with the image row, text row and id of the same pair, as a one-row-at-a-time ring would."""
    D = 4
    mem = MomentumMemory(K, D, seed=0)
    rows = []
    for step in range(5):
        ids = torch.arange(G) + 1000 * step
        img = ids[:, None].float().repeat(1, D)  # the row encodes its id
        mem.enqueue(img, -img, ids, ids % 3)
        rows += [(img[i], int(ids[i])) for i in range(G)]
    assert mem.ids_K.tolist() == _one_by_one(K, D, rows)
    written = mem.ids_K != EMPTY_ID
    assert torch.equal(mem.img_KD[written, 0], mem.ids_K[written].float())
    assert torch.equal(mem.txt_KD[written, 0], -mem.ids_K[written].float())
    assert torch.equal(mem.groups_K[written], mem.ids_K[written] % 3)
    assert mem.ptr == (5 * G) % K and len(mem) == min(5 * G, K)


def test_same_seed_same_memory_and_float32() -> None:
    """Invariant: two memories built with one seed are bit-identical (ranks never broadcast),
    rows are unit vectors, storage is float32, unwritten ids never equal a real id."""
    a, b = MomentumMemory(50, 8, seed=3), MomentumMemory(50, 8, seed=3)
    assert torch.equal(a.img_KD, b.img_KD) and torch.equal(a.txt_KD, b.txt_KD)
    assert a.img_KD.dtype == torch.float32
    torch.testing.assert_close(a.img_KD.norm(dim=1), torch.ones(50))
    assert (a.ids_K == EMPTY_ID).all() and EMPTY_ID < 0
    a.enqueue(torch.randn(3, 8, dtype=torch.bfloat16), torch.randn(3, 8), torch.arange(3))
    assert a.img_KD.dtype == torch.float32


def test_state_round_trip() -> None:
    """Invariant: load_state_dict(state_dict()) restores embeddings, ids, pointer; the next
    enqueue then lands where the original's would."""
    mem = MomentumMemory(9, 3, seed=1)
    for s in range(4):
        mem.enqueue(torch.randn(4, 3), torch.randn(4, 3), torch.arange(4) + 10 * s)
    twin = MomentumMemory(9, 3, seed=99)
    twin.load_state_dict(mem.state_dict())
    batch = (torch.randn(2, 3), torch.randn(2, 3), torch.tensor([7, 8]))
    mem.enqueue(*batch)
    twin.enqueue(*batch)
    for key, value in mem.state_dict().items():
        assert torch.equal(value, twin.state_dict()[key]), key
    with pytest.raises(ValueError, match="shape"):
        MomentumMemory(10, 3).load_state_dict(mem.state_dict())


def test_slots_of_finds_newest_slot() -> None:
    """Invariant: the id → slot index returns the most recently written slot holding the id
    (repeated ids: several captions of one image), and -1 for ids not in the memory."""
    mem = MomentumMemory(6, 2, seed=0)
    mem.enqueue(torch.randn(4, 2), torch.randn(4, 2), torch.tensor([5, 6, 5, 7]))
    mem.enqueue(torch.randn(3, 2), torch.randn(3, 2), torch.tensor([6, 8, 9]))  # wraps: slot 0
    slots = mem.slots_of(torch.tensor([5, 6, 7, 8, 9, 42, EMPTY_ID]))
    assert slots.tolist() == [2, 4, 3, 5, 0, -1, -1]


def test_staleness_is_cosine_to_fresh_embedding() -> None:
    """Invariant: staleness sums cos(memory entry, fresh embedding) over anchors found."""
    mem = MomentumMemory(4, 2, seed=0)
    mem.enqueue(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.zeros(2, 2), torch.tensor([1, 2]))
    total, count = mem.staleness(
        torch.tensor([1, 2, 3]), torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0]])
    )
    assert count.item() == 2 and total.item() == pytest.approx(1.0)


def _block(G: int, D: int, step: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(step)
    img, txt = torch.randn(G, D, generator=g), torch.randn(G, D, generator=g)
    ids = torch.arange(G) + 100 * step
    return img, txt, ids, ids % 3


@pytest.mark.parametrize("K,G", [(10, 3), (7, 7), (5, 12)])
def test_after_batch_is_the_concatenation_without_copying_the_memory(K: int, G: int) -> None:
    """Invariant: ``after_batch`` gives exactly ``Candidates.concat(batch, memory)`` at every
    step (wrap-around, G not dividing K or above K), its memory rows are the memory's own
    storage (no per-step copy), and enqueueing after it leaves the memory as a memory that
    never called it."""
    from fne_dist.fne import Candidates

    D = 4
    fast, plain = MomentumMemory(K, D, seed=3), MomentumMemory(K, D, seed=3)
    for step in range(6):
        img, txt, ids, groups = _block(G, D, step)
        batch = Candidates(img, txt, ids, G, groups)
        got, want = fast.after_batch(batch), Candidates.concat(batch, plain.candidates())
        for a, b in zip(
            (got.img_ND, got.txt_ND, got.ids_N, got.groups_N),
            (want.img_ND, want.txt_ND, want.ids_N, want.groups_N),
            strict=True,
        ):
            assert torch.equal(a, b)
        assert got.n_batch == want.n_batch == G
        assert got.img_ND[G:].data_ptr() == fast.img_KD.data_ptr()  # the memory itself
        fast.enqueue(img, txt, ids, groups)
        plain.enqueue(img, txt, ids, groups)
    for key, value in plain.state_dict().items():
        assert torch.equal(fast.state_dict()[key], value), key


def test_after_batch_block_read_after_an_enqueue_fails_loudly() -> None:
    """Invariant: the block aliases the memory, so a backward that reads it after the memory
    changed must raise (autograd's version check), never use the new rows silently."""
    from fne_dist.fne import Candidates

    mem = MomentumMemory(8, 4, seed=0)
    img, txt, ids, groups = _block(2, 4, 0)
    block = mem.after_batch(Candidates(img, txt, ids, 2, groups))
    query = torch.randn(2, 4, requires_grad=True)
    loss = (query @ block.img_ND.T).sum()
    mem.enqueue(img, txt, ids, groups)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_after_batch_copies_when_the_memory_is_bf16() -> None:
    """Invariant: a bf16 memory next to an fp32 batch gives concat's promoted fp32 block (the
    batch rows unrounded), not a bf16 buffer."""
    from fne_dist.fne import Candidates

    mem = MomentumMemory(6, 4, seed=0, dtype=torch.bfloat16)
    img, txt, ids, groups = _block(3, 4, 1)
    batch = Candidates(img, txt, ids, 3, groups)
    got, want = mem.after_batch(batch), Candidates.concat(batch, mem.candidates())
    assert got.img_ND.dtype == torch.float32 and torch.equal(got.img_ND, want.img_ND)

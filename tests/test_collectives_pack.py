"""The packing that lets one all-gather carry a step's embeddings, ids and groups."""

from __future__ import annotations

import torch

from fne_dist.distributed.collectives import all_gather_rows, pack_rows, unpack_rows


def test_packed_rows_of_two_ranks_unpack_to_each_tensor_gathered() -> None:
    """Invariant: concatenating two ranks' packed rows and unpacking gives, bit for bit, what
    gathering each tensor on its own gives (float32 with NaN/−0.0, int64 near 2^62, 1-D and
    2-D), so one collective can replace one per tensor."""
    gen = torch.Generator().manual_seed(0)

    def rank_rows(r: int) -> tuple[torch.Tensor, ...]:
        img = torch.randn(3, 5, generator=gen)
        img[0, 0], img[1, 1] = float("nan"), -0.0
        ids = torch.tensor([2**62 + r, -1, 7 * r])
        return img, torch.randn(3, 5, generator=gen), ids, torch.full((3,), -r)

    ranks = [rank_rows(0), rank_rows(1)]
    packed = torch.cat([pack_rows(x) for x in ranks])
    assert packed.dtype == torch.uint8 and packed.shape == (6, 2 * 5 * 4 + 2 * 8)
    for got, parts in zip(unpack_rows(packed, ranks[0]), zip(*ranks, strict=True), strict=True):
        want = torch.cat(parts)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))  # bits, NaN included


def test_gather_rows_is_the_identity_without_a_group() -> None:
    """Invariant: at world size 1 (no process group) the packed gather returns its inputs."""
    x, ids = torch.randn(4, 2), torch.arange(4)
    got = all_gather_rows(x, ids)
    assert got[0] is x and got[1] is ids

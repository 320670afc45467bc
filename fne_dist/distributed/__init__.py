"""Everything that knows about ranks: the rank environment and the collectives.

Every collective here is the identity at world size 1 (no process group needed), so the training
loop and its single-process tests run unchanged without any launcher.
"""

from .collectives import (
    all_gather_json,
    all_gather_no_grad,
    all_gather_rows,
    all_gather_varlen,
    all_min_int,
    all_reduce_sum,
    barrier,
    long_barrier,
    rank,
    world_size,
)

__all__ = [
    "all_gather_json",
    "all_gather_no_grad",
    "all_gather_rows",
    "all_gather_varlen",
    "all_min_int",
    "all_reduce_sum",
    "barrier",
    "long_barrier",
    "rank",
    "world_size",
]

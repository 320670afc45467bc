"""A non-finite step never updates the weights (hardening H31).

Every rank computes its own loss, so the ranks agree first: one all-reduce of a 0/1 flag per
micro step (it reads one number back from the device: the price of deciding on the host
whether to step). A micro step whose loss is non-finite on any rank is skipped on every rank:
no backward (it adds no gradient), no optimizer step, no EMA, no enqueue, and the FNE statistics
it added are taken back. With ``engine.grad_accum`` > 1 the engine still counts the micro step
(DeepSpeed's accumulation boundary), so the window's finite micro-batches are applied at it.
After ``optim.max_nonfinite_steps`` skipped micro steps in a row the run stops with one line.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import distributed as dist_ops


class TrainingDiverged(Exception):
    """Too many non-finite steps in a row (one line; exit code 4)."""


def finite_everywhere(loss: Tensor) -> bool:
    """Whether the loss is finite on every rank (the same answer on every rank)."""
    bad = (~torch.isfinite(loss.detach())).any().to(torch.float64).reshape(1)
    return float(dist_ops.all_reduce_sum(bad)) == 0.0


def check_in_row(in_row: int, limit: int, micro: int, total: int) -> None:
    """Raise ``TrainingDiverged`` once ``in_row`` reaches ``limit``."""
    if in_row >= limit:
        raise TrainingDiverged(
            f"{in_row} micro steps in a row had a non-finite loss (the last at micro step "
            f"{micro + 1}; {total} skipped in all, none of them updated the weights): lower "
            f"optim.lr or check the data (optim.max_nonfinite_steps={limit})"
        )

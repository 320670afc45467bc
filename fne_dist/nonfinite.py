"""A non-finite step never updates the weights.

Every rank computes its own loss, so the ranks agree. Where the gradients are whole on every
rank after backward (DDP, DeepSpeed ZeRO-0 without its bf16 optimizer) and ``grad_accum`` = 1,
the loss's flag rides on the gradient all-reduce: the loss is multiplied by 1 where finite and
by NaN elsewhere (``poisoned``, on the device), so a non-finite loss on any rank makes every
rank's averaged gradients NaN, and the one gradient check after backward decides for both:
no collective and no host read of its own (bit-identical when finite: x·1 = x). Elsewhere
(ZeRO ≥ 1, accumulation) the ranks agree first: one all-reduce of a 0/1 flag per micro step
(it reads one number back from the device: the price of deciding on the host whether to
step). A micro step whose loss is non-finite on any rank is skipped on every rank:
no backward (it adds no gradient), no optimizer step, no EMA, no enqueue, and neither its FNE
statistics nor the batch-norm running statistics its forward saw are applied: the loop commits
those only for a finite step (``loop.commit_step``), so nothing is copied to be taken back. With
``engine.grad_accum`` > 1 the engine still counts the micro step (DeepSpeed's accumulation
boundary), so the window's finite micro-batches are applied at it. With ``grad_accum`` = 1 a
finite loss whose gradients are not finite (where the gradients are visible: DDP, ZeRO-0) is
skipped the same way, its gradients dropped. After ``optim.max_nonfinite_steps`` skipped micro
steps in a row the run stops with one line.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import distributed as dist_ops


class TrainingDiverged(Exception):
    """Too many non-finite steps in a row (one line; exit code 3)."""


def finite_everywhere(loss: Tensor) -> bool:
    """Whether the loss is finite on every rank (the same answer on every rank)."""
    bad = (~torch.isfinite(loss.detach())).any().to(torch.float64).reshape(1)
    return float(dist_ops.all_reduce_sum(bad)) == 0.0


def poisoned(loss: Tensor) -> Tensor:
    """``loss`` where finite, NaN where not, with a gradient that is NaN everywhere in the
    second case (even for a NaN that did not come from the weights): backward of a non-finite
    loss then spreads NaN through the gradient all-reduce to every rank. No host read."""
    one = torch.ones((), dtype=loss.dtype, device=loss.device)
    factor = torch.where(torch.isfinite(loss.detach()).all(), one, one * float("nan"))
    return loss * factor


def grad_norm(module: torch.nn.Module) -> Tensor | None:
    """The 2-norm of all gradients held in ``module`` (fp32, 0-dim; None without any), summed
    as DeepSpeed's ``clip_grad_norm_`` sums it (per-tensor norms, squared, summed, square
    root), so that clipping by it gives DeepSpeed's clipped gradients bit for bit."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return None
    # one foreach kernel per dtype rather than one norm per tensor
    norms = torch._foreach_norm([g.detach().float() for g in grads])
    return torch.stack(norms).pow(2.0).sum().float().pow(0.5)


def grads_finite(module: torch.nn.Module, norm: Tensor | None = None) -> bool:
    """Whether every gradient held in ``module`` is finite (its norm too: an overflowing norm
    would make clipping scale by 0 or NaN). Gradients are already averaged over ranks when
    this is asked (DDP, DeepSpeed ZeRO-0), so every rank answers alike; under ZeRO ≥ 1 the
    partitions hold them and there is nothing here to check. ``norm``: ``grad_norm(module)``
    when the caller has it. One host read."""
    norm = grad_norm(module) if norm is None else norm
    return norm is None or bool(torch.isfinite(norm))


def check_in_row(in_row: int, limit: int, micro: int, total: int) -> None:
    """Raise ``TrainingDiverged`` once ``in_row`` reaches ``limit``."""
    if in_row >= limit:
        raise TrainingDiverged(
            f"{in_row} micro steps in a row had a non-finite loss or gradient (the last at "
            f"micro step {micro + 1}; {total} skipped in all, none of them updated the "
            "weights): lower "
            f"optim.lr or check the data (optim.max_nonfinite_steps={limit})"
        )

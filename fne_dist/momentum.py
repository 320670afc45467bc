"""Momentum (EMA) copies of the encoders (MoCo / ALBEF; docs/algorithm.md §1 and "Step order").

The momentum parameters are kept in float32 even when the online model trains in bf16: at
m = 0.995 the increment (1 − m)·(p − p̂) is below bf16 resolution and a bf16 copy would freeze.
ZeRO-3 partitioned parameters are handled by the engine module (engine.py), which gathers the
online partitions before calling ``ema_update``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_momentum_copy(model: nn.Module) -> nn.Module:
    """A float32 copy of ``model`` with gradients off, to be updated only by ``ema_update``."""
    twin = copy.deepcopy(model).float()
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


@torch.no_grad()
def ema_update(momentum: nn.Module, online: nn.Module, m: float) -> None:
    """p̂ ← m·p̂ + (1 − m)·p for every trained parameter pair (same order, same shapes).

    A frozen online parameter (``requires_grad=False``: the fixed early blocks of a partly
    trained tower) is left alone: its momentum copy stays bit-equal to it, which the shared
    frozen prefix (``shared_prefix``) relies on; averaging two equal values would move the
    copy by a rounding error each step (m·p + (1 − m)·p ≠ p in float32 for a few per cent
    of values). Buffers (e.g. batch-norm statistics) are copied, not averaged: they are not learned.
    """
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {m}")
    params_m, params_o = list(momentum.parameters()), list(online.parameters())
    if len(params_m) != len(params_o):
        raise ValueError(f"momentum has {len(params_m)} parameters, online has {len(params_o)}")
    trained = [(t, p) for t, p in zip(params_m, params_o, strict=True) if p.requires_grad]
    targets = [t for t, _ in trained]
    sources = [p.detach().to(torch.float32) for _, p in trained]
    if targets and targets[0].device.type == "cpu":
        # CPU: per tensor in place. torch's CPU foreach ops have no fused kernel; their
        # fallback multiplies out of place and copies back, 1.8x the time of this loop for
        # the fine-tuning towers' 80 trained tensors (bench/overhead.py's "ema" phase), with
        # bit-identical results (tests/test_momentum.py)
        for target, source in zip(targets, sources, strict=True):
            target.mul_(m).add_(source, alpha=1.0 - m)
    elif targets:  # accelerators: fused multi-tensor kernels
        torch._foreach_mul_(targets, m)
        torch._foreach_add_(targets, sources, alpha=1.0 - m)
    buffers_m, buffers_o = list(momentum.buffers()), list(online.buffers())
    if len(buffers_m) != len(buffers_o):
        raise ValueError(f"momentum has {len(buffers_m)} buffers, online has {len(buffers_o)}")
    if buffers_m:  # one foreach call, not a copy_ per buffer (a tower has ~150 of them)
        torch._foreach_copy_(buffers_m, buffers_o)

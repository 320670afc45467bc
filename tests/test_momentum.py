"""The EMA of momentum encoders."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fne_dist.momentum import ema_update, make_momentum_copy


def test_ema_formula_and_float32() -> None:
    """Invariant: p̂ ← m·p̂ + (1−m)·p, the copy stays float32 for a bf16 online model (a bf16
    copy would lose the (1−m) increment), and it has no gradient."""
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    momentum = make_momentum_copy(online)
    before = [p.clone() for p in momentum.parameters()]
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    online(torch.randn(5, 4))  # moves the batch-norm running statistics
    ema_update(momentum, online, 0.9)
    for b, p_m, p in zip(before, momentum.parameters(), online.parameters(), strict=True):
        torch.testing.assert_close(p_m, 0.9 * b + 0.1 * p.detach())
        assert not p_m.requires_grad
    torch.testing.assert_close(momentum[1].running_mean, online[1].running_mean)

    bf16 = make_momentum_copy(online)
    online_bf16 = online.to(torch.bfloat16)
    ref = [p.clone() for p in bf16.parameters()]
    ema_update(bf16, online_bf16, 0.995)
    assert all(p.dtype == torch.float32 for p in bf16.parameters())
    moved = [not torch.equal(r, p) for r, p in zip(ref, bf16.parameters(), strict=True)]
    assert any(moved)
    with pytest.raises(ValueError):
        ema_update(bf16, online, 1.5)


def test_cpu_ema_loop_equals_the_foreach_form_bit_for_bit() -> None:
    """Invariant: the CPU's per-tensor EMA gives exactly the fused form's values (foreach mul
    by m, then add (1−m)·p), over many steps and odd-sized tensors, so the cheaper loop moves
    no run; frozen parameters stay untouched."""
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(7, 5), nn.Linear(5, 3), nn.BatchNorm1d(3))
    online[0].requires_grad_(False)  # a frozen early layer
    loop, fused = make_momentum_copy(online), make_momentum_copy(online)
    trained = [i for i, p in enumerate(online.parameters()) if p.requires_grad]
    for _ in range(20):
        with torch.no_grad():
            for p in online.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.1)
        ema_update(loop, online, 0.995)
        targets = [list(fused.parameters())[i] for i in trained]
        sources = [list(online.parameters())[i].detach() for i in trained]
        torch._foreach_mul_(targets, 0.995)
        torch._foreach_add_(targets, sources, alpha=1.0 - 0.995)
    for p_loop, p_fused in zip(loop.parameters(), fused.parameters(), strict=True):
        assert torch.equal(p_loop, p_fused)
    assert torch.equal(loop[0].weight, online[0].weight)
    assert not torch.equal(loop[1].weight, online[1].weight)

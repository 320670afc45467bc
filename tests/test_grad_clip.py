"""DeepSpeed ZeRO-0 fp32 clipping without its norm all-reduce (``engine.keep_grad_norm``).

DeepSpeed's ``clip_grad_norm_`` averages the global norm over the data-parallel group with an
all-reduce every step (for MoE gradients, which differ by rank). At ZeRO-0 every rank holds
the same all-reduced gradients, so ours computes the norm once, with no collective, reusing
the loop's gradient check (``checked_grads_finite``) when there was one. Invariant: the
clipped gradients and the kept norm equal DeepSpeed's bit for bit (its all-reduce simulated
for 2 ranks holding equal gradients), with and without the check's norm; a non-finite check
hands no norm on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fne_dist.engine import checked_grads_finite, keep_grad_norm


def _model_with_grads(seed: int, scale: float) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(37, 64), nn.ReLU(), nn.Linear(64, 5))
    model.extra = nn.Parameter(torch.randn(1))  # one value, like the temperature
    model.unused = nn.Parameter(torch.randn(3))  # no gradient: left out of the norm
    for p in [*model[0].parameters(), *model[2].parameters(), model.extra]:
        p.grad = torch.randn_like(p) * scale
    return model


class _Engine:  # the part of DeepSpeed's ZeRO-0 engine keep_grad_norm touches
    def __init__(self, module: nn.Module, clip: float) -> None:
        self.module, self.clip = module, clip
        self._global_grad_norm = None

    def gradient_clipping(self) -> float:
        return self.clip

    def clip_fp32_gradients(self) -> None:
        raise AssertionError("replaced by keep_grad_norm")


def _deepspeed_clip(model: nn.Module, clip: float, monkeypatch: pytest.MonkeyPatch) -> tuple:
    """DeepSpeed's own clip_grad_norm_, its data-parallel all-reduce answered as 2 ranks with
    equal gradients answer it (the sum of two equal halves)."""
    from deepspeed.runtime import utils as ds_utils

    reduces: list[str] = []

    class TwoEqualRanks:
        @staticmethod
        def get_world_size(group=None) -> int:
            return 2

        @staticmethod
        def all_reduce(tensor, op=None, group=None) -> None:
            reduces.append("all_reduce")
            tensor.copy_(tensor + tensor)

    monkeypatch.setattr(ds_utils, "dist", TwoEqualRanks)
    monkeypatch.setattr(ds_utils.groups, "_get_data_parallel_group", lambda: None)
    norm = ds_utils.clip_grad_norm_(model.parameters(), max_norm=clip)
    return norm, reduces


@pytest.mark.parametrize("scale", [1.0, 1e-4])  # clipping engages / does not
@pytest.mark.parametrize("checked", [True, False])
def test_zero0_clipping_equals_deepspeeds_without_its_all_reduce(
    scale: float, checked: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    clip = 1.0
    theirs, ours = _model_with_grads(0, scale), _model_with_grads(0, scale)
    their_norm, reduces = _deepspeed_clip(theirs, clip, monkeypatch)
    assert reduces == ["all_reduce"]  # what ours no longer makes
    engine = _Engine(ours, clip)
    keep_grad_norm(engine)
    if checked:
        assert checked_grads_finite(engine)
        assert engine.fne_checked_norm is not None  # handed to the step's clipping
    engine.clip_fp32_gradients()
    assert engine.fne_checked_norm is None  # used once
    for a, b in zip(theirs.parameters(), ours.parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            assert torch.equal(a.grad, b.grad)
    assert torch.equal(engine._global_grad_norm.reshape(()), their_norm.reshape(()))
    if scale == 1.0:  # the case where clipping changed something
        assert not torch.equal(ours[0].weight.grad, _model_with_grads(0, scale)[0].weight.grad)


def test_a_non_finite_check_hands_no_norm_to_the_clip() -> None:
    model = _model_with_grads(1, 1.0)
    model[2].bias.grad[0] = float("nan")
    engine = _Engine(model, 1.0)
    keep_grad_norm(engine)
    assert not checked_grads_finite(engine)
    assert engine.fne_checked_norm is None


def test_a_twin_without_deepspeeds_clip_only_gets_the_check() -> None:
    class Twin:  # the DDP twin clips with torch's clip_grad_norm_ itself
        module = _model_with_grads(2, 1.0)

    twin = Twin()
    keep_grad_norm(twin)
    assert checked_grads_finite(twin) and not hasattr(twin, "fne_checked_norm")

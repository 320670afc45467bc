"""Batch-norm running statistics committed with the rest of a step's state.

A training forward moves every batch-norm layer's running mean and variance in place; a step
later found non-finite must leave them as they were. Rather than copy every buffer before each
step to put it back, the step's forward runs with the layers normalising by the batch (as in
training) but not tracking, records each layer's batch mean and unbiased variance, and the loop
applies them (the layer's own exponential or cumulative average) only when it commits the step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


class PendingRunningStats:
    """The batch statistics one step's forwards saw, per batch-norm layer, until ``commit``."""

    def __init__(self) -> None:
        self.seen: list[tuple[_BatchNorm, Tensor, Tensor]] = []

    def record(self, layer: _BatchNorm, inputs: tuple[Tensor, ...], _output: Tensor) -> None:
        x = inputs[0].detach().float()  # in float32, as the layer's own kernel sums
        dims = [d for d in range(x.dim()) if d != 1]  # every dimension but the channels
        var, mean = torch.var_mean(x, dim=dims, correction=1)
        self.seen.append((layer, mean, var))

    @torch.no_grad()
    def commit(self) -> None:
        """Apply what each layer saw, in the order it saw it, as its own forward would have."""
        for layer, mean, var in self.seen:
            layer.num_batches_tracked.add_(1)
            if layer.momentum is None:  # cumulative moving average
                factor = 1.0 / float(layer.num_batches_tracked)
            else:
                factor = layer.momentum
            layer.running_mean.mul_(1 - factor).add_(mean.to(layer.running_mean), alpha=factor)
            layer.running_var.mul_(1 - factor).add_(var.to(layer.running_var), alpha=factor)
        self.seen.clear()


def _tracking(modules: tuple[nn.Module, ...]) -> list[_BatchNorm]:
    return [
        m
        for module in modules
        for m in module.modules()
        if isinstance(m, _BatchNorm)
        and m.training
        and m.track_running_stats
        and m.running_mean is not None
        and m.num_batches_tracked is not None
    ]


@contextlib.contextmanager
def deferred_running_stats(*modules: nn.Module) -> Iterator[PendingRunningStats]:
    """Inside, the training batch-norm layers of ``modules`` normalise by the batch as
    usual but leave their running statistics alone; what they saw is in the yielded object."""
    pending = PendingRunningStats()
    layers = _tracking(modules)
    handles = [layer.register_forward_hook(pending.record) for layer in layers]
    for layer in layers:
        layer.track_running_stats = False
    try:
        yield pending
    finally:
        for layer in layers:
            layer.track_running_stats = True
        for handle in handles:
            handle.remove()

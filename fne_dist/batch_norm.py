"""Batch norm in float32 under a bf16/fp16 engine.

DeepSpeed's bf16 and fp16 engines cast a module's parameters to the low precision but leave its
buffers as they were loaded (``data_types.buffer_dtype`` unset): a batch-norm layer then holds
bf16 weight and bias next to fp32 running statistics, a mix torch's kernels refuse ("expected
scalar type BFloat16 but found Float") wherever the statistics are read: evaluation, and the
frozen blocks of a partly trained tower in every step. Casting the statistics to bf16
(``buffer_dtype: bf16``) would work but rounds every running-average update to 8 bits of
mantissa. Instead the layer computes as under torch's autocast (and FSDP's mixed precision,
which keeps batch norm in full precision by default): activations in the low precision, the
affine parameters taken in float32, the statistics kept and updated in float32 — the mixed
input the CPU and CUDA batch-norm kernels accept. Gradients reach the bf16 parameters through
the cast. Layers whose parameters and statistics share a dtype (every fp32 run) run torch's own
forward unchanged.
"""

from __future__ import annotations

import types

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


def keep_batch_norm_fp32(module: nn.Module) -> int:
    """Make every plain batch-norm layer in ``module`` (BatchNorm1d/2d/3d; not SyncBatchNorm,
    which has its own forward) normalise with float32 affine parameters when its parameters are
    in a lower precision than its running statistics. Returns the number of layers changed."""
    changed = 0
    for layer in module.modules():
        if isinstance(layer, _BatchNorm) and type(layer).forward is _BatchNorm.forward:
            # An instance attribute: the module's __call__ (and so its hooks: ZeRO-3's gather,
            # running_stats' recording) still runs around it; deepcopy rebinds it to the copy.
            layer.forward = types.MethodType(_forward, layer)
            changed += 1
    return changed


def _forward(self: _BatchNorm, x: Tensor) -> Tensor:
    weight, bias, stats = self.weight, self.bias, self.running_mean
    if weight is None or stats is None or weight.dtype == stats.dtype:
        return _BatchNorm.forward(self, x)
    # torch's _BatchNorm.forward, with the affine parameters in the statistics' dtype
    self._check_input_dim(x)
    factor = 0.0 if self.momentum is None else self.momentum
    if self.training and self.track_running_stats and self.num_batches_tracked is not None:
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average
            factor = 1.0 / float(self.num_batches_tracked)
    tracked = not self.training or self.track_running_stats
    return F.batch_norm(
        x,
        self.running_mean if tracked else None,
        self.running_var if tracked else None,
        weight.to(stats.dtype),
        None if bias is None else bias.to(stats.dtype),
        self.training,  # eval reads the running statistics (present: checked above)
        factor,
        self.eps,
    )

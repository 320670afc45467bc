"""Batch norm in float32 next to bf16 parameters (fne_dist/batch_norm.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fne_dist.batch_norm import keep_batch_norm_fp32
from fne_dist.config import ModelConfig
from fne_dist.encoders import build_tiny_image_backbone, build_tiny_text_backbone
from fne_dist.model import DualEncoder
from fne_dist.running_stats import deferred_running_stats


def _params_to(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """What DeepSpeed's bf16 engine does to a module: parameters cast, buffers left alone."""
    for p in module.parameters():
        p.data = p.data.to(dtype)
    return module


def _layer(momentum: float | None = 0.1) -> nn.BatchNorm2d:
    layer = nn.BatchNorm2d(6, momentum=momentum)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
    return layer


@pytest.mark.parametrize("momentum", [0.1, None])
def test_bf16_parameters_normalise_like_an_fp32_layer_and_keep_fp32_statistics(
    momentum: float | None,
) -> None:
    """Invariant: a layer with bf16 weight/bias and fp32 running statistics (a DeepSpeed bf16
    engine's) trains and evaluates; its statistics stay fp32 and move exactly as an fp32
    layer's with the same (bf16-rounded) parameters on the same input; outputs and parameter
    gradients agree with that layer's to bf16 rounding. Unpatched, torch refuses the mix."""
    torch.manual_seed(0)
    ref = _layer(momentum)
    ref.weight.data = ref.weight.data.bfloat16().float()
    ref.bias.data = ref.bias.data.bfloat16().float()
    low = _params_to(copy.deepcopy(ref), torch.bfloat16)
    with pytest.raises(RuntimeError):  # the failure this module exists for
        low.eval()(torch.randn(4, 6, 5, 5, dtype=torch.bfloat16))
    assert keep_batch_norm_fp32(low) == 1
    for training in (True, True, False):
        ref.train(training), low.train(training)
        x = torch.randn(4, 6, 5, 5).bfloat16()
        y_ref, y_low = ref(x.float()), low(x)
        assert y_low.dtype == torch.bfloat16
        torch.testing.assert_close(y_low.float(), y_ref, rtol=1e-2, atol=2e-2)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            a, b = getattr(ref, name), getattr(low, name)
            assert b.dtype == a.dtype
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
        if training:
            ref.zero_grad(), low.zero_grad()
            y_ref.square().sum().backward()
            y_low.float().square().sum().backward()
            assert low.weight.grad.dtype == torch.bfloat16
            for name in ("weight", "bias"):
                grad, want = getattr(low, name).grad, getattr(ref, name).grad
                torch.testing.assert_close(grad.float(), want, rtol=2e-2, atol=0.1, msg=name)


def test_fp32_layers_run_torchs_own_forward_bit_for_bit() -> None:
    """Invariant: where parameters and statistics share a dtype (every fp32 run), the patched
    layer gives bit-identical outputs, gradients and statistics to an untouched one."""
    torch.manual_seed(1)
    a = _layer()
    b = copy.deepcopy(a)
    keep_batch_norm_fp32(b)
    for training in (True, False):
        a.train(training), b.train(training)
        x = torch.randn(3, 6, 4, 4)
        ya, yb = a(x), b(x)
        assert torch.equal(ya, yb)
        assert torch.equal(a.running_mean, b.running_mean)
        assert torch.equal(a.running_var, b.running_var)
    ya.sum().backward(), yb.sum().backward()


def test_a_deep_copy_normalises_with_its_own_parameters() -> None:
    """Invariant: the momentum encoder's deepcopy().float() of a patched model uses its own
    parameters and statistics, not the online model's (the bound forward follows the copy)."""
    online = _layer()
    keep_batch_norm_fp32(online)
    twin = copy.deepcopy(online).float()
    with torch.no_grad():
        twin.weight.mul_(2.0)
    x = torch.randn(2, 6, 3, 3)
    online.eval(), twin.eval()
    assert not torch.equal(online(x), twin(x))
    twin.train()(x)
    assert twin.num_batches_tracked.item() == 1 and online.num_batches_tracked.item() == 0


def test_a_bf16_dual_encoder_evaluates_and_trains_with_deferred_statistics() -> None:
    """Invariant: the dual encoder with a trained batch-norm tower, parameters cast to bf16 as
    DeepSpeed casts them, embeds in eval mode (what evaluation does) and in a training forward
    under ``deferred_running_stats`` (what the loop does), committing fp32 statistics."""
    cfg = ModelConfig(embed_dim=8, head="linear")
    image = build_tiny_image_backbone(32, out_dim=16)
    text = build_tiny_text_backbone(max_length=8)
    model = _params_to(DualEncoder(image, text, 16, text.out_dim, cfg), torch.bfloat16)
    batch = {
        "pixels": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8),
        **text.tokenize(["a cat", "a dog", "two birds", "a red car"]),
    }
    before = image.trunk[1].running_mean.clone()
    with deferred_running_stats(model) as pending:
        img, txt, _ = model(batch)
    assert img.dtype == txt.dtype == torch.float32
    assert torch.isfinite(img).all() and torch.isfinite(txt).all()
    assert torch.equal(image.trunk[1].running_mean, before)  # deferred until the commit
    pending.commit()
    assert image.trunk[1].running_mean.dtype == torch.float32
    assert not torch.equal(image.trunk[1].running_mean, before)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model.encode_image(batch)).all()

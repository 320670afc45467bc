"""The frozen early layers run once for the online and the momentum encoder (shared_prefix)."""

from __future__ import annotations

import functools

import torch

from fne_dist.config import ImageEncoderConfig, ModelConfig, TextEncoderConfig
from fne_dist.encoders import (
    _train_last,
    build_image_backbone,
    build_text_backbone,
    build_tiny_text_backbone,
)
from fne_dist.model import build_dual_encoder
from fne_dist.momentum import ema_update, make_momentum_copy
from fne_dist.shared_prefix import SharedPrefix


@functools.cache
def _finetune_pair(image_blocks: int | None, text_blocks: int | None):
    """The fine-tuning towers (EfficientNet-Lite0 + MiniLM-L6, pretrained, small inputs), the
    momentum copy a few EMA steps away from the online model, and a batch."""
    cfg = ModelConfig(
        image=ImageEncoderConfig(
            type="efficientnet_lite", name_or_path="efficientnet-lite0", image_size=32,
            frozen=False, train_blocks=image_blocks, channels_last=True,
        ),
        text=TextEncoderConfig(
            name_or_path="all-MiniLM-L6-v2", max_length=8, frozen=False, train_blocks=text_blocks
        ),
        embed_dim=16,
        head="mlp",
    )  # fmt: skip
    img, txt = build_image_backbone(cfg.image), build_text_backbone(cfg.text)
    model = build_dual_encoder(cfg, img, txt).train()
    momentum = make_momentum_copy(model)
    torch.manual_seed(0)
    for _ in range(2):  # the trained parameters move; the momentum copy trails them
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.01 * torch.randn_like(p))
        ema_update(momentum, model, 0.99)  # 0.5 would round exactly
    tok = txt.tokenize(["a dog", "a cat on a mat", "grinning face", "x"])
    batch = {"pixels": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), **tok}
    return model, momentum, batch


def _calls(module: torch.nn.Module) -> list[int]:
    seen: list[int] = []
    module.register_forward_hook(lambda *_: seen.append(1))
    return seen


def test_shared_prefix_gives_the_full_momentum_forward_bit_for_bit() -> None:
    """Invariant: with train_blocks on both towers, the momentum embeddings computed from the
    online forward's frozen-prefix output equal the momentum model's own full forward bit for
    bit (dropout draws included: frozen modules are in eval mode and draw nothing), and the
    frozen modules of the momentum copy are really skipped (a layer inside one is not called);
    the online embeddings are untouched, and afterwards the momentum model runs in full again."""
    model, momentum, batch = _finetune_pair(4, 2)
    shared = SharedPrefix(model, model, momentum)
    assert len(shared.towers) == 2
    inner_img = _calls(momentum.image_backbone.trunk._blocks[0]._depthwise_conv)
    inner_txt = _calls(momentum.text_backbone.model.encoder.layer[0].attention)
    with torch.no_grad():
        torch.manual_seed(1)
        want_online = model(batch)
        want = momentum(batch)
        assert (len(inner_img), len(inner_txt)) == (1, 1)
        torch.manual_seed(1)
        got_online = shared.online(batch)
        got = shared.momentum(batch)
        assert (len(inner_img), len(inner_txt)) == (1, 1)  # skipped
        torch.manual_seed(1)
        model(batch)
        again = momentum(batch)
        assert (len(inner_img), len(inner_txt)) == (2, 2)  # no stub left behind
    for a, b in zip((*want_online, *want), (*got_online, *got), strict=True):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(again, want, strict=True))
    assert not torch.equal(want[0], want_online[0])  # the towers do differ (a real check)


def test_shared_prefix_needs_a_frozen_block_and_ema_keeps_frozen_weights() -> None:
    """Invariants: a tower with no frozen block shares nothing (frozen embeddings alone are two
    summed outputs, not one state); ``ema_update`` leaves a frozen parameter's momentum copy
    bit-equal to it (m·p + (1 − m)·p rounds away from p for some values) while trained ones
    move."""
    txt = build_tiny_text_backbone()
    before, blocks = txt.blocks()
    txt.fixed = _train_last(before, blocks, len(blocks), "model.text.train_blocks")
    assert txt.fixed and txt.frozen_prefix() == []
    txt.fixed = _train_last(before, blocks, len(blocks) - 1, "model.text.train_blocks")
    assert txt.frozen_prefix() == txt.fixed
    model, momentum, _ = _finetune_pair(4, 2)
    frozen = trained = 0
    for (name, p), q in zip(model.named_parameters(), momentum.parameters(), strict=True):
        if p.requires_grad:
            trained += int(not torch.equal(p, q))
        else:
            assert torch.equal(p, q), name
            frozen += 1
    assert frozen > 50 and trained > 10


def test_online_memory_enqueues_the_online_embeddings_and_runs_no_momentum_forward() -> None:
    """Invariant (memory.encoder: online): the step's gathered block, what the memory gets, is
    the online forward's embeddings detached, and the momentum model is never called."""
    from fne_dist.fne import FneConfig, SimilarityStats
    from fne_dist.memory import MomentumMemory
    from fne_dist.model import DualEncoder
    from fne_dist.shared_prefix import OnlineMemory
    from fne_dist.step import StepPosition, forward_step

    torch.manual_seed(0)
    model = DualEncoder(None, None, 6, 6, ModelConfig(embed_dim=4, head="linear"))
    momentum = make_momentum_copy(model)
    called = _calls(momentum)
    gen = torch.Generator().manual_seed(1)
    batch = {
        "img_feat": torch.randn(8, 6, generator=gen),
        "txt_feat": torch.randn(8, 6, generator=gen),
        "ids": torch.arange(8),
        "groups": torch.full((8,), -1),
    }
    pair = OnlineMemory(model)
    memory, stats, cfg = MomentumMemory(20, 4, seed=0), SimilarityStats(), FneConfig()
    at = StepPosition(0, 0, False)
    out = forward_step(pair.online, pair.momentum, batch, memory, stats, cfg, at)
    img, txt, _ = model(batch)
    assert called == [] and not out.gathered.img_ND.requires_grad
    assert torch.equal(out.gathered.img_ND, img) and torch.equal(out.gathered.txt_ND, txt)
    assert out.loss.requires_grad

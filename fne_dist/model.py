"""The dual encoder: backbones (frozen ones are run once and cached) + projection heads.

Legend: B batch, F backbone feature dim, D shared embedding dim, I images, T captions.

No loss, no memory, no collectives here. A frozen tower's backbone is evaluated once per split
(``data/feature_shards.py``) and training then feeds its features to the head: the backbone
would give the same output every epoch, and its momentum copy equals itself. A trainable tower
keeps its backbone inside the module so DeepSpeed trains (and partitions) it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .batch_norm import keep_batch_norm_fp32
from .config import ModelConfig


class ProjectionHead(nn.Module):
    """F → D: "linear", "mlp" (Linear–GELU–Linear) or "none" (identity; needs F == D)."""

    def __init__(self, in_dim: int, out_dim: int, kind: str) -> None:
        super().__init__()
        if kind == "none":
            if in_dim != out_dim:
                raise ValueError(
                    "model.head=none needs backbone dim == model.embed_dim, "
                    f"got {in_dim} vs {out_dim}"
                )
            self.net: nn.Module = nn.Identity()
        elif kind == "linear":
            self.net = nn.Linear(in_dim, out_dim)
        elif kind == "mlp":
            self.net = nn.Sequential(
                nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim)
            )
        else:
            raise ValueError(f"model.head: unknown kind {kind!r} (valid: none, linear, mlp)")

    def forward(self, feat_BF: Tensor) -> Tensor:
        return self.net(feat_BF)


def _project(head: nn.Module, feat_BF: Tensor) -> Tensor:
    """``head`` applied in its weights' dtype (bf16 under a bf16 engine), returned in fp32: the
    embeddings meet the fp32 memory and the loss, which stay fp32 at every precision."""
    dtype = next(head.parameters()).dtype
    return head(feat_BF.to(dtype)).float()


class DualEncoder(nn.Module):
    """Image and text towers → L2-normalised D-dim embeddings; owns infonce's temperature.

    A tower whose backbone is ``None`` expects cached features in the batch (``img_feat`` /
    ``txt_feat``); otherwise it expects ``pixels`` / ``input_ids`` + ``attention_mask``.
    """

    def __init__(
        self,
        image_backbone: nn.Module | None,
        text_backbone: nn.Module | None,
        image_dim: int,
        text_dim: int,
        cfg: ModelConfig,
        temperature: float = 0.07,
    ) -> None:
        super().__init__()
        self.embed_dim = cfg.embed_dim
        self.image_backbone = image_backbone
        self.text_backbone = text_backbone
        # Trained towers meet a bf16/fp16 engine's low-precision parameters: batch norm keeps
        # its statistics and arithmetic in fp32 (batch_norm.py)
        for backbone in (image_backbone, text_backbone):
            if backbone is not None:
                keep_batch_norm_fp32(backbone)
        self.image_head = ProjectionHead(image_dim, cfg.embed_dim, cfg.head)
        self.text_head = ProjectionHead(text_dim, cfg.embed_dim, cfg.head)
        # Shape (1,), not a scalar: DeepSpeed broadcasts parameters as byte views at init.
        self.temperature = nn.Parameter(torch.tensor([float(temperature)]))

    def encode_image(self, batch: dict[str, Tensor]) -> Tensor:
        if self.image_backbone is None:
            feat_BF = batch["img_feat"]
        else:
            feat_BF = self.image_backbone(batch["pixels"])
        return F.normalize(_project(self.image_head, feat_BF), dim=-1)

    def encode_text(self, batch: dict[str, Tensor]) -> Tensor:
        if self.text_backbone is None:
            feat_BF = batch["txt_feat"]
        else:
            feat_BF = self.text_backbone(batch["input_ids"], batch["attention_mask"])
        return F.normalize(_project(self.text_head, feat_BF), dim=-1)

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(image embeddings B×D, text embeddings B×D, temperature). The temperature leaves
        through forward so that it is gathered under ZeRO-3 like every other parameter."""
        return self.encode_image(batch), self.encode_text(batch), self.temperature * 1.0


def build_dual_encoder(
    cfg: ModelConfig, image_backbone: nn.Module, text_backbone: nn.Module, temperature: float = 0.07
) -> DualEncoder:
    """The trainable model for ``cfg``: a frozen tower's backbone stays outside (its features
    are cached), a trainable one goes inside."""
    return DualEncoder(
        None if cfg.image.frozen else image_backbone,
        None if cfg.text.frozen else text_backbone,
        image_backbone.out_dim,
        text_backbone.out_dim,
        cfg,
        temperature,
    )

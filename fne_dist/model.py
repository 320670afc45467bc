"""The dual encoder: backbones (frozen ones are run once and cached) + projection heads.

Legend: B batch, F backbone feature dim, D shared embedding dim, I images, T captions.

No loss, no memory, no collectives here. A frozen tower's backbone is evaluated once per split
(``cached_features``) and training then feeds its features to the head: the backbone would give
the same output every epoch, and its momentum copy equals itself. A trainable tower keeps its
backbone inside the module so DeepSpeed trains (and partitions) it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import ModelConfig
from .data.pairs import PairTable


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
        self.image_backbone = image_backbone
        self.text_backbone = text_backbone
        self.image_head = ProjectionHead(image_dim, cfg.embed_dim, cfg.head)
        self.text_head = ProjectionHead(text_dim, cfg.embed_dim, cfg.head)
        # Shape (1,), not a scalar: DeepSpeed broadcasts parameters as byte views at init.
        self.temperature = nn.Parameter(torch.tensor([float(temperature)]))

    def encode_image(self, batch: dict[str, Tensor]) -> Tensor:
        if self.image_backbone is None:
            feat_BF = batch["img_feat"]
        else:
            feat_BF = self.image_backbone(batch["pixels"])
        return F.normalize(self.image_head(feat_BF.float()), dim=-1)

    def encode_text(self, batch: dict[str, Tensor]) -> Tensor:
        if self.text_backbone is None:
            feat_BF = batch["txt_feat"]
        else:
            feat_BF = self.text_backbone(batch["input_ids"], batch["attention_mask"])
        return F.normalize(self.text_head(feat_BF.float()), dim=-1)

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


def _fingerprint(parts: dict) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


@torch.no_grad()
def backbone_features(
    backbone: nn.Module, inputs: list[Tensor] | Tensor, batch_size: int = 64
) -> Tensor:
    """Run a frozen backbone over inputs in batches (eval mode, no grad) → N×F float32."""
    was_training = backbone.training
    backbone.eval()
    outs = []
    n = len(inputs) if isinstance(inputs, list) else inputs.shape[0]
    for start in range(0, n, batch_size):
        chunk = inputs[start : start + batch_size]
        outs.append(backbone(chunk if isinstance(chunk, Tensor) else torch.stack(chunk)).float())
    backbone.train(was_training)
    return torch.cat(outs)


def cached_features(
    table: PairTable,
    image_backbone: nn.Module | None,
    text_backbone: nn.Module | None,
    cache_dir: Path,
    identity: dict,
    batch_size: int = 64,
) -> dict[str, Tensor]:
    """Features of a split's images (I×F) and captions (T×F) from frozen backbones.

    Stored as safetensors under ``cache_dir`` keyed by ``identity`` (shard contents + encoder
    settings), so a second run on the same data starts training at once.
    """
    path = Path(cache_dir) / f"features-{_fingerprint(identity)}.safetensors"
    if path.is_file():
        return load_file(str(path))
    out: dict[str, Tensor] = {}
    if image_backbone is not None:
        out["img_feat"] = backbone_features(image_backbone, table.images_I, batch_size)
    if text_backbone is not None:
        tokens = text_backbone.tokenize(table.captions)
        feats = []
        with torch.no_grad():
            text_backbone.eval()
            for start in range(0, table.num_captions, batch_size):
                sl = slice(start, start + batch_size)
                feats.append(
                    text_backbone(tokens["input_ids"][sl], tokens["attention_mask"][sl]).float()
                )
        out["txt_feat"] = torch.cat(feats)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in out.items()}, str(tmp))
    tmp.replace(path)  # atomic: a crash never leaves a half-written cache behind
    return out

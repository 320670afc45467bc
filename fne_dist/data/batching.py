"""Per-sample transform and batch collation for training (both run in loader workers).

A batch is a dict of tensors: ``ids``/``groups`` (B, int64) plus, per tower, either cached
features (``img_feat`` / ``txt_feat``, B×F) or raw inputs (``pixels`` B×3×S×S uint8,
``input_ids``/``attention_mask`` B×L from the tokenizer).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from .decode import BadSample, Decoded


class PairTransform:
    """Decoded sample → one training pair (its first caption)."""

    def __init__(self, preprocess: Callable[[Image.Image], Tensor] | None) -> None:
        self.preprocess = preprocess

    def __call__(self, d: Decoded) -> dict[str, Any]:
        out: dict[str, Any] = {"ids": d.image_id, "groups": d.group}
        if d.img_feat is not None:
            out["img_feat"] = torch.from_numpy(d.img_feat.reshape(-1))
        elif d.image is not None and self.preprocess is not None:
            out["pixels"] = self.preprocess(d.image)
        else:
            raise BadSample("missing_image", d.key)
        if d.txt_feat is not None:
            out["txt_feat"] = torch.from_numpy(d.txt_feat[0])
        else:
            out["caption"] = d.captions[0]
        return out


class PairCollate:
    """Pairs → batch; captions are tokenised here (once per batch, in the loader worker)."""

    def __init__(self, tokenize: Callable[[list[str]], dict[str, Tensor]] | None) -> None:
        self.tokenize = tokenize

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Tensor]:
        batch = {
            "ids": torch.tensor([it["ids"] for it in items], dtype=torch.long),
            "groups": torch.tensor([it["groups"] for it in items], dtype=torch.long),
        }
        for key in ("img_feat", "pixels", "txt_feat"):
            if key in items[0]:
                batch[key] = torch.stack([it[key] for it in items])
        if "caption" in items[0]:
            if self.tokenize is None:
                raise ValueError("captions need a tokenizer (the text tower is not cached)")
            tokens = self.tokenize([it["caption"] for it in items])
            batch.update(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return batch

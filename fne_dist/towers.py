"""The run's two backbones, each built when it is first needed.

A frozen tower whose feature cache is complete is never run: training and evaluation read its
cached features, and its projection head needs only its width. Loading it anyway cost each rank
of the default run ~4 CPU seconds (MiniLM: transformers' import and its weights), on 2 cores a
few percent of the run for nothing. ``Towers`` builds a backbone on first use, and reads a
frozen Hugging Face text tower's width from its config.json.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

from .config import ModelConfig
from .encoders import (
    TINY,
    ImageBackbone,
    TextBackbone,
    build_image_backbone,
    build_text_backbone,
    hf_model_dir,
)
from .model import DualEncoder

TOWERS = ("image", "text")


class Towers:
    """``image`` and ``text``: the backbones of ``cfg``, built on first access (or by
    ``build``); ``given`` wraps backbones built elsewhere (None: never used)."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg
        self._image: ImageBackbone | None = None
        self._text: TextBackbone | None = None

    @classmethod
    def given(
        cls, cfg: ModelConfig, image: ImageBackbone | None, text: TextBackbone | None
    ) -> Towers:
        towers = cls(cfg)
        towers._image, towers._text = image, text
        return towers

    def build(self, names: Iterable[str]) -> None:
        """Build ``names`` now, before the run seeds its random generators (the order of a
        run that built both at its start; a later build leaves the generators alone)."""
        for name in names:
            getattr(self, name)

    @property
    def image(self) -> ImageBackbone:
        if self._image is None:
            with torch.random.fork_rng(devices=[]):  # the run's seeded draws stay as they were
                self._image = build_image_backbone(self.cfg.image)
        return self._image

    @property
    def text(self) -> TextBackbone:
        if self._text is None:
            with torch.random.fork_rng(devices=[]):
                self._text = build_text_backbone(self.cfg.text)
        return self._text

    def image_dim(self) -> int:
        return self.image.out_dim

    def text_dim(self) -> int:
        """The text features' width: a frozen Hugging Face tower's ``hidden_size`` (what
        ``TextBackbone.out_dim`` reads from the same config) without loading it."""
        text = self.cfg.text
        if self._text is None and text.frozen and text.type == "hf" and text.name_or_path != TINY:
            config = Path(hf_model_dir(text.name_or_path)) / "config.json"
            if config.is_file():
                width = json.loads(config.read_text()).get("hidden_size")
                if isinstance(width, int):
                    return width
        return self.text.out_dim

    def dual_encoder(self, temperature: float) -> DualEncoder:
        """``model.build_dual_encoder``'s model (a frozen tower's backbone stays outside, a
        trained one goes inside), without loading a frozen tower only to read its width."""
        cfg = self.cfg
        return DualEncoder(
            None if cfg.image.frozen else self.image,
            None if cfg.text.frozen else self.text,
            self.image_dim(),
            self.text_dim(),
            cfg,
            temperature,
        )

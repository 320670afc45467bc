"""Towers: the run's backbones built only when needed (fne_dist/towers.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from fne_dist.config import load_config
from fne_dist.encoders import build_text_backbone
from fne_dist.loop_inputs import SPLITS, cache_dir, raw_shards, towers_to_load
from fne_dist.towers import Towers
from tests.shard_factory import write_dataset

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny.yaml"


def _cfg(tmp_path: Path, *extra: str):
    data = tmp_path / "data"
    if not data.exists():
        write_dataset(data, [6])
    spec = f"{data}/*.tar"
    return load_config(
        TINY,
        [
            f"run.output_dir={tmp_path}",
            f"data.train={spec}",
            f"data.val={spec}",
            f"data.test={spec}",
            f"data.cache_dir={tmp_path / 'cache'}",
            *extra,
        ],
    )


def test_frozen_towers_load_only_while_a_feature_cache_is_missing(tmp_path: Path) -> None:
    """Invariant: a trained tower is always loaded; a frozen one only while some split's feature
    cache is incomplete (the build needs it), never once every split's cache is complete."""
    frozen = ("model.image.frozen=true", "model.text.frozen=true")
    assert towers_to_load(_cfg(tmp_path)) == ["image", "text"]  # both trained
    assert towers_to_load(_cfg(tmp_path, "model.text.frozen=true")) == ["image", "text"]
    cfg = _cfg(tmp_path, *frozen)
    assert towers_to_load(cfg) == ["image", "text"]  # no cache yet
    dirs = list(dict.fromkeys(cache_dir(cfg, s, raw_shards(cfg, s)) for s in SPLITS))
    assert len(dirs) == 2  # train's, and the one val and test share (the same shards here)
    for out in dirs:
        assert towers_to_load(cfg) == ["image", "text"]  # some cache still missing
        out.mkdir(parents=True)
        (out / "sizes.json").write_text("{}")  # what marks a complete build
    assert towers_to_load(cfg) == []


def test_a_frozen_text_towers_width_is_read_without_loading_it(tmp_path: Path) -> None:
    """Invariant: the width Towers reads from a frozen Hugging Face text tower's config.json
    is the loaded backbone's out_dim (two implementations compared), and reading it loads
    nothing; a tower built on first use leaves the run's seeded random draws as they were."""
    cfg = _cfg(tmp_path, "model.text.name_or_path=all-MiniLM-L6-v2", "model.text.frozen=true").model
    towers = Towers(cfg)
    assert towers.text_dim() == build_text_backbone(cfg.text).out_dim == 384
    assert towers._text is None  # not loaded
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    towers.build(["image"])  # a random init inside
    assert torch.equal(torch.rand(3), expected)
    model = towers.dual_encoder(0.07)
    first = next(m for m in model.text_head.modules() if isinstance(m, torch.nn.Linear))
    assert model.text_backbone is None and first.in_features == 384

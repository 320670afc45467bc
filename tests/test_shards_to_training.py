"""From what users have to a trained model: a Karpathy split file + images, converted with
``python -m fne_dist.shards karpathy``, read by the training stream and the evaluation reader,
and trained on end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from fne_dist.data import StreamOptions, TrainStream, load_split, shard_list

ROOT = Path(__file__).resolve().parents[1]
COLOURS = ["red", "green", "blue", "yellow", "purple"]


def _karpathy(root: Path, n_train: int = 40, n_val: int = 8, n_test: int = 8) -> Path:
    """A Flickr-style Karpathy file (no filepath) with 5 sentences per image, and its images."""
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    entries, sentid = [], 0
    splits = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    for imgid, split in enumerate(splits):
        colour = COLOURS[imgid % len(COLOURS)]
        Image.new("RGB", (16, 16), (imgid * 5 % 256, 40, 90)).save(images_dir / f"{imgid}.jpg")
        sentences = []
        for k in range(5):
            raw = f"A {colour} square, picture {imgid}, view {k}."
            sentences.append({"raw": raw, "tokens": raw.lower().split(), "sentid": sentid})
            sentid += 1
        entries.append(
            {"filename": f"{imgid}.jpg", "imgid": imgid, "split": split, "sentences": sentences}
        )
    path = root / "dataset_flickr30k.json"
    path.write_text(json.dumps({"dataset": "flickr30k", "images": entries}))
    return path


def _convert(tmp_path: Path) -> tuple[Path, subprocess.CompletedProcess]:
    captions = _karpathy(tmp_path / "raw")
    out = tmp_path / "shards"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "fne_dist.shards",
            "karpathy",
            "--captions",
            str(captions),
            "--images",
            str(tmp_path / "raw" / "images"),
            "--out",
            str(out),
            "--shard-size",
            "64",
            "--quiet",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    return out, run


@pytest.mark.system
def test_karpathy_conversion_reads_back_as_pairs_and_eval_images(tmp_path: Path) -> None:
    """Invariant: after conversion, the training stream sees every train (image, caption) pair
    once per epoch (pair layout, 200 pairs → 12 batches of 16, 8 dropped), and the evaluation
    reader gets every val image once with its 5 captions (image layout), ids = Karpathy imgid."""
    out, _ = _convert(tmp_path)
    train = shard_list(str(out / "train" / "*.tar"), "data.train")
    assert train.total == 200
    seen = []
    stream = TrainStream(
        train,
        StreamOptions(batch=16, seed=0, caption_key="txt"),
        lambda d: {"ids": d.image_id, "groups": d.group, "caption": d.captions[0]},
        lambda items: {
            "ids": torch.tensor([it["ids"] for it in items]),
            "captions": [it["caption"] for it in items],
        },
    )
    for batch, _ in stream.epoch(0):
        seen += list(zip(batch["ids"].tolist(), batch["captions"], strict=True))
    assert len(seen) == 12 * 16 and len(set(seen)) == len(seen)
    for image_id, caption in seen:
        assert 0 <= image_id < 40 and f"picture {image_id}," in caption

    val = load_split(
        shard_list(str(out / "val" / "*.tar"), "data.val"),
        "data.val",
        lambda img: torch.zeros(3, 4, 4, dtype=torch.uint8),
    )
    assert sorted(val.image_ids_I.tolist()) == list(range(40, 48))
    assert val.num_captions == 40
    for t, caption in enumerate(val.captions):
        assert f"picture {int(val.image_ids_I[val.text_to_image_T[t]])}," in caption


@pytest.mark.system
@pytest.mark.timeout(300)
def test_training_on_converted_shards_end_to_end(tmp_path: Path) -> None:
    """Invariant: `python -m fne_dist.train` trains and evaluates on shards written by
    `python -m fne_dist.shards karpathy` as they are (5 captions per val/test image)."""
    out, _ = _convert(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "fne_dist.train",
            "--config",
            "tests/configs/tiny.yaml",
            f"data.train={out}/train/*.tar",
            f"data.val={out}/val/*.tar",
            f"data.test={out}/test/*.tar",
            f"run.output_dir={tmp_path / 'runs'}",
            "train.epochs=2",
            "train.warmup_steps=4",
            "train.warmup_epochs=null",
            "memory.size=48",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((tmp_path / "runs" / "tiny" / "metrics.json").read_text())
    assert metrics["steps"] == 2 * (200 // 16)
    assert metrics["data"]["bad_samples"] == {}
    assert metrics["data"]["dropped_by_plan"] == 2 * (200 - 12 * 16)
    assert 0 < metrics["test"]["rsum"] <= 600

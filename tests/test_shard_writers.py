"""Tests for the shard writers of ``python -m fne_dist.shards``.

Every test builds tiny inputs in ``tmp_path`` (images made with PIL, annotation files written
here) and reads the shards back with the plain ``tarfile`` module, so a test fails when the
written bytes break the shard conventions, whatever the writer's own code believes.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from fne_dist.shards import __main__ as cli
from fne_dist.shards import writer

IMAGE_EXTS = ("jpg", "png", "webp")


# ---------------------------------------------------------------------------------------------
# helpers


def _image_bytes(fmt: str, color: tuple[int, int, int], size: int = 6) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format=fmt)
    return buf.getvalue()


def _write_image(path: Path, fmt: str, color: tuple[int, int, int]) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _image_bytes(fmt, color)
    path.write_bytes(data)
    return data


def _run(words: str, **paths: Path | str) -> int:
    """The CLI in-process (fast), without a progress bar: ``_run("folder --gzip", out=p)`` runs
    ``folder --gzip --out p --quiet`` (keyword ``a_b`` becomes option ``--a-b``)."""
    argv = words.split()
    for name, value in paths.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    return cli.main([*argv, "--quiet"])


def _shard_paths(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.name.endswith((".tar", ".tar.gz")))


def _read_shards(out: Path) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Samples (``key``, ``shard`` and one entry per member extension) and samples per shard."""
    samples: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    for path in _shard_paths(out):
        counts[path.name] = 0
        with tarfile.open(path, mode="r:*") as tar:
            for info in tar:
                key, ext = info.name.split(".", 1)
                if not samples or samples[-1]["key"] != key:
                    samples.append({"key": key, "shard": path.name})
                    counts[path.name] += 1
                member = tar.extractfile(info)
                assert member is not None
                assert ext not in samples[-1], f"{info.name} twice in {path.name}"
                samples[-1][ext] = member.read()
    for sample in samples:
        sample["meta"] = json.loads(sample["json"].decode("utf-8"))
        sample["caption"] = sample["txt"].decode("utf-8")
    return samples, counts


def _check_index(out: Path, counts: dict[str, int]) -> None:
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == counts


def _summary(out: Path) -> dict[str, Any]:
    return json.loads((out / "_summary.json").read_text())


def _image_of(sample: dict[str, Any]) -> tuple[str, bytes]:
    exts = [ext for ext in IMAGE_EXTS if ext in sample]
    assert len(exts) == 1, sorted(sample)
    return exts[0], sample[exts[0]]


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in _shard_paths(out)}


def _folder_dataset(root: Path, n_images: int = 7) -> Path:
    """n images with 1-3 captions each in CSV; returns the CSV path."""
    rows = []
    for i in range(n_images):
        fmt, ext = [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")][i % 3]
        _write_image(root / "img" / f"{i:02d}.{ext}", fmt, (20 * i, 255 - 20 * i, 7))
        rows += [(f"{i:02d}.{ext}", f"image {i} caption {c}") for c in range(1 + i % 3)]
    path = root / "captions.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([("filepath", "caption"), *rows])
    return path


# ---------------------------------------------------------------------------------------------
# input formats


def test_folder_csv_pairs_round_trip_with_skips(tmp_path: Path) -> None:
    """folder/CSV, pair layout: every valid pair is written exactly once with its image bytes
    unchanged under the real extension (.jpeg → jpg), image ids follow the sorted paths, string
    group labels become sorted ints, sizes.json matches the tars, and each broken input is
    counted under exactly its reason."""
    images = tmp_path / "images"
    files = {
        "a.png": _write_image(images / "a.png", "PNG", (255, 0, 0)),
        "b.jpeg": _write_image(images / "b.jpeg", "JPEG", (0, 255, 0)),
        "d.webp": _write_image(images / "d.webp", "WEBP", (0, 0, 255)),
        "e.bmp": _write_image(images / "e.bmp", "BMP", (9, 9, 9)),
    }
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rows = [
        ("filepath", "caption", "label"),
        ("b.jpeg", "  a   red\tsquare ", "cat"),  # caption_id 0
        ("./a.png", "blue one", "dog"),  # 1: "./a.png" is "a.png"
        ("b.jpeg", "second caption for b", "cat"),  # 2
        ("a.png", "   ", "dog"),  # 3: empty caption
        ("broken.jpg", "broken", "cat"),  # 4: corrupt image
        ("missing.png", "gone", "dog"),  # 5: missing image
        ("d.webp", "webp pic", ""),  # 6: no group
        ("e.bmp", "bitmap", "cat"),  # 7: unsupported type
    ]
    captions = tmp_path / "captions.csv"
    with captions.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    out = tmp_path / "out"
    rc = _run(
        "folder --group-column label --image-column filepath --prefix t --shard-size 2",
        captions=captions,
        images=images,
        out=out,
    )
    assert rc == 0
    samples, counts = _read_shards(out)
    assert counts == {"t-000000.tar": 2, "t-000001.tar": 2}
    _check_index(out, counts)
    assert [s["key"] for s in samples] == [f"t-{i:09d}" for i in range(4)]
    # sorted paths: a.png 0, b.jpeg 1, broken.jpg 2, d.webp 3, e.bmp 4, missing.png 5
    got = [
        (s["meta"]["image_id"], s["meta"]["caption_id"], s["caption"], s["meta"].get("group_id"))
        for s in samples
    ]
    assert got == [
        (0, 1, "blue one", 1),
        (1, 0, "a red square", 0),
        (1, 2, "second caption for b", 0),
        (3, 6, "webp pic", None),
    ]
    assert [_image_of(s) for s in samples] == [
        ("png", files["a.png"]),
        ("jpg", files["b.jpeg"]),
        ("jpg", files["b.jpeg"]),
        ("webp", files["d.webp"]),
    ]
    assert samples[0]["meta"]["filename"] == "a.png"
    assert samples[0]["meta"]["group"] == "dog"
    summary = _summary(out)
    assert summary["pairs"] == summary["samples"] == 4
    assert summary["shards"] == 2
    assert summary["skipped"] == {
        "corrupt_image": 1,
        "empty_caption": 1,
        "missing_image": 1,
        "unsupported_image_type": 1,
    }


def test_folder_jsonl_image_layout_carries_all_captions(tmp_path: Path) -> None:
    """folder/JSONL, image layout: one sample per image whose json lists all non-empty captions
    and their ids in row order, txt is the first one, integer group labels are kept as ids, and
    an empty caption is skipped without dropping its image."""
    red = _write_image(tmp_path / "pics" / "r.png", "PNG", (200, 0, 0))
    green = _write_image(tmp_path / "pics" / "g.jpg", "JPEG", (0, 200, 0))
    lines = [
        {"img": "r.png", "text": "red 1", "cls": 3},
        {"img": "g.jpg", "text": "green 1", "cls": 5},
        {"img": "r.png", "text": "", "cls": 3},
        {"img": "r.png", "text": "red 2", "cls": 3},
        {"img": "g.jpg", "cls": 5},  # no caption key at all
    ]
    captions = tmp_path / "pics" / "captions.jsonl"
    captions.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    out = tmp_path / "out"
    rc = _run(
        "folder --image-column img --caption-column text --group-column cls --layout image",
        captions=captions,
        out=out,
    )
    assert rc == 0
    samples, counts = _read_shards(out)
    assert counts == {"out-000000.tar": 2}  # default prefix: the --out directory name
    _check_index(out, counts)
    by_file = {s["meta"]["filename"]: s for s in samples}
    assert [s["meta"]["filename"] for s in samples] == ["g.jpg", "r.png"]  # sorted by path
    assert by_file["r.png"]["meta"]["captions"] == ["red 1", "red 2"]
    assert by_file["r.png"]["meta"]["caption_ids"] == [0, 3]
    assert by_file["r.png"]["meta"]["caption_id"] == 0
    assert by_file["r.png"]["caption"] == "red 1"
    assert by_file["r.png"]["meta"]["group_id"] == 3
    assert _image_of(by_file["r.png"]) == ("png", red)
    assert by_file["g.jpg"]["meta"]["captions"] == ["green 1"]
    assert by_file["g.jpg"]["meta"]["image_id"] == 0
    assert _image_of(by_file["g.jpg"]) == ("jpg", green)
    summary = _summary(out)
    assert (summary["samples"], summary["pairs"]) == (2, 3)
    assert summary["skipped"] == {"empty_caption": 2}


def test_coco_keeps_coco_ids(tmp_path: Path) -> None:
    """coco: image_id is the COCO image id and caption_id the annotation id; images come in id
    order with captions in annotation-id order; an image without captions writes nothing."""
    images = tmp_path / "train2017"
    a = _write_image(images / "000000000042.jpg", "JPEG", (1, 2, 3))
    b = _write_image(images / "000000000007.jpg", "JPEG", (4, 5, 6))
    _write_image(images / "000000000099.jpg", "JPEG", (7, 8, 9))
    doc = {
        "images": [
            {"id": 42, "file_name": "000000000042.jpg"},
            {"id": 7, "file_name": "000000000007.jpg"},
            {"id": 99, "file_name": "000000000099.jpg"},
        ],
        "annotations": [
            {"image_id": 42, "id": 900, "caption": "A dog.\n"},
            {"image_id": 7, "id": 77, "caption": "A cat sits."},
            {"image_id": 42, "id": 5, "caption": "A brown dog."},
        ],
    }
    captions = tmp_path / "captions_train2017.json"
    captions.write_text(json.dumps(doc))
    out = tmp_path / "coco"
    assert _run("coco", captions=captions, images=images, out=out) == 0
    samples, counts = _read_shards(out)
    _check_index(out, counts)
    got = [(s["meta"]["image_id"], s["meta"]["caption_id"], s["caption"]) for s in samples]
    assert got == [(7, 77, "A cat sits."), (42, 5, "A brown dog."), (42, 900, "A dog.")]
    assert [_image_of(s)[1] for s in samples] == [b, a, a]
    assert _summary(out)["skipped"] == {}


def _karpathy_doc(with_coco_ids: bool) -> dict[str, Any]:
    images = []
    for imgid, split in enumerate(("train", "restval", "val", "test", "train")):
        image: dict[str, Any] = {
            "filename": f"pic{imgid}.jpg",
            "imgid": imgid,
            "split": split,
            "sentences": [
                {"raw": f"Image {imgid} sentence {k}.", "tokens": [], "sentid": 5 * imgid + k}
                for k in range(5)
            ],
        }
        if with_coco_ids:
            image["filepath"] = "val2014" if split in ("val", "test") else "train2014"
            image["cocoid"] = 1000 + imgid
        images.append(image)
    return {"dataset": "coco" if with_coco_ids else "flickr30k", "images": images}


def test_karpathy_writes_split_directories(tmp_path: Path) -> None:
    """karpathy: train/ holds train+restval as pairs, val/ and test/ one sample per image with
    all 5 captions; ids are cocoid and sentid; each split has its own sizes.json; with
    --keep-restval restval gets its own directory; flickr files (no filepath, no cocoid) use
    imgid."""
    doc = _karpathy_doc(with_coco_ids=True)
    images = tmp_path / "coco"
    data = {}
    for image in doc["images"]:
        data[image["imgid"]] = _write_image(
            images / image["filepath"] / image["filename"], "JPEG", (image["imgid"] * 40, 0, 0)
        )
    captions = tmp_path / "dataset_coco.json"
    captions.write_text(json.dumps(doc))
    out = tmp_path / "karpathy"
    assert _run("karpathy", captions=captions, images=images, out=out) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["test", "train", "val"]

    train, counts = _read_shards(out / "train")
    assert counts == {"coco-train-000000.tar": 15}
    _check_index(out / "train", counts)
    got = [(s["meta"]["image_id"], s["meta"]["caption_id"], s["meta"]["split"]) for s in train]
    train_images = ((0, "train"), (1, "restval"), (4, "train"))
    expected = [(1000 + i, 5 * i + k, split) for i, split in train_images for k in range(5)]
    assert got == expected
    assert train[6]["caption"] == "Image 1 sentence 1."
    assert all(_image_of(s) == ("jpg", data[s["meta"]["image_id"] - 1000]) for s in train)

    for split, imgid in (("val", 2), ("test", 3)):
        samples, counts = _read_shards(out / split)
        assert counts == {f"coco-{split}-000000.tar": 1}
        _check_index(out / split, counts)
        (sample,) = samples
        assert sample["meta"]["image_id"] == 1000 + imgid
        assert sample["meta"]["captions"] == [f"Image {imgid} sentence {k}." for k in range(5)]
        assert sample["meta"]["caption_ids"] == [5 * imgid + k for k in range(5)]
        assert sample["meta"]["filename"] == f"val2014/pic{imgid}.jpg"
    assert set(_summary(out)["splits"]) == {"train", "val", "test"}

    kept = tmp_path / "kept"
    rc = _run(
        "karpathy --keep-restval --splits train,restval", captions=captions, images=images, out=kept
    )
    assert rc == 0
    assert sorted(p.name for p in kept.iterdir() if p.is_dir()) == ["restval", "train"]
    restval, _ = _read_shards(kept / "restval")
    assert {s["meta"]["image_id"] for s in restval} == {1001}
    assert len(restval) == 5  # restval is a training split: pairs

    flickr = _karpathy_doc(with_coco_ids=False)
    for image in flickr["images"]:
        _write_image(tmp_path / "flickr" / image["filename"], "JPEG", (0, image["imgid"], 0))
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(flickr))
    rc = _run(
        "karpathy --splits test",
        captions=tmp_path / "dataset_flickr30k.json",
        images=tmp_path / "flickr",
        out=tmp_path / "f30k",
    )
    assert rc == 0
    (sample,), _ = _read_shards(tmp_path / "f30k" / "test")
    assert sample["key"] == "flickr30k-test-000000000"
    assert sample["meta"]["image_id"] == 3
    assert sample["meta"]["filename"] == "pic3.jpg"


def test_albef_groups_rows_by_image(tmp_path: Path) -> None:
    """albef: rows of one image path are one image (one image_id) with captions in file order;
    a caption list gives several captions; named ids ("coco_5") are renumbered by first
    appearance and kept as source_image_id; all-integer ids are used as they are."""
    a = _write_image(tmp_path / "img" / "x" / "a.png", "PNG", (1, 1, 1))
    b = _write_image(tmp_path / "img" / "x" / "b.png", "PNG", (2, 2, 2))
    rows = [
        {"image": "x/a.png", "caption": "c1", "image_id": "coco_5"},
        {"image": "x/b.png", "caption": ["c2", "c3"]},
        {"image": "x/a.png", "caption": "c4", "image_id": "coco_5"},
    ]
    (tmp_path / "train.json").write_text(json.dumps(rows))
    out = tmp_path / "albef"
    rc = _run("albef", captions=tmp_path / "train.json", images=tmp_path / "img", out=out)
    assert rc == 0
    samples, counts = _read_shards(out)
    _check_index(out, counts)
    got = [(s["meta"]["image_id"], s["meta"]["caption_id"], s["caption"]) for s in samples]
    assert got == [(0, 0, "c1"), (0, 3, "c4"), (1, 1, "c2"), (1, 2, "c3")]
    assert samples[0]["meta"]["source_image_id"] == "coco_5"
    assert "source_image_id" not in samples[2]["meta"]
    assert [_image_of(s)[1] for s in samples] == [a, a, b, b]

    rows = [
        {"image": "x/b.png", "caption": "two", "image_id": "17"},
        {"image": "x/a.png", "caption": "one", "image_id": 23},
    ]
    (tmp_path / "ids.json").write_text(json.dumps(rows))
    rc = _run(
        "albef --layout image",
        captions=tmp_path / "ids.json",
        images=tmp_path / "img",
        out=tmp_path / "ids",
    )
    assert rc == 0
    samples, _ = _read_shards(tmp_path / "ids")
    assert [s["meta"]["image_id"] for s in samples] == [17, 23]


def test_features_write_img_feat_npy(tmp_path: Path) -> None:
    """features: each sample carries its feature row as img_feat.npy (loadable without pickle,
    in the requested dtype) instead of an image; rows of one image share its id; a row outside
    the matrix and a non-finite vector are counted as missing_feature / corrupt_feature."""
    feats = np.arange(12, dtype=np.float32).reshape(4, 3) / 7
    feats[2, 1] = np.nan
    np.save(tmp_path / "feats.npy", feats)
    lines = [
        {"index": 0, "image_id": 100, "caption": "zero", "group": "b"},
        {"index": 1, "caption": "one", "group": "a"},
        {"index": 2, "caption": "nan row"},
        {"index": 9, "caption": "out of range"},
        {"image_id": 100, "index": 0, "caption": "zero again", "caption_id": 55},
    ]
    (tmp_path / "caps.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "feat"
    rc = _run(
        "features --group-column group --dtype float16",
        features=tmp_path / "feats.npy",
        captions=tmp_path / "caps.jsonl",
        out=out,
    )
    assert rc == 0
    samples, counts = _read_shards(out)
    _check_index(out, counts)
    got = [
        (s["meta"]["image_id"], s["meta"]["caption_id"], s["caption"], s["meta"]["group_id"])
        for s in samples
    ]
    assert got == [(100, 0, "zero", 1), (100, 55, "zero again", 1), (1, 1, "one", 0)]
    for sample, row in zip(samples, (0, 0, 1), strict=True):
        assert not any(ext in sample for ext in IMAGE_EXTS)
        vector = np.load(io.BytesIO(sample["img_feat.npy"]), allow_pickle=False)
        assert vector.dtype == np.float16 and vector.shape == (3,)
        np.testing.assert_array_equal(vector, feats[row].astype(np.float16))
    assert _summary(out)["skipped"] == {"corrupt_feature": 1, "missing_feature": 1}


# ---------------------------------------------------------------------------------------------
# determinism and resuming


@pytest.mark.parametrize("gzipped", [False, True])
def test_two_runs_are_byte_identical(tmp_path: Path, gzipped: bool) -> None:
    """Two runs of the same command write byte-identical shards and sizes.json, with fixed tar
    metadata (mtime 0, uid/gid 0, empty names, mode 0644) and a gzip header without time or
    file name."""
    captions = _folder_dataset(tmp_path)
    outs = [tmp_path / "one", tmp_path / "two"]
    words = "folder --prefix d --shard-size 4" + (" --gzip" if gzipped else "")
    for out in outs:
        assert _run(words, captions=captions, images=tmp_path / "img", out=out) == 0
    first, second = (_shard_bytes(out) for out in outs)
    assert len(first) == 4 and first == second
    assert (outs[0] / "sizes.json").read_bytes() == (outs[1] / "sizes.json").read_bytes()
    for name, data in first.items():
        assert name.endswith(".tar.gz" if gzipped else ".tar")
        if gzipped:
            assert data[3] & 0x08 == 0, "gzip header carries a file name"
            assert data[4:8] == b"\0\0\0\0", "gzip header carries a time"
            data = gzip.decompress(data)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for info in tar.getmembers():
                assert (info.mtime, info.uid, info.gid, info.mode) == (0, 0, 0, 0o644)
                assert (info.uname, info.gname) == ("", "")


def test_interrupted_run_resumes_to_identical_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run interrupted while finishing its third shard keeps the two finished shards and no
    partial file; rerunning the same command keeps those two (by sha256) and produces output
    byte-identical to an uninterrupted run, even with a stray .tmp left by a hard kill."""
    captions = _folder_dataset(tmp_path)
    words = "folder --prefix d --shard-size 3 --gzip"
    inputs = {"captions": captions, "images": tmp_path / "img"}
    reference = tmp_path / "reference"
    assert _run(words, **inputs, out=reference) == 0

    out = tmp_path / "out"
    original_finish = writer._ShardFile.finish
    calls = Counter[str]()

    def finish_then_die(self: Any) -> str:
        calls["finish"] += 1
        if calls["finish"] == 3:
            raise KeyboardInterrupt
        return original_finish(self)

    monkeypatch.setattr(writer._ShardFile, "finish", finish_then_die)
    assert _run(words, **inputs, out=out) == 130
    monkeypatch.undo()
    assert [p.name for p in _shard_paths(out)] == ["d-000000.tar.gz", "d-000001.tar.gz"]
    assert not list(out.glob("*.tmp"))
    assert not (out / "sizes.json").exists()
    progress = json.loads((out / "_progress.json").read_text())
    assert [r["name"] for r in progress["shards"]] == ["d-000000.tar.gz", "d-000001.tar.gz"]
    assert progress["complete"] is False

    (out / "d-000002.tar.gz.tmp").write_bytes(b"half a shard")
    assert _run(words, **inputs, out=out) == 0
    assert _shard_bytes(out) == _shard_bytes(reference)
    assert (out / "sizes.json").read_bytes() == (reference / "sizes.json").read_bytes()
    assert not list(out.glob("*.tmp"))
    summary = _summary(out)
    assert summary["kept_shards"] == 2
    assert summary["pairs"] == _summary(reference)["pairs"]


def test_resume_rewrites_lost_and_damaged_shards(tmp_path: Path) -> None:
    """Resuming after the last shard and the tail of the progress file were lost, and another
    shard was damaged, keeps only the shards before the damage and rewrites the rest
    byte-identically."""
    captions = _folder_dataset(tmp_path)
    inputs = {"captions": captions, "images": tmp_path / "img", "out": tmp_path / "out"}
    out = tmp_path / "out"
    assert _run("folder --prefix d --shard-size 2", **inputs) == 0
    reference = _shard_bytes(out)
    names = sorted(reference)
    assert len(names) == 7

    progress_path = out / "_progress.json"
    progress = json.loads(progress_path.read_text())
    progress["shards"] = progress["shards"][:-1]
    progress["complete"] = False
    progress_path.write_text(json.dumps(progress))
    (out / names[-1]).unlink()
    damaged = bytearray(reference[names[3]])
    damaged[600] ^= 0xFF
    (out / names[3]).write_bytes(bytes(damaged))

    assert _run("folder --prefix d --shard-size 2", **inputs) == 0
    assert _shard_bytes(out) == reference
    assert _summary(out)["kept_shards"] == 3
    _check_index(out, _read_shards(out)[1])


def test_resume_with_other_settings_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rerunning into an existing output with different options or input fails with one error
    line naming the difference and --overwrite; --overwrite then starts over cleanly, removing
    the earlier shards even when the prefix changes."""
    captions = _folder_dataset(tmp_path)
    inputs = {"captions": captions, "images": tmp_path / "img", "out": tmp_path / "o"}
    assert _run("folder --shard-size 4", **inputs) == 0
    capsys.readouterr()

    assert _run("folder --shard-size 3", **inputs) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert "shard_size was 4, now 3" in err[0] and "--overwrite" in err[0]

    assert _run("folder --shard-size 4 --limit 2", **inputs) == 2
    assert "the input differs" in capsys.readouterr().err

    assert _run("folder --shard-size 3 --prefix new --overwrite", **inputs) == 0
    _, counts = _read_shards(tmp_path / "o")  # the old "o-*" shards are gone
    assert counts == {f"new-{i:06d}.tar": n for i, n in enumerate((3, 3, 3, 3, 1))}
    _check_index(tmp_path / "o", counts)


# ---------------------------------------------------------------------------------------------
# index, exit codes


def _tar_with(path: Path, names: list[str]) -> None:
    mode = "w:gz" if path.name.endswith(".gz") else "w"
    with tarfile.open(path, mode) as tar:
        for name in names:
            data = name.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        folder = tarfile.TarInfo("somedir")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)


def test_index_counts_img2dataset_shards(tmp_path: Path) -> None:
    """index counts the samples of img2dataset-style shards (one key per jpg/txt/json triple,
    meta members, directories and extension-less names ignored) and of our own shards, into a
    sizes.json next to them."""
    shards = tmp_path / "img2dataset"
    shards.mkdir()
    triple = ("jpg", "txt", "json")
    _tar_with(shards / "00000.tar", [f"{k:09d}.{e}" for k in range(5) for e in triple])
    _tar_with(
        shards / "00001.tar.gz",
        ["__meta__", "README"] + [f"{k:09d}.{e}" for k in range(5, 8) for e in triple],
    )
    (shards / "00001_stats.json").write_text("{}")
    assert cli.main(["index", str(shards), "--quiet"]) == 0
    assert json.loads((shards / "sizes.json").read_text()) == {"00000.tar": 5, "00001.tar.gz": 3}

    captions = _folder_dataset(tmp_path)
    ours = tmp_path / "ours"
    rc = _run("folder --shard-size 5 --gzip", captions=captions, images=tmp_path / "img", out=ours)
    assert rc == 0
    written = (ours / "sizes.json").read_text()
    (ours / "sizes.json").unlink()
    assert cli.main(["index", f"{ours}/*.tar.gz", "--quiet"]) == 0
    assert json.loads((ours / "sizes.json").read_text()) == json.loads(written)


@pytest.mark.system
def test_cli_missing_input_exits_2_with_one_line(tmp_path: Path) -> None:
    """Through `python -m fne_dist.shards`: a missing captions file exits with status 2 and a
    single `error:` line naming the file, no traceback."""
    missing = tmp_path / "nope.csv"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fne_dist.shards",
            "folder",
            "--captions",
            str(missing),
            "--images",
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0]


def _bad_input(tmp_path: Path, case: str) -> tuple[str, dict[str, Path]]:
    """Files for one broken-input case; returns the command words and path options."""
    images = tmp_path / "images"
    images.mkdir()
    if case == "csv_column":
        (tmp_path / "c.csv").write_text("path,caption\na.png,x\n")
        return "folder", {"captions": tmp_path / "c.csv", "images": images}
    if case == "two_groups":
        (tmp_path / "c.csv").write_text("filepath,caption,g\na.png,x,1\na.png,y,2\n")
        return "folder --group-column g", {"captions": tmp_path / "c.csv", "images": images}
    if case == "coco_unknown_image":
        doc = {"images": [], "annotations": [{"image_id": 3, "id": 1, "caption": "x"}]}
        (tmp_path / "c.json").write_text(json.dumps(doc))
        return "coco", {"captions": tmp_path / "c.json", "images": images}
    if case == "karpathy_split":
        doc = {"images": [{"filename": "a.jpg", "imgid": 0, "split": "bogus", "sentences": []}]}
        (tmp_path / "c.json").write_text(json.dumps(doc))
        return "karpathy", {"captions": tmp_path / "c.json", "images": images}
    if case == "albef_shared_id":
        rows = [{"image": "a.png", "caption": "x", "image_id": 1}]
        rows.append({"image": "b.png", "caption": "y", "image_id": "1"})
        (tmp_path / "c.json").write_text(json.dumps(rows))
        return "albef", {"captions": tmp_path / "c.json", "images": images}
    if case == "pickled_features":
        np.save(tmp_path / "f.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
        (tmp_path / "c.jsonl").write_text('{"index": 0, "caption": "x"}\n')
        return "features", {"features": tmp_path / "f.npy", "captions": tmp_path / "c.jsonl"}
    assert case == "features_no_row"
    np.save(tmp_path / "f.npy", np.zeros((1, 2), dtype=np.float32))
    (tmp_path / "c.jsonl").write_text('{"caption": "x"}\n')
    return "features", {"features": tmp_path / "f.npy", "captions": tmp_path / "c.jsonl"}


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("csv_column", "has no column 'filepath'"),
        ("two_groups", "has group '2' here but '1' at c.csv line 2"),
        ("coco_unknown_image", "image_id 3 is not in 'images'"),
        ("karpathy_split", "split 'bogus' is not one of"),
        ("albef_shared_id", "image_id '1' is given to two images"),
        ("pickled_features", "is not a .npy array"),
        ("features_no_row", "needs 'index' (feature row) or 'image_id'"),
    ],
)
def test_bad_input_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, message: str
) -> None:
    """Each kind of malformed input ends the command with exit status 2 and one `error:` line
    naming the problem (never a traceback, never a pickled object loaded), before any shard
    is written."""
    words, paths = _bad_input(tmp_path, case)
    assert _run(words, **paths, out=tmp_path / "out") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "out").exists() or not _shard_paths(tmp_path / "out")


def test_nothing_written_exits_2_with_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """When every pair is skipped the command exits 2 with one error line giving the reasons
    (and, for missing images only, where they were looked for), still saves the summary, and
    does not block a corrected rerun with other options; an unparseable annotation file is an
    error line too."""
    doc = {"images": [{"id": 1, "file_name": "late.jpg"}], "annotations": []}
    doc["annotations"] = [{"image_id": 1, "id": i, "caption": "c"} for i in range(3)]
    (tmp_path / "caps.json").write_text(json.dumps(doc))
    images = tmp_path / "images"
    images.mkdir()
    out = tmp_path / "out"
    assert _run("coco", captions=tmp_path / "caps.json", images=images, out=out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0] == (
        "error: nothing written: every pair was skipped (missing_image 3); "
        f"image paths are looked up under --images {images}"
    )
    assert _summary(out)["skipped"] == {"missing_image": 3}

    _write_image(images / "late.jpg", "JPEG", (3, 3, 3))
    assert _run("coco --shard-size 2", captions=tmp_path / "caps.json", images=images, out=out) == 0
    assert _read_shards(out)[1] == {"out-000000.tar": 2, "out-000001.tar": 1}

    (tmp_path / "bad.json").write_text('{"images": [')
    assert _run("coco", captions=tmp_path / "bad.json", images=tmp_path / "images", out=out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --captions:") and "not valid JSON" in err[0]

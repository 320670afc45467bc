"""String ids and what a bad sample says.

Datasets with string ids (file names, ``"train-123"``, hashes) are read, not refused: a string id
becomes a stable non-negative integer (``string_id``), two different strings with one id are a
counted bad sample ("id_collision") instead of two images silently merged, and every bad-sample
reason names the member (``<key>.<ext>``) and, for json, the field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fne_dist.data import StreamOptions, TrainStream, load_split, shard_list
from fne_dist.data import decode as decode_mod
from fne_dist.data.batching import PairCollate
from fne_dist.data.decode import (
    MAX_ID,
    NO_GROUP,
    REASONS,
    BadSample,
    IdRegistry,
    decode_sample,
    string_id,
)
from fne_dist.memory import EMPTY_ID

from .shard_factory import png, write_tar

STRINGS = ["train-123", "COCO_val2014_000000391895.jpg", "a" * 64, "é", "\ud800", " x "]


def _members(image_id: object, group: object, caption: str = "a caption") -> dict[str, bytes]:
    meta = json.dumps({"image_id": image_id, "group_id": group})
    return {"png": png(), "txt": caption.encode(), "json": meta.encode()}


@pytest.mark.system  # the id is computed again in a second interpreter
def test_hostile_string_ids_are_stable_non_negative_and_distinct() -> None:
    """Invariant: a string id maps to the same id on every call and in another process (no
    per-process hash seed), inside 0..2^63−1, never the memory's empty marker nor "no group";
    different strings get different ids; a decimal string is its number (as an integer id)."""
    ids = [string_id(s) for s in STRINGS]
    assert ids == [string_id(s) for s in STRINGS]
    assert len(set(ids)) == len(ids)
    assert all(0 <= i <= MAX_ID and i not in (EMPTY_ID, NO_GROUP) for i in ids)
    assert string_id("42") == 42 and string_id("0042") == 42
    code = "from fne_dist.data.decode import string_id; print(string_id('train-123'))"
    other = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "123", "PYTHONPATH": str(Path.cwd())},
    )
    assert int(other.stdout) == string_id("train-123")


@pytest.mark.parametrize("field", ["image_id", "group_id", "caption_id"])
def test_hostile_string_id_fields_decode(field: str) -> None:
    """Invariant: each id field accepts a non-empty string and yields ``string_id`` of it; an
    empty or blank string is bad_id naming the member and the field."""
    meta = {field: "train-123"}
    sample = {"__key__": "k", "png": png(), "txt": b"x", "json": json.dumps(meta).encode()}
    d = decode_sample(sample)
    got = {"image_id": d.image_id, "group_id": d.group, "caption_id": d.caption_id}[field]
    assert got == string_id("train-123")
    sample["json"] = json.dumps({field: "  "}).encode()
    with pytest.raises(BadSample) as err:
        decode_sample(sample)
    assert err.value.reason == "bad_id" and f"k.json {field}" in str(err.value)


def _shard_of_string_ids(tmp_path: Path, n: int = 8) -> str:
    samples = [
        (f"s{k:03d}", _members(f"img-{k}", f"family-{k % 3}", f"caption {k}")) for k in range(n)
    ]
    path = write_tar(tmp_path / "shards" / "str-000000.tar", samples)
    (path.parent / "sizes.json").write_text(json.dumps({path.name: n}))
    return str(path)


def test_hostile_shards_with_string_ids_train_and_evaluate(tmp_path: Path) -> None:
    """Invariant: shards whose ids are all strings (the issue: 1000 of 1000 bad) are read in
    full by the training stream and by evaluation, with one id per distinct string and group
    mates sharing their group id."""
    spec = _shard_of_string_ids(tmp_path)
    opts = StreamOptions(batch=2, seed=0, shuffle_buffer=1, max_bad_fraction=0.0)
    stream = TrainStream(
        shard_list(spec, "data.train"),
        opts,
        lambda d: {"ids": d.image_id, "groups": d.group},
        PairCollate(None),
    )
    batches = [batch for batch, _ in stream.epoch(0)]
    ids = sorted(i for b in batches for i in b["ids"].tolist())
    assert ids == sorted(string_id(f"img-{k}") for k in range(8))
    assert dict(stream.counters.bad) == {}
    table = load_split(
        shard_list(spec, "data.val"),
        "data.val",
        lambda img: torch.zeros(3, 2, 2, dtype=torch.uint8),
        max_bad_fraction=0.0,
    )
    assert table.image_ids_I.numel() == 8 and dict(table.bad) == {}
    by_id = dict(zip(table.image_ids_I.tolist(), table.groups_I.tolist(), strict=True))
    assert {by_id[string_id(f"img-{k}")] for k in (0, 3, 6)} == {string_id("family-0")}


def test_hostile_two_strings_with_one_id_are_a_counted_collision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Invariant: when two different strings map to one id, the later sample is bad
    ("id_collision", naming both strings and the field) in training and evaluation, never merged
    with the other; the same string repeated (captions of one image) is no collision."""
    monkeypatch.setattr(decode_mod, "string_id", lambda value: 7)  # every string collides
    registry = IdRegistry()
    first = {"__key__": "a", "png": png(), "txt": b"x", "json": b'{"image_id": "img-a"}'}
    assert decode_sample(first, ids=registry).image_id == 7
    assert decode_sample(first, ids=registry).image_id == 7  # the same string again
    second = dict(first, __key__="b", json=b'{"image_id": "img-b"}')
    with pytest.raises(BadSample) as err:
        decode_sample(second, ids=registry)
    assert err.value.reason == "id_collision" and "id_collision" in REASONS
    assert "b.json image_id" in str(err.value) and "img-a" in str(err.value)
    spec = _shard_of_string_ids(tmp_path, n=3)
    table = load_split(
        shard_list(spec, "data.val"),
        "data.val",
        lambda img: torch.zeros(3, 2, 2, dtype=torch.uint8),
        max_bad_fraction=1.0,
    )
    # the second and third image ids collide with the first's: two counted, one image
    assert table.image_ids_I.tolist() == [7] and dict(table.bad) == {"id_collision": 2}


def _bad_samples() -> dict[str, tuple[dict, str]]:
    """A sample per decode-time reason, and the member/field its detail must name."""
    base = {"__key__": "k", "png": png(), "txt": b"a caption"}
    return {
        "unknown_extension": (dict(base, pyd=b"x"), "k.pyd"),
        "missing_image": ({"__key__": "k", "txt": b"x"}, "k:"),
        "corrupt_image": (dict(base, png=b"not a png"), "k.png"),
        "too_many_pixels": (dict(base, png=png(size=40)), "k.png"),
        "missing_caption": ({"__key__": "k", "png": png()}, "k.txt"),
        "empty_caption": (dict(base, txt=b"\x00 \t"), "k.txt"),
        "bad_utf8": (dict(base, txt=b"\xff\xfe"), "k.txt"),
        "bad_json": (dict(base, json=b"{"), "k.json"),
        "bad_id": (dict(base, json=b'{"group_id": 1.5}'), "k.json group_id"),
        "bad_npy": ({**base, "img_feat.npy": b"\x93NUMPY garbage"}, "k.img_feat.npy"),
        "duplicate_member": (dict(base, __duplicate__="txt"), "k.txt"),
    }


@pytest.mark.parametrize("reason", list(_bad_samples()))
def test_hostile_every_bad_sample_names_its_member(reason: str) -> None:
    """Invariant: a bad sample's message names the sample's member (key.extension) and, for a
    json value, the field (``missing_image``: the key, there being no member to name)."""
    sample, where = _bad_samples()[reason]
    with pytest.raises(BadSample) as err:
        decode_sample(sample, max_pixels=1000)
    assert err.value.reason == reason and where in str(err.value), str(err.value)

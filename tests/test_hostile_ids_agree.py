"""Ids that train silently wrong: keys repeated across sources, and ids a writer writes but the
reader refuses.

* img2dataset-style shards carry no json ids and number their keys from 0 in every output
  directory: two such sources joined with ``::`` must not give two different pictures one id
  (that merges positives, false negatives and metrics). An id derived from a key includes the
  shard's directory; one id given to different image bytes is a counted ``id_collision``.
* The shard writers and the reader share one id validation, so a writer never writes an id the
  reader counts as ``bad_id`` (10^30, 2^63, -5); an annotation file that names a column or key
  twice is refused in one line instead of the last one silently winning.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fne_dist.data import StreamOptions, TrainStream, load_split, shard_list
from fne_dist.data.batching import PairCollate
from fne_dist.data.decode import ID_LOW, BadSample, json_int
from fne_dist.shards import __main__ as cli
from fne_dist.shards.entries import ShardError, parse_int

from .shard_factory import png, write_tar

PICTURES = 24  # per source


def _img2dataset_source(directory: Path, first_value: int) -> Path:
    """One img2dataset-like shard: keys 000000000.. from 0, a png and a txt each, no json."""
    samples = [
        (f"{k:09d}", {"png": png(value=first_value + k), "txt": f"picture {k}".encode()})
        for k in range(PICTURES)
    ]
    return write_tar(directory / "00000.tar", samples)


def _pixels(img) -> torch.Tensor:
    return torch.zeros(3, 2, 2, dtype=torch.uint8)


def test_hostile_two_img2dataset_sources_give_every_picture_its_own_id(tmp_path: Path) -> None:
    """Invariant: 48 pictures in two ``::`` sources whose keys both count from 0 are 48
    images with 48 ids, in evaluation and in training, and nothing is counted bad."""
    _img2dataset_source(tmp_path / "a", 0)
    _img2dataset_source(tmp_path / "b", 100)
    spec = f"{tmp_path / 'a'}/*.tar::{tmp_path / 'b'}/*.tar"
    table = load_split(shard_list(spec, "data.val"), "data.val", _pixels)
    assert table.num_images == 2 * PICTURES and dict(table.bad) == {}
    assert len(set(table.image_ids_I.tolist())) == 2 * PICTURES

    opts = StreamOptions(batch=4, seed=0, shuffle_buffer=1)
    stream = TrainStream(
        shard_list(spec, "data.train"),
        opts,
        lambda d: {"ids": d.image_id, "groups": d.group},
        PairCollate(None),
    )
    ids = [i for batch, _ in stream.epoch(0) for i in batch["ids"].tolist()]
    assert len(ids) == len(set(ids)) == 2 * PICTURES and dict(stream.counters.bad) == {}


def test_hostile_key_derived_id_for_other_image_bytes_is_a_counted_collision(
    tmp_path: Path,
) -> None:
    """Invariant: in one directory, a second shard repeating the keys with other pictures gives
    each of those samples the id of an earlier, different picture: counted as id_collision,
    never merged into one image; the same bytes again (a copied shard) are no collision."""
    _img2dataset_source(tmp_path / "d", 0)
    write_tar(
        tmp_path / "d" / "00001.tar",
        [(f"{k:09d}", {"png": png(value=50 + k), "txt": b"other"}) for k in range(PICTURES)],
    )
    table = load_split(
        shard_list(str(tmp_path / "d" / "*.tar"), "data.val"),
        "data.val",
        _pixels,
        max_bad_fraction=1.0,
    )
    assert dict(table.bad) == {"id_collision": PICTURES} and table.num_images == PICTURES

    _img2dataset_source(tmp_path / "same", 0)
    (tmp_path / "same" / "00001.tar").write_bytes((tmp_path / "same" / "00000.tar").read_bytes())
    table = load_split(shard_list(str(tmp_path / "same" / "*.tar"), "data.val"), "v", _pixels)
    assert dict(table.bad) == {} and table.num_images == PICTURES


VALUES = [-5, -2, -1, 0, 7, 2**63 - 1, 2**63, 10**30]


@pytest.mark.parametrize("field", ["image_id", "caption_id", "group_id"])
def test_hostile_writer_and_reader_accept_the_same_ids(field: str) -> None:
    """Invariant: for every integer, a shard writer accepts it as an id exactly when the loader
    does (one validation), so no written id is read back as bad_id."""
    for value in VALUES:
        try:
            json_int({field: value}, field, "k", -1, ID_LOW[field])
            read = True
        except BadSample:
            read = False
        try:
            parse_int(str(value), "ann", field)
            written = True
        except ShardError:
            written = False
        assert written == read, (field, value)


@pytest.mark.parametrize(
    ("where", "value"),
    [("image", 10**30), ("image", 2**63), ("image", -5), ("annotation", -5)],
)
def test_hostile_coco_writer_refuses_ids_the_reader_refuses(
    tmp_path: Path, where: str, value: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """Invariant: a COCO file with an image id 10^30, 2^63 or -5 (or annotation id -5) fails
    with one line naming the entry and the range, and writes no shard."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(png())
    image_id = value if where == "image" else 1
    caption_id = value if where == "annotation" else 5
    doc = {
        "images": [{"id": image_id, "file_name": "a.png"}],
        "annotations": [{"id": caption_id, "image_id": image_id, "caption": "a red square"}],
    }
    (tmp_path / "coco.json").write_text(json.dumps(doc))
    out = tmp_path / "out"
    argv = ["coco", "--captions", str(tmp_path / "coco.json"), "--images", str(images)]
    assert cli.main([*argv, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    field = "image_id" if where == "image" else "caption_id"
    assert "\n" not in err and err.startswith("error: coco.json ")
    assert f"{field} " in err and "2^63-1 (the loader reads it as a bad id)" in err
    assert not list(out.glob("*.tar"))


def test_hostile_folder_group_label_the_reader_refuses_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Invariant: an integer group label below -1 (the reader's "no label") is refused by the
    writer in one line, not written as a group the loader reads as bad_id."""
    (tmp_path / "a.png").write_bytes(png())
    (tmp_path / "c.csv").write_text("filepath,caption,cls\na.png,red,-5\n")
    argv = ["folder", "--captions", str(tmp_path / "c.csv"), "--group-column", "cls"]
    assert cli.main([*argv, "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: image 'a.png': group_id -5 is outside -1..2^63-1 (the loader reads it as a bad id)"
    )


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_hostile_caption_column_given_twice_is_refused(
    tmp_path: Path, fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Invariant: a CSV with two ``caption`` columns (a JSON Lines row with the key twice) is
    refused in one line naming it, instead of the last one silently becoming the caption."""
    (tmp_path / "a.png").write_bytes(png())
    path = tmp_path / f"c.{fmt}"
    if fmt == "csv":
        path.write_text("filepath,caption,caption\na.png,first,second\n")
        said = "has the column 'caption' more than once"
    else:
        path.write_text('{"filepath": "a.png", "caption": "first", "caption": "second"}\n')
        said = "line 1 has the key 'caption' more than once"
    out = tmp_path / "out"
    assert cli.main(["folder", "--captions", str(path), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"error: --captions: {path} ") and said in err
    assert not list(out.glob("*.tar"))

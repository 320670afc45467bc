"""Nothing in a shard, an image file or a shard's file *name* runs a program.

* An image member (or an image file given to a shard writer) is opened only when its first
  bytes say JPEG, PNG, WebP, GIF or BMP, and PIL is told to use that format's plugin alone:
  PIL's format probing would hand a PostScript/EPS member, whatever its extension, to
  Ghostscript, which runs it as a program (writing files of its choosing, or looping forever on
  ``{ } loop``). Such a member is a counted ``corrupt_image``, in training, evaluation, the
  feature cache and the writers.
* A glob result is a local file, opened as a file: a file named ``pipe:touch X; cat part.tar
  #.tar`` matched by ``data.train=*.tar`` must not reach webdataset's ``gopen``, which runs
  ``pipe:`` URLs in a shell. Only a spec the user wrote can be a URL or (allowed) a pipe.

Ghostscript need not be installed for these tests to mean something: they fail as soon as PIL's
EPS plugin is asked to open the bytes or any subprocess is started.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import PIL.EpsImagePlugin
import pytest
import torch
from torch import nn

from fne_dist.config import load_config
from fne_dist.data import StreamOptions, TrainStream, load_split, shard_list
from fne_dist.data.batching import PairCollate
from fne_dist.data.decode import IMAGE_EXTS, BadSample, decode_sample, open_raster
from fne_dist.data.feature_shards import build_feature_shards
from fne_dist.shards import __main__ as cli
from fne_dist.shards.entries import Caption, ImageEntry
from fne_dist.shards.media import IMAGE_SUFFIXES, ImageFiles

from .shard_factory import sample_members, write_tar

REFUSED = "not a JPEG, PNG, WebP, GIF or BMP image"


def _postscript(target: Path) -> dict[str, bytes]:
    """PostScript that Ghostscript would run: one writes ``target``, one never ends, one is
    the binary (DOS) EPS header PIL also recognises."""
    header = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 4 4\n"
    writes = header + b"(" + str(target).encode() + b") (w) file closefile\nshowpage\n"
    loop = header + b"{ } loop\n"
    dos = b"\xc5\xd0\xd3\xc6" + (32).to_bytes(4, "little") + len(loop).to_bytes(4, "little")
    return {"writes": writes, "loop": loop, "dos_eps": dos + b"\0" * 20 + loop}


class Spy:
    """Records every attempt to start a process or to let PIL's EPS plugin see bytes; each
    attempt also fails, so that nothing runs even where Ghostscript is installed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []

        def popen(*args, **kwargs):
            self.calls.append(f"subprocess.Popen {args[0] if args else kwargs.get('args')!r}")
            raise AssertionError("a process was started")

        def eps_open(image_file):
            self.calls.append("PIL EpsImagePlugin opened the bytes")
            raise SyntaxError("refused by the test")  # PIL then tries its other plugins

        monkeypatch.setattr(subprocess, "Popen", popen)
        monkeypatch.setattr(PIL.EpsImagePlugin.EpsImageFile, "_open", eps_open)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Spy:
    return Spy(monkeypatch)


def test_hostile_postscript_under_every_image_extension_is_refused_unopened(
    tmp_path: Path, spy: Spy
) -> None:
    """Invariant: PostScript under .jpg/.jpeg/.png/.webp is a corrupt_image saying what it is
    not, for training (one caption) and evaluation (all captions), and neither PIL's EPS
    plugin nor any process ever sees it; nothing is written."""
    target = tmp_path / "written-by-postscript"
    for name, payload in _postscript(target).items():
        for ext in IMAGE_EXTS:
            for all_captions in (False, True):
                sample = {"__key__": "k", ext: payload, "txt": b"a caption"}
                with pytest.raises(BadSample) as err:
                    decode_sample(sample, all_captions=all_captions)
                assert err.value.reason == "corrupt_image", (name, ext)
                assert f"k.{ext}: {REFUSED}" in str(err.value)
    assert spy.calls == [] and not target.exists()


def test_hostile_raster_formats_still_decode_whatever_their_extension() -> None:
    """Invariant: the allow-list keeps what the loader read before: a PNG, JPEG, WebP, GIF or
    BMP decodes under any image extension (a mislabelled web image is still data)."""
    import io

    from PIL import Image

    for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP"):
        buf = io.BytesIO()
        Image.new("RGB", (4, 4), (200, 0, 0)).save(buf, format=fmt)
        assert open_raster(buf.getvalue()).format == fmt
        d = decode_sample({"__key__": "k", "jpg": buf.getvalue(), "txt": b"x"})
        assert d.image is not None and d.image.size == (4, 4)


class _TinyImageTower(nn.Module):
    """Enough of an image backbone for the feature cache: fixed pixels, zero features."""

    def preprocess(self, image) -> torch.Tensor:
        return torch.zeros(3, 2, 2)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.zeros(pixels.shape[0], 4)


@pytest.mark.timeout(120)  # a `{ } loop` handed to Ghostscript would hang here, not fail
def test_hostile_postscript_members_are_counted_in_training_evaluation_and_feature_cache(
    tmp_path: Path, spy: Spy
) -> None:
    """Invariant: a shard holding PostScript members named .png/.jpg (one writing a file, one
    looping forever) trains, evaluates and builds its feature cache to the end with those
    samples counted as corrupt_image and every good sample read; no process is started and
    nothing is written by the members."""
    target = tmp_path / "written-by-postscript"
    hostile = _postscript(target)
    samples = [(f"good{k}", sample_members(k)) for k in range(4)]
    samples.insert(1, ("ps-writes", {"png": hostile["writes"], "txt": b"a"}))
    samples.insert(3, ("ps-loop", {"jpg": hostile["loop"], "txt": b"a"}))
    shard = write_tar(tmp_path / "shards" / "h-000000.tar", samples)
    shards = shard_list(str(shard), "data.train")

    opts = StreamOptions(batch=1, seed=0, shuffle_buffer=1, max_bad_fraction=1.0)
    stream = TrainStream(
        shards, opts, lambda d: {"ids": d.image_id, "groups": d.group}, PairCollate(None)
    )
    ids = [i for batch, _ in stream.epoch(0) for i in batch["ids"].tolist()]
    assert sorted(ids) == [0, 1, 2, 3] and dict(stream.counters.bad) == {"corrupt_image": 2}

    table = load_split(shards, "data.val", lambda img: torch.zeros(3, 2, 2), max_bad_fraction=1)
    assert dict(table.bad) == {"corrupt_image": 2} and table.num_images == 4

    data = load_config(None, ["data.caption_key=txt", "data.max_bad_fraction=1.0"]).data
    bad = build_feature_shards(shards, tmp_path / "cache", (_TinyImageTower(), None), data, False)
    assert dict(bad) == {"corrupt_image": 2}
    assert spy.calls == [] and not target.exists()


def test_hostile_postscript_image_files_are_not_written_into_shards(
    tmp_path: Path, spy: Spy, capsys: pytest.CaptureFixture[str]
) -> None:
    """Invariant: a shard writer given PostScript files named .jpg/.jpeg/.png/.webp skips each
    as corrupt_image (the loader's own check), writes no shard, starts no process and never
    lets PIL's EPS plugin open them."""
    target = tmp_path / "written-by-postscript"
    payload = _postscript(target)["writes"]
    images = tmp_path / "images"
    images.mkdir()
    rows = ["filepath,caption"]
    for suffix in IMAGE_SUFFIXES:
        (images / f"eps{suffix}").write_bytes(payload)
        rows.append(f"eps{suffix},a caption")
        entry = ImageEntry(0, (Caption(0, "x"),), path=images / f"eps{suffix}")
        assert ImageFiles(images).read(entry) == "corrupt_image"
    (images / "captions.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    argv = ["folder", "--captions", str(images / "captions.csv"), "--out", str(out), "--quiet"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: nothing written: every pair was skipped (corrupt_image {len(rows) - 1})"
    assert not list(out.glob("*.tar")) and spy.calls == [] and not target.exists()


PIPE_NAME = "pipe:touch X; cat part.tar #.tar"


def _pipe_named_shard(directory: Path) -> Path:
    """``part.tar`` (3 samples) and a copy of it named like a pipe spec, both in sizes.json."""
    write_tar(directory / "part.tar", [(f"s{k}", sample_members(k)) for k in range(3)])
    shutil.copy(directory / "part.tar", directory / PIPE_NAME)
    (directory / "sizes.json").write_text(json.dumps({"part.tar": 3, PIPE_NAME: 3}))
    return directory


def test_hostile_shard_file_named_like_a_pipe_is_read_as_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spy: Spy
) -> None:
    """Invariant: with ``data.train=*.tar`` (relative, so the glob yields the bare name) a file
    named ``pipe:touch X; cat part.tar #.tar`` is a local file: training and evaluation read
    its samples from the file, no shell runs, and X is never created."""
    directory = _pipe_named_shard(tmp_path / "shards")
    monkeypatch.chdir(directory)
    shards = shard_list("*.tar", "data.train")
    assert sorted(Path(u).name for u in shards.urls) == sorted(["part.tar", PIPE_NAME])
    assert shards.sizes == (3, 3)
    opts = StreamOptions(batch=1, seed=0, shuffle_buffer=1)
    stream = TrainStream(
        shards, opts, lambda d: {"ids": d.image_id, "groups": d.group}, PairCollate(None)
    )
    ids = [i for batch, _ in stream.epoch(0) for i in batch["ids"].tolist()]
    assert sorted(ids) == [0, 0, 1, 1, 2, 2]
    table = load_split(shard_list("*.tar", "data.val"), "data.val", lambda img: torch.zeros(3))
    assert table.num_captions == 6
    # without a sizes.json the shard is counted, by opening it: as a file too
    (directory / "sizes.json").unlink()
    assert shard_list("*.tar", "data.train").sizes == (3, 3)
    assert not (directory / "X").exists() and spy.calls == []


def test_hostile_shard_file_named_like_a_pipe_is_indexed_as_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spy: Spy
) -> None:
    """Invariant: ``python -m fne_dist.shards index .`` counts the pipe-named file as the file
    it is (a directory listing is data as much as a glob)."""
    directory = _pipe_named_shard(tmp_path / "shards")
    monkeypatch.chdir(directory)
    for spec in (".", "*.tar"):
        assert cli.main(["index", spec, "--quiet"]) == 0
        sizes = json.loads((directory / "sizes.json").read_text())
        assert sizes == {"part.tar": 3, PIPE_NAME: 3}
    assert not (directory / "X").exists() and spy.calls == []


def test_hostile_remote_shard_name_with_a_chain_separator_is_refused() -> None:
    """Invariant: a remote object whose name holds '::' (fsspec's chained-URL separator) found
    by a glob is refused in one line naming it, not opened through another file system."""
    import fsspec

    from fne_dist.data.sources import DataError

    fs = fsspec.filesystem("memory")
    fs.pipe("/hostile-chain/a::b.tar", b"")
    try:
        with pytest.raises(DataError, match=r"^data\.train: shard .*a::b\.tar.* has '::'"):
            shard_list("memory://hostile-chain/*.tar", "data.train")
    finally:
        fs.rm("/hostile-chain", recursive=True)


def test_hostile_remote_checkpoint_object_outside_its_step_is_not_written(
    tmp_path: Path,
) -> None:
    """Invariant: downloading a remote checkpoint whose store holds an object named
    ``step-N/../../escape.txt`` refuses it in one line and writes nothing outside the local
    copy (the object names of a shared bucket are data)."""
    import fsspec

    from fne_dist.checkpoint.format import CheckpointError
    from fne_dist.checkpoint.remote import download

    fs = fsspec.filesystem("memory")
    fs.pipe("/hostile-ckpt/step-00000001/meta.json", b"{}")
    fs.pipe("/hostile-ckpt/step-00000001/../../escape.txt", b"x")
    local = tmp_path / "a" / "b"
    try:
        with pytest.raises(CheckpointError, match=r"escape\.txt.* lies outside step-00000001"):
            download("memory://hostile-ckpt", "step-00000001", local)
    finally:
        fs.rm("/hostile-ckpt", recursive=True)
    assert not (tmp_path / "a" / "escape.txt").exists()
    assert not (tmp_path / "escape.txt").exists()

"""Hostile annotation files for the shard writer: image paths that leave
``--images`` (``../``, absolute) are refused and counted unless ``--allow-outside-images``,
so converting an untrusted annotation file cannot copy other files of the machine into shards."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from fne_dist.shards import __main__ as cli
from fne_dist.shards.media import inside


def _png(path: Path, value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (value, 0, 0)).save(buf, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _layout(tmp_path: Path) -> tuple[Path, bytes, bytes]:
    """images/in.png (allowed), secret/leak.png next to images/ (not), and their bytes."""
    inside_bytes = _png(tmp_path / "images" / "in.png", 1)
    secret = _png(tmp_path / "secret" / "leak.png", 2)
    return tmp_path / "images", inside_bytes, secret


def _member_bytes(out: Path) -> list[bytes]:
    found = []
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            found += [tar.extractfile(m).read() for m in tar if m.name.endswith(".png")]
    return found


def _albef(tmp_path: Path, leak: str) -> Path:
    rows = [{"image": "in.png", "caption": "inside"}, {"image": leak, "caption": "leak"}]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(rows))
    return path


@pytest.mark.parametrize("style", ["relative", "absolute"])
def test_hostile_paths_outside_images_are_refused_and_counted(
    tmp_path: Path, style: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Invariant: an annotation row naming ``../secret/leak.png`` or an absolute path
    is not copied into the shards; the summary counts it (``outside_images``) and a line
    says how many were refused and which flag allows them."""
    images, inside_bytes, _ = _layout(tmp_path)
    leak = "../secret/leak.png" if style == "relative" else str(tmp_path / "secret" / "leak.png")
    out = tmp_path / "out"
    argv = ["albef", "--captions", str(_albef(tmp_path, leak)), "--images", str(images)]
    assert cli.main([*argv, "--out", str(out), "--quiet"]) == 0
    assert _member_bytes(out) == [inside_bytes]
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["skipped"] == {"outside_images": 1}
    printed = capsys.readouterr().out
    assert "refused 1 pairs" in printed and "--allow-outside-images" in printed


def test_hostile_flag_allows_outside_paths(tmp_path: Path) -> None:
    """Invariant: with ``--allow-outside-images`` the same rows are copied (a trusted file
    may point anywhere), and resuming without the flag is refused as other settings."""
    images, inside_bytes, secret = _layout(tmp_path)
    out = tmp_path / "out"
    argv = ["albef", "--captions", str(_albef(tmp_path, "../secret/leak.png"))]
    argv += ["--images", str(images), "--out", str(out), "--quiet"]
    assert cli.main([*argv, "--allow-outside-images"]) == 0
    assert sorted(_member_bytes(out)) == sorted([inside_bytes, secret])
    assert cli.main(argv) == 2  # other settings than the shards were written with


@pytest.mark.parametrize("command", ["folder", "coco", "karpathy"])
def test_hostile_every_image_command_confines_paths(
    tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Invariant: folder, coco and karpathy refuse a ``../`` path as albef does; when every
    path is outside, the run fails with one line naming the flag."""
    images, _, _ = _layout(tmp_path)
    leak = "../secret/leak.png"
    if command == "folder":
        ann = tmp_path / "pairs.jsonl"
        ann.write_text(json.dumps({"filepath": leak, "caption": "leak"}) + "\n")
    elif command == "coco":
        ann = tmp_path / "coco.json"
        doc = {
            "images": [{"id": 1, "file_name": leak}],
            "annotations": [{"id": 5, "image_id": 1, "caption": "leak"}],
        }
        ann.write_text(json.dumps(doc))
    else:
        ann = tmp_path / "karpathy.json"
        sentences = [{"raw": "leak", "sentid": 5}]
        doc = {"images": [{"filename": leak, "split": "train", "imgid": 1, "sentences": sentences}]}
        ann.write_text(json.dumps(doc))
    argv = [command, "--captions", str(ann), "--images", str(images)]
    assert cli.main([*argv, "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "outside_images 1" in err and "--allow-outside-images" in err


def test_hostile_inside_is_lexical() -> None:
    """Invariant: the check resolves ``..`` lexically: ``root/a/../b`` is inside, ``root/../x``,
    ``/etc/x``, ``root-sibling/x`` and the root itself are not."""
    root = Path("/data/images")
    assert inside(root / "a" / ".." / "b.png", root)
    assert inside(root / "sub" / "c.png", root)
    for path in ("/data/images/../x.png", "/etc/x.png", "/data/images-2/x.png", "/data/images"):
        assert not inside(Path(path), root)

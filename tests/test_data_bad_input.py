"""Bad shards and hostile members: skipped and counted per reason, never executed; above the
configured bad fraction the run stops naming the shard; pipe: URLs refused unless allowed."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

from fne_dist.config import load_config
from fne_dist.data import DataError, StreamOptions, TrainStream, load_split, shard_list
from fne_dist.data.batching import PairCollate

from .shard_factory import png, sample_members, write_tar

GOOD_PER_SHARD = 6


class _Trap:
    """Unpickling this creates a file: proof that a .pyd member was (or was not) unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _broken_members(reason: str, marker: Path) -> dict[str, bytes]:
    m = sample_members(900)
    if reason == "corrupt_image":
        m["png"] = b"\x89PNG but not really"
    elif reason == "zero_byte_image":
        m["png"] = b""
    elif reason == "too_many_pixels":
        buf = io.BytesIO()
        Image.new("RGB", (40, 40)).save(buf, format="PNG")
        m["png"] = buf.getvalue()
    elif reason == "missing_caption":
        del m["txt"]
    elif reason == "empty_caption":
        m["txt"] = b"  \n "
    elif reason == "bad_utf8":
        m["txt"] = b"caf\xe9 \xff"
    elif reason == "unknown_extension":
        m["pyd"] = pickle.dumps(_Trap(str(marker)))
    return m


CASES = {  # broken sample kind → the reason it is counted under
    "corrupt_image": "corrupt_image",
    "zero_byte_image": "corrupt_image",
    "too_many_pixels": "too_many_pixels",
    "missing_caption": "missing_caption",
    "empty_caption": "empty_caption",
    "bad_utf8": "bad_utf8",
    "unknown_extension": "unknown_extension",
}


def _write_broken_dataset(root: Path, marker: Path) -> tuple[str, int, dict[str, int]]:
    """One shard per case (2 broken + 6 good samples, broken ones in the middle) plus a
    truncated shard whose size index promises 8 samples; returns spec, good count, expected."""
    index, image_id, expected = {}, 0, {}
    for n, (kind, reason) in enumerate(CASES.items()):
        samples = []
        for k in range(GOOD_PER_SHARD + 2):
            if k in (2, 5):
                samples.append((f"s{n}-bad{k}", _broken_members(kind, marker)))
            else:
                samples.append((f"s{n}-{k}", sample_members(image_id)))
                image_id += 1
        path = write_tar(root / f"shard-{n:06d}.tar", samples)
        index[path.name] = len(samples)
        expected[reason] = expected.get(reason, 0) + 2
    samples = [(f"t-{k}", sample_members(image_id + k)) for k in range(8)]
    truncated = write_tar(root / "shard-000099.tar", samples)
    raw = truncated.read_bytes()
    truncated.write_bytes(raw[: 512 * 18 + 100])  # cut inside the 4th sample's image
    index[truncated.name] = 8
    (root / "sizes.json").write_text(json.dumps(index))
    return str(root / "shard-*.tar"), image_id, expected


def _stream(spec: str, workers: int, max_bad_fraction: float = 1.0) -> TrainStream:
    opts = StreamOptions(
        batch=2,
        seed=3,
        workers=workers,
        shuffle_buffer=4,
        max_pixels=1000,
        max_bad_fraction=max_bad_fraction,
    )
    return TrainStream(
        shard_list(spec, "data.train"),
        opts,
        lambda d: {"ids": d.image_id, "groups": d.group},
        PairCollate(None),
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.system)])
def test_bad_samples_are_skipped_and_counted_per_reason(tmp_path: Path, workers: int) -> None:
    """Invariant: every kind of bad sample (corrupt, zero-byte and oversized images, missing or
    empty caption, non-UTF-8 text, an unknown member extension, a truncated tar) is skipped and
    counted under its reason, the good samples are all trained on, and the .pyd member holding a
    pickle that would create a file when unpickled is never unpickled."""
    marker = tmp_path / "unpickled"
    spec, n_good_cases, expected = _write_broken_dataset(tmp_path / "shards", marker)
    stream = _stream(spec, workers)
    seen = [i for batch, _ in stream.epoch(0) for i in batch["ids"].tolist()]
    bad = dict(stream.counters.bad)
    truncated = bad.pop("truncated_tar")
    assert bad == expected
    assert truncated == 5  # samples 4-8 of the cut shard
    n_good = n_good_cases + 8 - truncated
    # every good sample is read once; the epoch may end early when a worker comes up short
    assert len(seen) == len(set(seen)) and set(seen) <= set(range(n_good))
    assert len(seen) >= n_good - 2 * max(workers, 1) * 2
    assert not marker.exists(), "a shard member was unpickled"


def test_eval_split_counts_the_same_reasons(tmp_path: Path) -> None:
    """Invariant: the evaluation reader skips and counts bad samples like the training stream."""
    marker = tmp_path / "unpickled"
    spec, n_good_cases, expected = _write_broken_dataset(tmp_path / "shards", marker)
    table = load_split(
        shard_list(spec, "data.val"),
        "data.val",
        lambda img: torch.zeros(3, 2, 2, dtype=torch.uint8),
        max_pixels=1000,
        max_bad_fraction=1.0,
    )
    bad = dict(table.bad)
    truncated = bad.pop("truncated_tar")
    assert bad == expected
    assert truncated == 5
    assert table.num_images == n_good_cases + 8 - truncated
    assert not marker.exists()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, pytest.param(1, marks=pytest.mark.system)])
def test_bad_fraction_above_limit_stops_naming_the_shard(tmp_path: Path, workers: int) -> None:
    """Invariant: when a shard's bad samples exceed data.max_bad_fraction the stream stops with
    one line naming the shard, its counts and the limit — also from a loader worker process."""
    samples = [(f"k{k}", sample_members(k)) for k in range(10)]
    for k in (1, 4, 7):
        samples[k][1]["png"] = png()[:20]  # truncated PNG
    path = write_tar(tmp_path / "bad-000000.tar", samples)
    with pytest.raises(DataError) as err:
        list(_stream(str(path), workers, max_bad_fraction=0.2).epoch(0))
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message and "corrupt_image" in message and "0.2" in message


def test_pipe_urls_are_refused_unless_allowed() -> None:
    """Invariant: a 'pipe:' shard URL (it runs a shell command) fails config validation naming
    the key, unless data.allow_pipe=true says so explicitly."""
    with pytest.raises(ValueError, match=r"data\.train: 'pipe:' URLs run a shell command"):
        load_config(None, ["data.train=pipe:cat /etc/hostname"])
    with pytest.raises(ValueError, match=r"data\.val"):
        load_config(None, ["data.val=a.tar::pipe:curl http://x"])
    cfg = load_config(None, ["data.train=pipe:cat x.tar", "data.allow_pipe=true"])
    assert cfg.data.train.startswith("pipe:")


def test_weights_need_resampled_mode() -> None:
    """Invariant: per-source weights only make sense when drawing with replacement."""
    with pytest.raises(ValueError, match=r"data\.train_weights needs data\.mode=resampled"):
        load_config(None, ["data.train=a::b", "data.train_weights=[1, 2]"])
    with pytest.raises(ValueError, match="expected 2 positive weight"):
        load_config(None, ["data.train=a::b", "data.train_weights=[1]", "data.mode=resampled"])

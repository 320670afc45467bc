"""Hostile shard contents: every sample ends counted as bad under a named
reason or read correctly, in training and in evaluation; an exception never escapes the reader
and a bad sample never takes the rest of its shard with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fne_dist.data import StreamOptions, TrainStream, load_split, shard_list
from fne_dist.data.batching import PairCollate
from fne_dist.data.decode import MAX_ID, REASONS, BadSample, decode_sample, is_blank
from fne_dist.memory import EMPTY_ID

from .shard_factory import png, sample_members, write_tar

N_GOOD = 6


def _shard_with(tmp_path: Path, hostile: list[tuple[str, bytes]]) -> Path:
    """A shard of N_GOOD good samples (ids 0..5) with one hostile sample in the middle, written
    member by member so that names may repeat."""
    import io
    import tarfile

    path = tmp_path / "shards" / "h-000000.tar"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for k in range(N_GOOD):
            if k == N_GOOD // 2:
                for ext, data in hostile:
                    add(f"hostile.{ext}", data)
            for ext, data in sample_members(k).items():
                add(f"good{k:03d}.{ext}", data)
    (path.parent / "sizes.json").write_text(json.dumps({path.name: N_GOOD + 1}))
    return path


def _hostile_json(text: str) -> list[tuple[str, bytes]]:
    return [("png", png()), ("txt", b"a caption"), ("json", text.encode())]


def _train_ids(spec: str) -> tuple[list[int], dict[str, int]]:
    opts = StreamOptions(batch=1, seed=0, shuffle_buffer=1, max_bad_fraction=1.0)
    stream = TrainStream(
        shard_list(spec, "data.train"),
        opts,
        lambda d: {"ids": d.image_id, "groups": d.group},
        PairCollate(None),
    )
    ids = [i for batch, _ in stream.epoch(0) for i in batch["ids"].tolist()]
    return ids, dict(stream.counters.bad)


def _eval_table(spec: str):
    return load_split(
        shard_list(spec, "data.val"),
        "data.val",
        lambda img: torch.zeros(3, 2, 2, dtype=torch.uint8),
        max_bad_fraction=1.0,
    )


def assert_counted_bad(tmp_path: Path, hostile: list[tuple[str, bytes]], reason: str) -> None:
    """The hostile sample is counted once under ``reason``; all good samples are read, by the
    training stream and by the evaluation reader."""
    assert reason in REASONS  # counted into metrics.json's data.bad_samples
    spec = str(_shard_with(tmp_path, hostile))
    ids, bad = _train_ids(spec)
    assert bad == {reason: 1}
    assert sorted(ids) == list(range(N_GOOD))
    table = _eval_table(spec)
    assert dict(table.bad) == {reason: 1}
    assert sorted(table.image_ids_I.tolist()) == list(range(N_GOOD))


def test_hostile_json_infinity_is_a_bad_id(tmp_path: Path) -> None:
    """Invariant: ``{"image_id": Infinity}`` (json.loads accepts it) is one bad sample
    (bad_id), not an OverflowError that ends training and evaluation."""
    assert_counted_bad(tmp_path, _hostile_json('{"image_id": Infinity}'), "bad_id")


def test_hostile_json_1e400_is_a_bad_id(tmp_path: Path) -> None:
    """Invariant: an id of ``1e400`` (a float overflowing to inf) is one bad sample."""
    assert_counted_bad(tmp_path, _hostile_json('{"image_id": 1e400}'), "bad_id")


def test_hostile_id_beyond_int64_is_a_bad_id(tmp_path: Path) -> None:
    """Invariant: an integer id that does not fit int64 (10^29, or 2^63) is one bad sample in
    the decoder, not a collate-time 'Overflow when unpacking long long'; 2^63-1 still fits."""
    assert_counted_bad(tmp_path, _hostile_json(json.dumps({"image_id": 10**29})), "bad_id")
    too_big = json.dumps({"group_id": 2**63}).encode()
    with pytest.raises(BadSample, match="bad_id"):
        decode_sample({"__key__": "k", "png": png(), "txt": b"x", "json": too_big})
    largest = json.dumps({"image_id": MAX_ID}).encode()
    ok = decode_sample({"__key__": "k", "png": png(), "txt": b"x", "json": largest})
    assert PairCollate(None)([{"ids": ok.image_id, "groups": ok.group}])["ids"].item() == MAX_ID


def test_hostile_deeply_nested_json_is_bad_json(tmp_path: Path) -> None:
    """Invariant: 100k nested '[' in a json member is one bad sample (bad_json), not a
    RecursionError."""
    assert_counted_bad(tmp_path, _hostile_json("[" * 100_000), "bad_json")


def test_hostile_duplicate_member_spoils_only_its_sample(tmp_path: Path) -> None:
    """Invariant: a member name repeated inside one sample (``dup.txt`` twice) makes that sample
    bad (duplicate_member); the samples after it in the shard are still read, not counted as
    truncated_tar."""
    hostile = [*_hostile_json('{"image_id": 99}'), ("txt", b"another caption")]
    assert_counted_bad(tmp_path, hostile, "duplicate_member")


def test_hostile_reserved_extension_cannot_overwrite_the_key(tmp_path: Path) -> None:
    """Invariant: a member ``k.__key__`` (an extension spelled like the sample's own fields)
    is a bad sample, and cannot replace the sample's key."""
    hostile = [*_hostile_json('{"image_id": 99}'), ("__key__", b"good000")]
    assert_counted_bad(tmp_path, hostile, "unknown_extension")


@pytest.mark.parametrize("value", ["3.7", "3.0", "true", '""', "null", "[1]", "{}"])
def test_hostile_non_integer_image_id_is_bad_not_truncated(value: str) -> None:
    """Invariant: image_id must be a JSON integer: 3.7 is bad (never truncated to 3, where it
    would collide with a real image 3), as are 3.0, booleans, the empty string, null, lists,
    objects (non-empty strings are ids)."""
    sample = {
        "__key__": "k",
        "png": png(),
        "txt": b"x",
        "json": b'{"image_id": %s}' % value.encode(),
    }
    with pytest.raises(BadSample) as err:
        decode_sample(sample)
    assert err.value.reason == "bad_id" and "image_id" in str(err.value)


def test_hostile_non_integer_image_id_counted_in_stream(tmp_path: Path) -> None:
    """Invariant: through the training stream and the evaluation reader, image_id 3.7 is one bad
    sample and image 3 keeps only its own sample."""
    assert_counted_bad(tmp_path, _hostile_json('{"image_id": 3.7}'), "bad_id")


@pytest.mark.parametrize(
    ("field", "value", "ok"),
    [
        ("image_id", EMPTY_ID, False),  # the memory's empty-slot marker
        ("image_id", -1, False),
        ("image_id", 0, True),
        ("caption_id", -1, True),  # -1: unknown
        ("caption_id", -2, False),
        ("group_id", -1, True),  # -1: no group
        ("group_id", EMPTY_ID, False),
        ("family_id", EMPTY_ID, False),
    ],
)
def test_hostile_negative_ids_are_out_of_range(field: str, value: int, ok: bool) -> None:
    """Invariant: image_id lies in 0..2^63-1, caption_id and group_id in -1..2^63-1; in
    particular no sample carries the memory's empty-slot marker -100 as an image or group id."""
    sample = {
        "__key__": "k",
        "png": png(),
        "txt": b"x",
        "json": json.dumps({field: value}).encode(),
    }
    if ok:
        d = decode_sample(sample)
        assert EMPTY_ID not in (d.image_id, d.group)
    else:
        with pytest.raises(BadSample, match=f"bad_id: k.json {field}"):
            decode_sample(sample)


def test_hostile_image_id_of_empty_marker_counted_in_stream(tmp_path: Path) -> None:
    """Invariant: a sample with image_id -100 is counted bad in training and evaluation."""
    assert_counted_bad(tmp_path, _hostile_json('{"image_id": -100}'), "bad_id")


@pytest.mark.parametrize(
    "caption",
    [b"\x00\x00\x00", b" \x00\t\x00\n", b"\x1b\x7f\x07", "\u200b\ufeff".encode(), "\x85".encode()],
)
def test_hostile_caption_of_nul_or_control_chars_is_empty(caption: bytes) -> None:
    """Invariant: a caption of only NUL bytes, whitespace, control or format characters
    (zero-width space, BOM) is empty_caption."""
    sample = {"__key__": "k", "png": png(), "txt": caption, "json": b'{"image_id": 1}'}
    with pytest.raises(BadSample) as err:
        decode_sample(sample)
    assert err.value.reason == "empty_caption"


def test_hostile_control_chars_inside_a_caption_become_spaces(tmp_path: Path) -> None:
    """Invariant: control characters inside a real caption become spaces (the caption is kept),
    and a json caption list with a NUL-only entry or a non-string entry is bad, not 'None'."""
    d = decode_sample({"__key__": "k", "png": png(), "txt": b"a\x00dog\x1b on\ta beach"})
    assert d.captions == ["a dog on a beach"] and not is_blank(d.captions[0])
    for listed, reason in ((["ok", "\x00\x00"], "empty_caption"), (["ok", None], "bad_json")):
        meta = json.dumps({"image_id": 1, "captions": listed}).encode()
        sample = {"__key__": "k", "png": png(), "txt": b"ok", "json": meta}
        with pytest.raises(BadSample) as err:
            decode_sample(sample, all_captions=True)
        assert err.value.reason == reason
    assert_counted_bad(tmp_path, [("png", png()), ("txt", b"\x00" * 8)], "empty_caption")


def test_hostile_decimal_keys_beyond_int64_are_hashed() -> None:
    """Invariant: a shard without ids whose sample key is a decimal too large for int64 (or a
    non-ASCII digit such as '²') still gets an id in 0..2^63-1 (a hash), not an overflow; keys
    are hashed with their shard's directory, so one key in two directories is two ids."""
    for key in ("9" * 40, "²", "0" * 30 + "7"):
        d = decode_sample({"__key__": f"dir/{key}", "png": png(), "txt": b"x"})
        assert 0 <= d.image_id <= MAX_ID
    ids = {
        decode_sample({"__key__": "7", "__url__": url, "png": png(), "txt": b"x"}).image_id
        for url in ("a/0.tar", "b/0.tar", "a/1.tar")
    }
    assert len(ids) == 2


def test_hostile_npy_with_non_finite_values_is_bad() -> None:
    """Invariant: a feature member with NaN/inf values (or float64 beyond float32's range) is a
    bad sample (bad_npy), never a NaN in the loss."""
    import io

    import numpy as np

    for values in (np.array([1.0, np.nan], np.float32), np.array([1e300], np.float64)):
        buf = io.BytesIO()
        np.save(buf, values, allow_pickle=False)
        sample = {"__key__": "k", "img_feat.npy": buf.getvalue(), "txt": b"x"}
        with pytest.raises(BadSample, match="bad_npy"):
            decode_sample(sample)


def test_hostile_grouping_matches_webdataset_on_good_shards(tmp_path: Path) -> None:
    """Invariant: the reader's grouping yields the same samples, keys and members as
    webdataset's ``group_by_keys`` on a well-formed shard (only duplicates differ)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    from fne_dist.data.stream import group_members

    path = write_tar(tmp_path / "w.tar", [(f"dir/k{k}", sample_members(k)) for k in range(5)])

    def members():
        with open(path, "rb") as f:
            yield from tar_file_expander([{"url": str(path), "stream": f}], eof_value=None)

    ours = list(group_members(members()))
    theirs = list(group_by_keys(members()))
    assert ours == theirs and len(ours) == 5

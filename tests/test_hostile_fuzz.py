"""Fuzz tests: over shard members, json fields, tar member names and
sizes.json documents, every input is counted bad under a known reason or read correctly (ids
in range, captions non-empty, a batch collates); no other exception escapes. Hypothesis runs
derandomized (a fixed seed) with a bounded number of examples, so CI time stays small."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")  # in the test extras (pyproject.toml)
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fne_dist.data import DataError  # noqa: E402
from fne_dist.data.batching import PairCollate  # noqa: E402
from fne_dist.data.decode import (  # noqa: E402
    MAX_ID,
    REASONS,
    BadSample,
    decode_sample,
    is_blank,
)
from fne_dist.data.plan import Piece  # noqa: E402
from fne_dist.data.sources import MAX_SHARD_SAMPLES, _parse_sizes, count_samples  # noqa: E402
from fne_dist.data.stream import raw_samples  # noqa: E402

from .shard_factory import png  # noqa: E402

FUZZ = settings(
    max_examples=150,
    derandomize=True,  # a fixed seed: the same examples on every run
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
PNG = png()

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([10**29, 2**63, 2**63 - 1, -100, -1, 0, 3])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)
ids = (
    st.sampled_from([10**29, 2**63, 2**63 - 1, -100, -1, 0, 3, 3.7, 3.0, math.inf, math.nan])
    | st.integers(min_value=-(2**70), max_value=2**70)
    | json_values
)
metas = st.fixed_dictionaries(
    {},
    optional={
        "image_id": ids,
        "caption_id": ids,
        "group_id": ids,
        "family_id": ids,
        "captions": st.lists(st.text(max_size=10) | json_values, max_size=3) | json_values,
        "other": json_values,
    },
)
captions = st.text(max_size=24).map(lambda t: t.encode("utf-8")) | st.binary(max_size=24)


def check_decoded(sample: dict, all_captions: bool) -> None:
    """The invariant: BadSample with a known reason, or a sample whose values are in range and
    which collates into a batch."""
    try:
        d = decode_sample(sample, all_captions=all_captions)
    except BadSample as err:
        assert err.reason in REASONS
        return
    for value, low in ((d.image_id, 0), (d.caption_id, -1), (d.group, -1)):
        assert type(value) is int and low <= value <= MAX_ID
    assert d.captions and not any(is_blank(c) for c in d.captions)
    batch = PairCollate(None)([{"ids": d.image_id, "groups": d.group}])
    assert batch["ids"].tolist() == [d.image_id]


@FUZZ
@given(meta=metas, caption=captions, all_captions=st.booleans())
def test_hostile_fuzz_json_fields(meta: dict, caption: bytes, all_captions: bool) -> None:
    """Invariant: any JSON object in the json member (ids of any type and size, NaN,
    Infinity, nested values, caption lists of anything) is counted bad or read in range."""
    check_decoded(
        {"__key__": "k", "png": PNG, "txt": caption, "json": json.dumps(meta).encode()},
        all_captions,
    )


@FUZZ
@given(raw=st.binary(max_size=64) | st.text(max_size=40).map(str.encode))
def test_hostile_fuzz_raw_json_bytes(raw: bytes) -> None:
    """Invariant: arbitrary bytes as the json member are counted bad or read."""
    check_decoded({"__key__": "k", "png": PNG, "txt": b"a caption", "json": raw}, True)


EXTS = ["png", "jpg", "txt", "json", "npy", "img_feat.npy", "txt_feat.npy", "pyd", "cls", "x.txt"]


@FUZZ
@given(
    members=st.dictionaries(
        st.sampled_from(EXTS) | st.text(min_size=1, max_size=8),
        st.binary(max_size=48) | st.just(PNG),
        max_size=5,
    ),
    key=st.text(max_size=30),
)
def test_hostile_fuzz_member_sets(members: dict, key: str) -> None:
    """Invariant: any set of members (missing, unknown, pickles, garbage images and arrays) and
    any sample key is counted bad or read."""
    check_decoded({"__key__": key, **members}, False)


names = st.tuples(
    st.sampled_from(["a", "b", "c", "dir/a", "__meta__", "d.e"]),
    st.sampled_from(["png", "txt", "json", "TXT", "__key__", "x.txt", ""]),
)


@settings(FUZZ, max_examples=40)
@given(entries=st.lists(st.tuples(names, st.binary(max_size=8) | st.just(PNG)), max_size=10))
def test_hostile_fuzz_tar_member_names(tmp_path_factory, entries: list) -> None:
    """Invariant: a tar of any member names (repeated, reserved, upper-case, meta, without an
    extension) yields as many samples as its headers count (count_samples, what sizes.json
    holds), each counted bad or read, and no exception escapes the reader."""
    path = Path(tmp_path_factory.mktemp("fuzz")) / "f.tar"
    with tarfile.open(path, "w") as tar:
        for (key, ext), data in entries:
            info = tarfile.TarInfo(f"{key}.{ext}" if ext else key)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    samples = list(raw_samples(str(path), Piece(0, 0, MAX_SHARD_SAMPLES)))
    assert len(samples) == count_samples(str(path))
    for sample in samples:
        check_decoded(sample, True)


@FUZZ
@given(doc=st.dictionaries(st.text(max_size=8), json_values, max_size=4) | json_values)
def test_hostile_fuzz_sizes_json(doc: object) -> None:
    """Invariant: any JSON document as sizes.json is either an object of counts in
    0..MAX_SHARD_SAMPLES, read as they are, or a DataError of one line naming the file."""
    raw = json.dumps(doc).encode()
    try:
        sizes = _parse_sizes(raw, "x/sizes.json")
    except DataError as err:
        assert "\n" not in str(err) and str(err).startswith("x/sizes.json")
        return
    assert isinstance(doc, dict) and sizes == doc
    for value in sizes.values():
        assert type(value) is int and 0 <= value <= MAX_SHARD_SAMPLES
        assert not (isinstance(value, float) and math.isnan(value))

"""Tests for the embedded emoji dataset in shards/emoji.

The first half checks the family and caption rules of the generator script on
hand-written inputs and needs neither the emoji font nor emoji-test.txt.  The
second half reads the committed shards with the plain ``tarfile`` module.
"""

from __future__ import annotations

import importlib.util
import io
import json
import tarfile
from collections import defaultdict
from pathlib import Path
from types import ModuleType

import pytest
from PIL import Image

EMOJI_DIR = Path(__file__).resolve().parents[1] / "shards" / "emoji"
SCRIPT = EMOJI_DIR / "build_emoji_shards.py"
# Fully-qualified emoji in emoji-test.txt of Debian unicode-data 15.0.0-1.
EXPECTED_TOTAL = 3655
SPLITS = ("train", "val", "test")
REQUIRED_JSON = {"image_id", "family_id", "group", "subgroup", "codepoints", "name"}


def _load_script() -> ModuleType:
    # shards/ is data, not a package, so load the generator from its path.
    spec = importlib.util.spec_from_file_location("build_emoji_shards", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _load_script()

ZWJ = 0x200D
PERSON_TECHNOLOGIST = (0x1F9D1, ZWJ, 0x1F4BB)
PEOPLE_HOLDING_HANDS = (0x1F9D1, ZWJ, 0x1F91D, ZWJ, 0x1F9D1)


# ---------------------------------------------------------------- family rule


@pytest.mark.parametrize(
    ("codepoints", "expected"),
    [
        # thumbs up: medium skin tone
        ((0x1F44D, 0x1F3FD), (0x1F44D,)),
        # red heart (fully-qualified with FE0F)
        ((0x2764, 0xFE0F), (0x2764,)),
        # woman running: dark skin tone
        ((0x1F3C3, 0x1F3FF, ZWJ, 0x2640, 0xFE0F), (0x1F3C3,)),
        # man gesturing OK
        ((0x1F646, ZWJ, 0x2642, 0xFE0F), (0x1F646,)),
        # man, woman -> person
        ((0x1F468,), (0x1F9D1,)),
        ((0x1F469, 0x1F3FB), (0x1F9D1,)),
        # man / woman / person technologist
        ((0x1F468, ZWJ, 0x1F4BB), PERSON_TECHNOLOGIST),
        ((0x1F469, 0x1F3FD, ZWJ, 0x1F4BB), PERSON_TECHNOLOGIST),
        (PERSON_TECHNOLOGIST, PERSON_TECHNOLOGIST),
        # man: red hair -> person: red hair
        ((0x1F468, 0x1F3FF, ZWJ, 0x1F9B0), (0x1F9D1, ZWJ, 0x1F9B0)),
        # family: man, woman, girl and family: woman, boy -> family
        ((0x1F468, ZWJ, 0x1F469, ZWJ, 0x1F467), (0x1F46A,)),
        ((0x1F469, ZWJ, 0x1F466), (0x1F46A,)),
        # kiss: woman, man, light skin tone, dark skin tone -> kiss
        (
            (0x1F469, 0x1F3FB, ZWJ, 0x2764, 0xFE0F, ZWJ, 0x1F48B, ZWJ, 0x1F468, 0x1F3FF),
            (0x1F48F,),
        ),
        # woman and man holding hands -> people holding hands
        ((0x1F46B,), PEOPLE_HOLDING_HANDS),
        ((0x1F469, 0x1F3FB, ZWJ, 0x1F91D, ZWJ, 0x1F468, 0x1F3FC), PEOPLE_HOLDING_HANDS),
        # handshake: light skin tone, dark skin tone -> handshake
        ((0x1FAF1, 0x1F3FB, ZWJ, 0x1FAF2, 0x1F3FF), (0x1F91D,)),
        # non-person emoji are unchanged
        ((0x1F600,), (0x1F600,)),
        ((0x1F45E,), (0x1F45E,)),  # man's shoe
        ((0x1F1EF, 0x1F1F5), (0x1F1EF, 0x1F1F5)),  # flag: Japan
        ((0x2640, 0xFE0F), (0x2640,)),  # female sign on its own is a symbol
    ],
)
def test_family_key(codepoints: tuple[int, ...], expected: tuple[int, ...]) -> None:
    """Skin tones, FE0F and gender are removed; everything else is kept."""
    assert build.family_key(codepoints) == expected


def test_family_key_keeps_gender_only_emoji_apart() -> None:
    """Man dancing and woman dancing have no neutral form and stay two families."""
    assert build.family_key((0x1F57A,)) != build.family_key((0x1F483,))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("woman technologist: medium skin tone", "person technologist"),
        ("man gesturing OK", "person gesturing OK"),
        ("thumbs up: dark skin tone", "thumbs up"),
        ("kiss: woman, man, light skin tone, dark skin tone", "kiss"),
        ("family: man, woman, boy", "family"),
        ("man: red hair, dark skin tone", "person: red hair"),
        ("men holding hands", "people holding hands"),
        ("man’s shoe", "man’s shoe"),
        ("flag: Isle of Man", "flag: Isle of Man"),
        ("snowman", "snowman"),
    ],
)
def test_family_caption(name: str, expected: str) -> None:
    """The fallback caption drops skin-tone and gender qualifiers only."""
    assert build.family_caption(name) == expected


SNIPPET = """\
# group: People & Body

# subgroup: person-role
1F9D1 200D 1F4BB ; fully-qualified # 🧑‍💻 E12.1 technologist
1F9D1 1F3FB 200D 1F4BB ; fully-qualified # 🧑🏻‍💻 E12.1 technologist: light skin tone
1F468 200D 1F4BB ; fully-qualified # 👨‍💻 E4.0 man technologist
1F469 1F3FF 200D 1F4BB ; fully-qualified # 👩🏿‍💻 E4.0 woman technologist: dark skin tone
1F46E 200D 2642 FE0F ; fully-qualified # 👮‍♂️ E4.0 man police officer
1F46E 200D 2642 ; minimally-qualified # 👮‍♂ E4.0 man police officer

# group: Component

# subgroup: skin-tone
1F3FB ; component # 🏻 E1.0 light skin tone
"""


def test_parse_and_group_snippet() -> None:
    """Only fully-qualified lines are kept; a family's txt is its base member's name."""
    items = build.parse_emoji_test(SNIPPET.splitlines())
    assert [item.image_id for item in items] == list(range(5))
    assert items[0].group == "People & Body" and items[0].subgroup == "person-role"
    family_ids, captions, keys = build.group_families(items)
    assert family_ids == [0, 0, 0, 0, 1]
    assert keys[0] == PERSON_TECHNOLOGIST
    # No base member for the police officer here, so the fallback cleans the name.
    assert captions == ["technologist", "person police officer"]


def test_assign_splits_partitions_families() -> None:
    """Every family lands in exactly one split, deterministically for a seed."""
    sizes = [1, 3, 1, 1, 2, 1, 1, 5, 1, 1, 1, 1, 4, 1, 1, 1, 1, 2, 1, 1]
    splits = build.assign_splits(sizes, seed=7)
    assert splits == build.assign_splits(sizes, seed=7)
    assert sorted(fid for fids in splits.values() for fid in fids) == list(range(len(sizes)))
    assert sum(sizes[fid] for fid in splits["train"]) >= 0.8 * sum(sizes)


# ------------------------------------------------------ committed shards


@pytest.fixture(scope="module")
def sizes() -> dict[str, int]:
    return json.loads((EMOJI_DIR / "sizes.json").read_text())


@pytest.fixture(scope="module")
def summary() -> dict[str, dict[str, int]]:
    return json.loads((EMOJI_DIR / "splits.json").read_text())


@pytest.fixture(scope="module")
def shards() -> dict[str, list[tuple[str, dict[str, bytes]]]]:
    """Shard file name -> samples in tar order, each as (key, {ext: bytes})."""
    out: dict[str, list[tuple[str, dict[str, bytes]]]] = {}
    for path in sorted(EMOJI_DIR.glob("emoji-*.tar*")):
        samples: dict[str, dict[str, bytes]] = {}
        with tarfile.open(path) as tar:
            for member in tar:
                assert member.isfile(), member.name
                key, ext = member.name.split(".", 1)
                file = tar.extractfile(member)
                assert file is not None
                samples.setdefault(key, {})[ext] = file.read()
        out[path.name] = list(samples.items())
    return out


def _split_of(shard_name: str) -> str:
    return shard_name.split("-")[1]


def test_sizes_json_matches_shards(shards, sizes, summary) -> None:
    """sizes.json and splits.json agree with what the tar files hold."""
    assert {name: len(samples) for name, samples in shards.items()} == sizes
    assert len(shards) >= 5 and sum(_split_of(n) == "train" for n in shards) >= 3
    for split in SPLITS:
        count = sum(len(s) for n, s in shards.items() if _split_of(n) == split)
        assert count == summary[split]["items"], split


def test_every_sample_is_complete(shards) -> None:
    """Each sample has exactly webp, txt, full.txt and json, and a 128 px RGB image."""
    size = build.IMAGE_SIZE
    for name, samples in shards.items():
        for key, members in samples:
            assert set(members) == set(build.MEMBER_EXTS), (name, key)
            meta = json.loads(members["json"])
            assert set(meta) >= REQUIRED_JSON, (name, key)
            assert members["full.txt"].decode() == meta["name"]
            assert members["txt"].decode().strip()
            with Image.open(io.BytesIO(members["webp"])) as image:
                assert image.format == "WEBP"
                image.load()
                assert image.size == (size, size) and image.mode == "RGB", (name, key)


def test_families_follow_the_rule(shards) -> None:
    """family_id, family codepoints and txt agree with family_key and each other."""
    txt_of: dict[int, str] = {}
    key_of: dict[int, str] = {}
    for samples in shards.values():
        for _, members in samples:
            meta = json.loads(members["json"])
            cps = tuple(int(cp, 16) for cp in meta["codepoints"].split())
            key = build.format_codepoints(build.family_key(cps))
            assert key_of.setdefault(meta["family_id"], key) == key
            txt = members["txt"].decode()
            assert txt_of.setdefault(meta["family_id"], txt) == txt
    # Different families never share a caption: txt identifies the family.
    assert len(set(txt_of.values())) == len(txt_of)
    assert len(set(key_of.values())) == len(key_of)


def test_splits_are_family_disjoint_and_complete(shards, summary) -> None:
    """No family crosses splits, ids are unique, and the total is the full emoji set."""
    split_of_family: dict[int, str] = {}
    image_ids: list[int] = []
    family_sizes: dict[str, dict[int, int]] = {split: defaultdict(int) for split in SPLITS}
    for name, samples in shards.items():
        split = _split_of(name)
        for _, members in samples:
            meta = json.loads(members["json"])
            fid = meta["family_id"]
            assert split_of_family.setdefault(fid, split) == split, f"family {fid} crosses"
            image_ids.append(meta["image_id"])
            family_sizes[split][fid] += 1
    assert sorted(image_ids) == list(range(EXPECTED_TOTAL))
    assert summary["total"]["items"] == EXPECTED_TOTAL
    for split in SPLITS:
        assert len(family_sizes[split]) == summary[split]["families"], split
        # Genuine false negatives: several images share one caption in every split.
        assert max(family_sizes[split].values()) > 1, split

"""Build the embedded emoji image-text dataset as reproducible WebDataset shards.

Source data (both from Debian packages, nothing is downloaded):

* images: every fully-qualified emoji of Unicode ``emoji-test.txt`` rendered
  with the Noto Color Emoji font (package ``fonts-noto-color-emoji``);
* captions: the CLDR short names from ``emoji-test.txt`` (package
  ``unicode-data``).

Each sample is one emoji and carries two captions: ``txt`` is the *family*
caption shared by every variant of the emoji, ``full.txt`` is the full CLDR
name.  Variants of one emoji (skin tones, genders) form a family, so the
dataset contains genuine false negatives: images that are not the paired
image of a caption but match it just as well.

Family rule (``family_key``), applied to code points in this order:

1. drop the emoji presentation selector U+FE0F and the skin-tone modifiers
   U+1F3FB..U+1F3FF;
2. drop ZWJ + FEMALE SIGN / MALE SIGN (U+200D U+2640, U+200D U+2642), the
   suffix that turns "person running" into "woman running"; a bare U+2640 or
   U+2642 is the "female sign"/"male sign" symbol emoji and is kept;
3. replace each gendered code point by its gender-neutral counterpart, the
   pairs that UTS #51 lists as gender variants:
   man U+1F468 / woman U+1F469 -> person U+1F9D1 (this also covers them as
   parts of ZWJ sequences: "man technologist", "kiss: woman, man",
   "family: man, woman, boy", "man: red hair", ...), boy U+1F466 / girl
   U+1F467 -> child U+1F9D2, old man U+1F474 / old woman U+1F475 -> older
   person U+1F9D3, prince U+1F934 / princess U+1F478 -> person with crown
   U+1FAC5, pregnant woman U+1F930 / pregnant man U+1FAC3 -> pregnant person
   U+1FAC4, Santa Claus U+1F385 / Mrs. Claus U+1F936 -> mx claus
   U+1F9D1 U+200D U+1F384, and the single-code-point couples
   U+1F46B / U+1F46C / U+1F46D ("... holding hands") -> people holding hands
   U+1F9D1 U+200D U+1F91D U+200D U+1F9D1;
4. fold the multi-person ZWJ sequences into their single-code-point emoji:
   every ZWJ sequence made only of persons and children ("family: man, boy",
   "family: woman, woman, girl, boy", ...) -> family U+1F46A, the gender
   neutral "kiss: person, person" -> kiss U+1F48F and "couple with heart:
   person, person" -> couple with heart U+1F491; likewise the two-tone
   handshake U+1FAF1 U+200D U+1FAF2 -> handshake U+1F91D.  All family compositions
   collapse into one family because the caption "family" fits all of them.

Man dancing (U+1F57A) and woman dancing (U+1F483) have no neutral form in
Unicode 15.0 and stay two families.  Everything that is not a person emoji
(flags, keycaps, "man's shoe", ...) keeps its own code points as its key.

Caption rule: the ``txt`` of a family is the CLDR name of its *base member*,
the item whose own code points without U+FE0F equal the family key, so the
caption is CLDR's own gender-neutral name: "technologist" for all 18
technologists (CLDR drops "person" for occupations), "person gesturing OK",
"people holding hands", "kiss".  A family without a base member (none in
Unicode 15.0) falls back to ``family_caption`` of its first member in CLDR
order, which drops skin-tone and person-list qualifiers and rewrites
man/woman to person.  Captions keep
CLDR's capitalisation ("flag: Japan", "person gesturing OK"), i.e. they are
mostly lower case.  Every family caption is unique, so caption and family
identify each other.

Splits: families are shuffled with ``random.Random(seed)`` and taken in that
order into train until it holds >= 80 % of the items, then into val until
>= 90 %, the rest is test; a family therefore never crosses splits.  Samples
inside a split are shuffled with the same generator because WebDataset
readers shuffle only within a small buffer and CLDR order puts all variants
of an emoji next to each other.

Output is byte-reproducible: gzip header mtime 0 and no file name, tar
members with mtime 0, uid/gid 0, uname/gname "root", mode 0644, fixed member
order; WebP is encoded lossy at a fixed quality and method (libwebp is
deterministic for a given version).  Run:

    python shards/emoji/build_emoji_shards.py --out shards/emoji
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import random
import re
import sys
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import PIL
from PIL import Image, ImageDraw, ImageFont, features

EMOJI_TEST_TXT = Path("/usr/share/unicode/emoji/emoji-test.txt")
FONT_PATH = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
FONT_PACKAGE = "fonts-noto-color-emoji"

# The CBDT bitmaps of Noto Color Emoji exist at one strike only; FreeType
# refuses any other size for this font.
FONT_SIZE = 109
MAX_SINGLE_GLYPH_ADVANCE = 200
IMAGE_SIZE = 128
# Lossy WebP at q=85 keeps the flat-colour glyphs clean (lossless is ~3x
# larger) and the whole data set well below the 15 MB budget.
WEBP_QUALITY = 85
WEBP_METHOD = 6
SEED = 20240611
SHARD_MAXCOUNT = 1000
SPLIT_FRACTIONS = (("train", 0.8), ("val", 0.9), ("test", 1.0))
# Fixed member order inside each sample.
MEMBER_EXTS = ("webp", "txt", "full.txt", "json")

ZWJ = 0x200D
VS16 = 0xFE0F
FEMALE_SIGN = 0x2640
MALE_SIGN = 0x2642
SKIN_TONES = frozenset(range(0x1F3FB, 0x1F400))
PERSON = 0x1F9D1
CHILD = 0x1F9D2
FAMILY = 0x1F46A
KISS = 0x1F48F
COUPLE_WITH_HEART = 0x1F491
HEART = 0x2764
KISS_MARK = 0x1F48B

# Gendered code point -> gender-neutral replacement (step 3 of the rule).
GENDER_NEUTRAL: dict[int, tuple[int, ...]] = {
    0x1F468: (PERSON,),  # man
    0x1F469: (PERSON,),  # woman
    0x1F466: (CHILD,),  # boy
    0x1F467: (CHILD,),  # girl
    0x1F474: (0x1F9D3,),  # old man -> older person
    0x1F475: (0x1F9D3,),  # old woman -> older person
    0x1F934: (0x1FAC5,),  # prince -> person with crown
    0x1F478: (0x1FAC5,),  # princess -> person with crown
    0x1F930: (0x1FAC4,),  # pregnant woman -> pregnant person
    0x1FAC3: (0x1FAC4,),  # pregnant man -> pregnant person
    0x1F385: (PERSON, ZWJ, 0x1F384),  # Santa Claus -> mx claus
    0x1F936: (PERSON, ZWJ, 0x1F384),  # Mrs. Claus -> mx claus
    0x1F46B: (PERSON, ZWJ, 0x1F91D, ZWJ, PERSON),  # woman and man holding hands
    0x1F46C: (PERSON, ZWJ, 0x1F91D, ZWJ, PERSON),  # men holding hands
    0x1F46D: (PERSON, ZWJ, 0x1F91D, ZWJ, PERSON),  # women holding hands
}

# Whole-sequence folds of step 4 (after steps 1-3).
SEQUENCE_FOLDS: dict[tuple[int, ...], tuple[int, ...]] = {
    (PERSON, ZWJ, HEART, ZWJ, KISS_MARK, ZWJ, PERSON): (KISS,),
    (PERSON, ZWJ, HEART, ZWJ, PERSON): (COUPLE_WITH_HEART,),
    # Mixed-skin-tone handshakes are rightwards hand ZWJ leftwards hand.
    (0x1FAF1, ZWJ, 0x1FAF2): (0x1F91D,),
}

SKIN_TONE_NAMES = frozenset(
    f"{shade} skin tone" for shade in ("light", "medium-light", "medium", "medium-dark", "dark")
)
# Qualifiers listing the people of kiss / couple / family sequences.
PERSON_QUALIFIERS = frozenset({"man", "woman", "person", "boy", "girl", "child"})
# Word-level rewrite for the fallback caption; the look-ahead keeps
# possessives such as "man's shoe" and "women's room" intact.
_GENDER_WORDS = (
    (re.compile(r"\b(?:wo)?man\b(?!['\u2019])"), "person"),
    (re.compile(r"\b(?:wo)?men\b(?!['\u2019])"), "people"),
)

_LINE_RE = re.compile(
    r"^(?P<cps>[0-9A-F]+(?: [0-9A-F]+)*)\s*;\s*(?P<status>[a-z-]+)\s*#\s*"
    r"\S+\s+E\d+\.\d+\s+(?P<name>.+?)\s*$"
)


# A NamedTuple rather than a dataclass: dataclasses look their module up in
# sys.modules, which fails when tests load this file with importlib.
class Emoji(NamedTuple):
    """One fully-qualified emoji of emoji-test.txt."""

    image_id: int
    codepoints: tuple[int, ...]
    name: str
    group: str
    subgroup: str

    @property
    def text(self) -> str:
        """The emoji as a string, ready to be shaped and drawn."""
        return "".join(map(chr, self.codepoints))


def parse_emoji_test(lines: Iterable[str]) -> list[Emoji]:
    """Return the fully-qualified emoji of emoji-test.txt in file (CLDR) order.

    ``image_id`` is the position among the fully-qualified lines, so ids are
    stable for a given emoji-test.txt version.
    """
    group = subgroup = ""
    items: list[Emoji] = []
    for raw in lines:
        line = raw.strip()
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#"):
            match = _LINE_RE.match(line)
            if match is None:
                raise ValueError(f"unparsable emoji-test.txt line: {line!r}")
            if match["status"] != "fully-qualified":
                continue
            cps = tuple(int(cp, 16) for cp in match["cps"].split())
            items.append(Emoji(len(items), cps, match["name"], group, subgroup))
    return items


def family_key(codepoints: Sequence[int]) -> tuple[int, ...]:
    """Return the gender- and skin-tone-free key shared by all variants of an emoji."""
    cps = [cp for cp in codepoints if cp != VS16 and cp not in SKIN_TONES]
    stripped: list[int] = []
    i = 0
    while i < len(cps):
        if cps[i] == ZWJ and i + 1 < len(cps) and cps[i + 1] in (FEMALE_SIGN, MALE_SIGN):
            i += 2
            continue
        stripped.append(cps[i])
        i += 1
    key: tuple[int, ...] = tuple(out for cp in stripped for out in GENDER_NEUTRAL.get(cp, (cp,)))
    if ZWJ in key and set(key) <= {PERSON, CHILD, ZWJ}:
        return (FAMILY,)
    return SEQUENCE_FOLDS.get(key, key)


def family_caption(name: str) -> str:
    """Strip skin-tone and gender qualifiers from a CLDR name.

    "woman technologist: medium skin tone" -> "person technologist",
    "kiss: woman, man, light skin tone" -> "kiss",
    "man: red hair, dark skin tone" -> "person: red hair".
    """
    head, sep, tail = name.partition(": ")
    kept = [
        q
        for q in (tail.split(", ") if sep else [])
        if q not in SKIN_TONE_NAMES and q not in PERSON_QUALIFIERS
    ]
    for pattern, replacement in _GENDER_WORDS:
        head = pattern.sub(replacement, head)
    return f"{head}: {', '.join(kept)}" if kept else head


def format_codepoints(codepoints: Iterable[int]) -> str:
    """Format code points like emoji-test.txt does: "1F9D1 200D 1F4BB"."""
    return " ".join(f"{cp:04X}" for cp in codepoints)


def group_families(items: Sequence[Emoji]) -> tuple[list[int], list[str], list[tuple[int, ...]]]:
    """Assign family ids in order of first appearance and pick each family caption.

    Returns (family id per item, caption per family, key per family).
    """
    key_to_id: dict[tuple[int, ...], int] = {}
    family_ids = [
        key_to_id.setdefault(family_key(item.codepoints), len(key_to_id)) for item in items
    ]
    keys = list(key_to_id)
    captions: list[str | None] = [None] * len(keys)
    for item, fid in zip(items, family_ids, strict=True):
        if tuple(cp for cp in item.codepoints if cp != VS16) == keys[fid]:
            captions[fid] = item.name
    for item, fid in zip(items, family_ids, strict=True):
        if captions[fid] is None:
            captions[fid] = family_caption(item.name)
    final = [c for c in captions if c is not None]
    if len(set(final)) != len(final):
        dupes = sorted({c for c in final if final.count(c) > 1})
        raise ValueError(f"family captions are not unique: {dupes}")
    return family_ids, final, keys


def assign_splits(family_sizes: Sequence[int], seed: int) -> dict[str, list[int]]:
    """Shuffle family ids and cut them into splits by cumulative item fraction."""
    order = list(range(len(family_sizes)))
    random.Random(seed).shuffle(order)
    total = sum(family_sizes)
    splits: dict[str, list[int]] = {name: [] for name, _ in SPLIT_FRACTIONS}
    seen = 0
    bounds = iter(SPLIT_FRACTIONS)
    name, upper = next(bounds)
    for fid in order:
        # Move on once the current split has its share; the last split takes the rest.
        while seen >= upper * total and name != SPLIT_FRACTIONS[-1][0]:
            name, upper = next(bounds)
        splits[name].append(fid)
        seen += family_sizes[fid]
    return splits


def load_font(path: Path) -> ImageFont.FreeTypeFont:
    """Open the colour emoji font with raqm shaping."""
    if not features.check("raqm"):
        # Without raqm, ZWJ sequences and flags come out as several glyphs.
        sys.exit("error: Pillow was built without raqm; ZWJ emoji sequences cannot be shaped")
    return ImageFont.truetype(str(path), FONT_SIZE, layout_engine=ImageFont.Layout.RAQM)


def render_webp(text: str, font: ImageFont.FreeTypeFont) -> bytes:
    """Render one emoji centred on a white square and return WebP bytes."""
    # One glyph advances ~136 px; a wider run means raqm did not form the
    # ligature and the sequence would show as several pictures.
    advance = font.getlength(text)
    if advance > MAX_SINGLE_GLYPH_ADVANCE:
        raise ValueError(f"{text!r} renders as several glyphs ({advance:.0f} px wide)")
    canvas = Image.new("RGBA", (192, 192), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((16, 16), text, font=font, embedded_color=True)
    bbox = canvas.getbbox()
    if bbox is None:
        raise ValueError(f"{text!r} rendered empty")
    glyph = canvas.crop(bbox)
    side = max(glyph.size)
    # Pad to a square so the aspect ratio survives the resize.
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    square.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    image = square.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, format="WEBP", quality=WEBP_QUALITY, method=WEBP_METHOD)
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, samples: Sequence[tuple[str, dict[str, bytes]]]) -> None:
    """Write a .tar.gz shard whose bytes depend only on ``samples``."""
    with (
        path.open("wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar,
    ):
        for key, members in samples:
            for ext in MEMBER_EXTS:
                _add_member(tar, f"{key}.{ext}", members[ext])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(out: Path, emoji_test: Path, font_path: Path, seed: int) -> dict[str, object]:
    """Render, split and write all shards plus sizes.json and splits.json."""
    items = parse_emoji_test(emoji_test.read_text(encoding="utf-8").splitlines())
    family_ids, captions, keys = group_families(items)
    sizes = [0] * len(keys)
    for fid in family_ids:
        sizes[fid] += 1
    splits = assign_splits(sizes, seed)
    font = load_font(font_path)

    rng = random.Random(seed + 1)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("emoji-*.tar.gz"):
        stale.unlink()
    shard_sizes: dict[str, int] = {}
    summary: dict[str, object] = {}
    for split, fids in splits.items():
        members = set(fids)
        split_items = [item for item in items if family_ids[item.image_id] in members]
        rng.shuffle(split_items)
        samples = []
        for item in split_items:
            fid = family_ids[item.image_id]
            meta = {
                "image_id": item.image_id,
                "family_id": fid,
                "group": item.group,
                "subgroup": item.subgroup,
                "codepoints": format_codepoints(item.codepoints),
                "family_codepoints": format_codepoints(keys[fid]),
                "name": item.name,
            }
            samples.append(
                (
                    f"emoji-{item.image_id:06d}",
                    {
                        "webp": render_webp(item.text, font),
                        "txt": captions[fid].encode(),
                        "full.txt": item.name.encode(),
                        "json": json.dumps(meta, ensure_ascii=False, sort_keys=True).encode(),
                    },
                )
            )
        for shard_idx, start in enumerate(range(0, len(samples), SHARD_MAXCOUNT)):
            name = f"emoji-{split}-{shard_idx:06d}.tar.gz"
            chunk = samples[start : start + SHARD_MAXCOUNT]
            write_shard(out / name, chunk)
            shard_sizes[name] = len(chunk)
        summary[split] = {
            "items": len(split_items),
            "families": len(fids),
            "multi_member_families": sum(1 for fid in fids if sizes[fid] > 1),
            # Items that share their caption with at least one other item.
            "items_with_false_negatives": sum(sizes[fid] for fid in fids if sizes[fid] > 1),
            "largest_family": max(sizes[fid] for fid in fids),
            "shards": sum(1 for n in shard_sizes if n.startswith(f"emoji-{split}-")),
        }
    summary["total"] = {
        "items": len(items),
        "families": len(keys),
        "multi_member_families": sum(1 for s in sizes if s > 1),
        "items_with_false_negatives": sum(s for s in sizes if s > 1),
        "largest_family": max(sizes),
    }
    summary["config"] = {
        "seed": seed,
        "image_size": IMAGE_SIZE,
        "image_format": "webp",
        "webp_quality": WEBP_QUALITY,
        "shard_maxcount": SHARD_MAXCOUNT,
    }
    # Recorded so a rebuild can tell whether different bytes come from
    # different inputs or a different encoder.
    summary["provenance"] = {
        "emoji_test_sha256": _sha256(emoji_test),
        "font_sha256": _sha256(font_path),
        "pillow": PIL.__version__,
        "libwebp": features.version("webp"),
        "freetype": features.version("freetype2"),
        "raqm": features.version("raqm"),
    }
    (out / "sizes.json").write_text(json.dumps(shard_sizes, indent=2, sort_keys=True) + "\n")
    (out / "splits.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point; fails with one line when an input is missing."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--emoji-test", type=Path, default=EMOJI_TEST_TXT)
    parser.add_argument("--font", type=Path, default=FONT_PATH)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    for path, package in ((args.emoji_test, "unicode-data"), (args.font, FONT_PACKAGE)):
        if not path.is_file():
            sys.exit(f"error: {path} not found; install it with: apt-get install {package}")
    summary = build(args.out, args.emoji_test, args.font, args.seed)
    print(json.dumps({k: summary[k] for k in ("train", "val", "test", "total")}))


if __name__ == "__main__":
    main()

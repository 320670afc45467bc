"""``python -m fne_dist.shards COMMAND ...``: turn image-text data into WebDataset shards.

Commands (``python -m fne_dist.shards COMMAND -h`` for the options of each):

* ``folder``   an image folder + a captions CSV/TSV or JSON Lines file
* ``coco``     a COCO captions JSON (captions_train2017.json) + its image directory
* ``karpathy`` a Karpathy split JSON (dataset_coco.json, ...) → train/ val/ test/ subdirectories
* ``albef``    an ALBEF/FNE annotation list + its image directory
* ``features`` a precomputed N×D feature matrix (.npy) + a captions file
* ``index``    (re)build sizes.json for existing shards (e.g. from img2dataset)

Rerunning an interrupted command resumes it; ``--overwrite`` starts over. Exit status 2 with one
``error:`` line when an input is missing or unparseable, or when nothing was written.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from .albef import load_albef
from .coco import load_coco
from .entries import ImageEntry, ShardError, limit_entries
from .features import load_feature_captions
from .folder import load_folder
from .index import index_shards
from .karpathy import DEFAULT_LAYOUT, SPLITS, load_karpathy
from .layout import LAYOUTS, write_entries
from .media import (
    SKIP_MISSING_IMAGE,
    SKIP_OUTSIDE_IMAGES,
    FeatureRows,
    ImageFiles,
    MediaSource,
)
from .writer import SUMMARY_FILE, ShardOptions, ShardSummary, format_summary, write_json_atomic


def default_prefix(name: str) -> str:
    """A valid prefix made from a directory or dataset name ("shard" if nothing is left)."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_-")[:64]
    return cleaned or "shard"


def _positive_int(text: str) -> int:
    value = int(text)  # argparse turns the ValueError into a usage error
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _options(args: argparse.Namespace, out: Path, prefix: str) -> ShardOptions:
    return ShardOptions(
        out=out,
        prefix=prefix,
        shard_size=args.shard_size,
        gzip=args.gzip,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )


def _nothing_written(summaries: Sequence[ShardSummary], images: Path | None) -> ShardError:
    skipped: dict[str, int] = {}
    for summary in summaries:
        for reason, n in summary.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
    if not skipped:
        return ShardError("nothing written: the input holds no image with a caption")
    reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items()))
    hint = ""
    if set(skipped) == {SKIP_MISSING_IMAGE} and images is not None:
        hint = f"; image paths are looked up under --images {images.absolute()}"
    if SKIP_OUTSIDE_IMAGES in skipped:
        hint = "; image paths outside --images are refused unless --allow-outside-images"
    return ShardError(f"nothing written: every pair was skipped ({reasons}){hint}")


def _captions_dir(args: argparse.Namespace) -> Path | None:
    # folder's --images defaults to the directory of the captions file; features has no images.
    return args.captions.parent if args.command == "folder" else None


def _image_files(args: argparse.Namespace) -> ImageFiles:
    """Image files confined to --images (the captions file's directory for ``folder``)."""
    root = args.images if args.images is not None else args.captions.parent
    return ImageFiles(root, allow_outside=args.allow_outside_images)


def _with_outside(args: argparse.Namespace, settings: dict[str, Any]) -> dict[str, Any]:
    # Only when set: progress files of earlier runs (without the key) still resume.
    return {**settings, "allow_outside_images": True} if args.allow_outside_images else settings


def _print_summary(summary: ShardSummary) -> None:
    print(format_summary(summary))
    refused = summary.skipped.get(SKIP_OUTSIDE_IMAGES, 0)
    if refused:
        print(
            f"{summary.out}: refused {refused} pairs whose image path lies outside --images "
            "('../', absolute); pass --allow-outside-images if the annotation file is trusted"
        )


def _write_one(
    args: argparse.Namespace,
    entries: list[ImageEntry],
    media: MediaSource,
    settings: dict[str, Any],
) -> int:
    out: Path = args.out
    prefix = args.prefix or default_prefix(out.absolute().name)
    entries = limit_entries(entries, args.limit)
    summary = write_entries(
        entries, media, args.layout or "pair", _options(args, out, prefix), settings
    )
    _print_summary(summary)
    if summary.samples == 0:
        raise _nothing_written([summary], getattr(args, "images", None) or _captions_dir(args))
    return 0


def run_folder(args: argparse.Namespace) -> int:
    """``folder``: images + captions CSV/JSONL."""
    entries = load_folder(
        args.captions,
        args.images,
        image_column=args.image_column,
        caption_column=args.caption_column,
        group_column=args.group_column,
        fmt=args.format,
        delimiter=args.delimiter,
    )
    return _write_one(args, entries, _image_files(args), _with_outside(args, {"command": "folder"}))


def run_coco(args: argparse.Namespace) -> int:
    """``coco``: COCO captions JSON + images."""
    entries = load_coco(args.captions, args.images)
    return _write_one(args, entries, _image_files(args), _with_outside(args, {"command": "coco"}))


def run_albef(args: argparse.Namespace) -> int:
    """``albef``: ALBEF/FNE annotation list + images."""
    entries = load_albef(args.captions, args.images)
    return _write_one(args, entries, _image_files(args), _with_outside(args, {"command": "albef"}))


def run_features(args: argparse.Namespace) -> int:
    """``features``: feature matrix + captions."""
    media = FeatureRows(args.features, args.dtype)
    entries = load_feature_captions(
        args.captions,
        caption_column=args.caption_column,
        group_column=args.group_column,
        fmt=args.format,
    )
    settings = {
        "command": "features",
        "dtype": str(media.dtype),
        "features_sha256": media.sha256(),
    }
    return _write_one(args, entries, media, settings)


def run_karpathy(args: argparse.Namespace) -> int:
    """``karpathy``: one output subdirectory per split."""
    data = load_karpathy(args.captions, args.images, keep_restval=args.keep_restval)
    wanted = list(data.splits)
    if args.splits:
        wanted = [s.strip() for s in args.splits.split(",") if s.strip()]
        for split in wanted:
            if split not in SPLITS:
                raise ShardError(f"--splits: unknown split {split!r} (one of {', '.join(SPLITS)})")
            if split not in data.splits:
                raise ShardError(f"--splits: {args.captions} has no images in split {split!r}")
    base = args.prefix or default_prefix(data.dataset or args.out.absolute().name)
    summaries: list[ShardSummary] = []
    for split in wanted:
        entries = limit_entries(data.splits[split], args.limit)
        if args.captions_per_image:
            # The retrieval protocol ranks 5 captions per image; a few COCO images have 6 or 7.
            n = args.captions_per_image
            entries = [replace(e, captions=e.captions[:n]) for e in entries]
        layout = args.layout or DEFAULT_LAYOUT[split]
        options = _options(args, args.out / split, f"{base}-{split}")
        settings = _with_outside(args, {"command": "karpathy", "split": split})
        summary = write_entries(entries, _image_files(args), layout, options, settings)
        _print_summary(summary)
        summaries.append(summary)
    write_json_atomic(
        args.out / SUMMARY_FILE,
        {"splits": {s.settings["split"]: s.to_json() for s in summaries}},
    )
    if sum(s.samples for s in summaries) == 0:
        raise _nothing_written(summaries, args.images)
    return 0


def run_index(args: argparse.Namespace) -> int:
    """``index``: sizes.json for existing shards."""
    for directory, sizes in index_shards(args.shards, progress=not args.quiet).items():
        print(f"{directory / 'sizes.json'}: {len(sizes)} shards, {sum(sizes.values())} samples")
    return 0


EXAMPLES = """\
Run `%(prog)s COMMAND --help` for the options of a command.

examples:
  %(prog)s karpathy --captions dataset_coco.json --images coco/ --out data/coco \\
      --captions-per-image 5                       train/ val/ test/ of the Karpathy split
  %(prog)s folder --captions captions.tsv --out data/mine
  %(prog)s index 'data/laion/{00000..00099}.tar'

Rerunning an interrupted command resumes it; --overwrite starts over.
exit status: 0 done; 2 an input is missing or unparseable, or nothing was written (one
`error:` line says which); 130 interrupted (finished shards are kept)."""


def build_parser(prog: str = "python -m fne_dist.shards") -> argparse.ArgumentParser:
    """The argparse parser of all subcommands."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Turn image-text data into WebDataset shards (a sample per image-caption\n"
        "pair, or per image with all its captions), with the sizes.json the loader reads.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str, **kwargs: Any) -> argparse.ArgumentParser:
        """A subcommand whose --help opens with its line of the command list."""
        return sub.add_parser(name, help=text, description=f"{prog} {name}: {text}.", **kwargs)

    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("output")
    group.add_argument("--out", type=Path, required=True, help="output directory")
    group.add_argument(
        "--prefix",
        help="shard and sample key prefix (default: the --out directory name; "
        "karpathy: the dataset name, plus -SPLIT)",
    )
    group.add_argument(
        "--shard-size", type=_positive_int, default=1000, help="samples per shard (default 1000)"
    )
    group.add_argument("--gzip", action="store_true", help="write .tar.gz shards")
    group.add_argument(
        "--layout",
        choices=LAYOUTS,
        help="pair: a sample per image-caption pair (default; karpathy train/restval); "
        "image: a sample per image with all its captions (default for karpathy val/test)",
    )
    group.add_argument(
        "--overwrite", action="store_true", help="delete earlier output instead of resuming"
    )
    group.add_argument(
        "--limit", type=_positive_int, help="use the first N images only (per split for karpathy)"
    )
    group.add_argument("--quiet", action="store_true", help="no progress bar")

    def images_option(p: argparse.ArgumentParser, required: bool = True) -> None:
        p.add_argument(
            "--images",
            type=Path,
            required=required,
            help="image directory the paths are relative to"
            + ("" if required else " (default: the captions file's directory)"),
        )
        p.add_argument(
            "--allow-outside-images",
            action="store_true",
            help="copy images whose path leaves --images ('../', absolute paths); refused by "
            "default, since an untrusted annotation file could name any file of this machine",
        )

    p = command("folder", "image folder + captions CSV/TSV or JSON Lines", parents=[common])
    p.add_argument("--captions", type=Path, required=True, help="captions .csv/.tsv/.jsonl")
    images_option(p, required=False)
    p.add_argument("--image-column", default="filepath", help="image path column/key")
    p.add_argument("--caption-column", default="caption", help="caption column/key")
    p.add_argument("--group-column", help="group/class label column/key (optional)")
    p.add_argument("--format", choices=("csv", "jsonl"), help="default: by file suffix")
    p.add_argument("--delimiter", help="CSV delimiter (default: tab for .tsv, else comma)")
    p.set_defaults(run=run_folder)

    p = command("coco", "COCO captions JSON + images", parents=[common])
    p.add_argument("--captions", type=Path, required=True, help="captions_*.json")
    images_option(p)
    p.set_defaults(run=run_coco)

    p = command("karpathy", "Karpathy split JSON + images → train/ val/ test/", parents=[common])
    p.add_argument("--captions", type=Path, required=True, help="dataset_*.json")
    images_option(p)
    p.add_argument(
        "--keep-restval",
        action="store_true",
        help="write restval/ instead of merging it into train/",
    )
    p.add_argument("--splits", help="comma-separated splits to write (default: all in the file)")
    p.add_argument(
        "--captions-per-image",
        type=_positive_int,
        default=None,
        metavar="N",
        help="keep the first N captions of each image (5: the COCO/Flickr30K protocol; "
        "default: all)",
    )
    p.set_defaults(run=run_karpathy)

    p = command("albef", "ALBEF/FNE annotation list + images", parents=[common])
    p.add_argument("--captions", type=Path, required=True, help="the annotation .json list")
    images_option(p)
    p.set_defaults(run=run_albef)

    p = command("features", "precomputed features (.npy) + captions", parents=[common])
    p.add_argument("--features", type=Path, required=True, help="N×D float .npy matrix")
    p.add_argument(
        "--captions",
        type=Path,
        required=True,
        help="rows with index and/or image_id, caption, optional caption_id and group",
    )
    p.add_argument("--caption-column", default="caption", help="caption column/key")
    p.add_argument("--group-column", help="group/class label column/key (optional)")
    p.add_argument("--format", choices=("csv", "jsonl"), help="default: by file suffix")
    p.add_argument(
        "--dtype",
        choices=("float16", "float32"),
        help="stored dtype (default: float16 stays, other floats become float32)",
    )
    p.set_defaults(run=run_features)

    p = command("index", "(re)build sizes.json for existing shards")
    p.add_argument("shards", help="a directory, or a glob/brace pattern of .tar/.tar.gz files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_index)
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "python -m fne_dist.shards") -> int:
    """Command-line entry point; returns the exit status."""
    args = build_parser(prog).parse_args(argv)
    try:
        return int(args.run(args))
    except ShardError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted: finished shards are kept, rerun the same command to resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())

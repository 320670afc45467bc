"""Index a folder of images with an exported model and query it by text.

    python -m fne_dist.export runs/coco-fne exported/          # once, on the training machine
    python examples/search_images.py exported/ photos/ "a dog on a beach" "two people eating"

Every image under the folder (jpg, jpeg, png, webp; subfolders included) is embedded once; each
query prints its best matches, best first, with their cosine similarity. The export carries its
own backbones, tokenizer and preprocessing, so this runs on a machine with no model cache and
no network.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from fne_dist.api import Retriever, top_k

SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


def image_files(folder: Path) -> list[Path]:
    """The folder's pictures in a stable order."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)


def embed_folder(retriever: Retriever, folder: Path, batch: int) -> tuple[list[str], torch.Tensor]:
    """(relative paths, N×D embeddings) of the folder's readable pictures, batch by batch so a
    large folder never holds more than ``batch`` decoded images."""
    names, parts = [], []
    files = image_files(folder)
    for start in range(0, len(files), batch):
        images = []
        for path in files[start : start + batch]:
            try:
                with Image.open(path) as img:
                    img.load()
                    images.append(img.copy())
            except (OSError, UnidentifiedImageError):
                print(f"skipped (not a readable image): {path}", file=sys.stderr)
                continue
            names.append(path.relative_to(folder).as_posix())
        if images:
            parts.append(retriever.encode_images(images))
    return names, torch.cat(parts) if parts else torch.zeros(0, retriever.model.embed_dim)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export", type=Path, help="a directory written by python -m fne_dist.export")
    ap.add_argument("images", type=Path, help="a folder of images to index")
    ap.add_argument("queries", nargs="+", help="text queries")
    ap.add_argument("--top", type=int, default=5, help="matches per query (default 5)")
    ap.add_argument("--batch", type=int, default=64, help="images embedded at once")
    args = ap.parse_args(argv)
    if not args.images.is_dir():
        print(f"error: {args.images} is not a directory", file=sys.stderr)
        return 2
    try:
        retriever = Retriever.from_pretrained(args.export)
    except ValueError as err:  # a missing or incomplete export: one line, not a traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    names, embeddings = embed_folder(retriever, args.images, args.batch)
    if not names:
        print(f"error: no readable images under {args.images}", file=sys.stderr)
        return 2
    print(f"indexed {len(names)} images from {args.images}")
    scores, index = top_k(retriever.encode_texts(args.queries), embeddings, args.top)
    for query, row_scores, row_index in zip(args.queries, scores, index, strict=True):
        print(f"query: {query}")
        pairs = zip(row_scores.tolist(), row_index.tolist(), strict=True)
        for rank, (score, i) in enumerate(pairs, 1):
            print(f"  {rank}. {score:.4f}  {names[i]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training-loader throughput against a bare read+decode loop over the same shards.

    python bench/loader.py [--repeats 3] [--batch 32]

For each shard set (the raw emoji train shards: WebP decoded and preprocessed to 128 px; and
the frozen-tower feature shards of the default run, if cached) it measures, interleaved and
repeated (the machine is shared and noisy; medians are printed):

* bare: a plain loop that reads the tars (``tarfile``) and decodes every member (PIL
  ``load()``, UTF-8, ``json.loads``, ``np.load``) in this process: the floor of the work;
* stream-wN: ``TrainStream`` with N DataLoader workers (0 = in the training process), one
  epoch of full batches as the training process receives them, including the training
  transform (raw shards: preprocessing + MiniLM tokenisation, work that bare does not do);

and prints samples/s (for the stream: after its first batch), the ratio to bare (the goal is
≥ 0.8) and the time to the first batch (worker start-up, shard open, buffer fill).
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import statistics
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fne_dist.config import load_config
from fne_dist.data import StreamOptions, TrainStream, shard_list
from fne_dist.data.batching import PairCollate, PairTransform
from fne_dist.data.decode import open_raster
from fne_dist.data.sources import split_member_name
from fne_dist.encoders import SquareImage, build_text_backbone


def bare(urls: list[str]) -> tuple[float, int]:
    """Read and decode every member; returns (seconds, samples)."""
    t0 = time.perf_counter()
    n, last = 0, None
    for url in urls:
        with tarfile.open(url, "r|*") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                key, ext = split_member_name(info.name)
                data = tar.extractfile(info).read()
                if key != last:
                    n, last = n + 1, key
                if ext in ("webp", "png", "jpg"):
                    open_raster(data).load()  # as the loader opens them: no probing
                elif ext.endswith("npy"):
                    np.load(io.BytesIO(data), allow_pickle=False)
                elif ext == "json":
                    json.loads(data.decode())
                else:
                    data.decode()
    return time.perf_counter() - t0, n


def stream(
    urls: list[str], workers: int, batch: int, image_size: int, tokenize
) -> tuple[float, float, int]:
    """One epoch through TrainStream (with the training transform: preprocessing to
    ``image_size`` and tokenisation, more work than bare); returns (seconds, seconds to the
    first batch, samples)."""
    opts = StreamOptions(batch=batch, seed=0, workers=workers)
    spec = "::".join(urls)
    features = urls[0].endswith(".tar") and "feat-" in urls[0]
    transform = PairTransform(None if features else SquareImage(image_size))
    collate = PairCollate(None if features else tokenize)
    s = TrainStream(shard_list(spec, "bench"), opts, transform, collate)
    t0 = time.perf_counter()
    first, n = None, 0
    for b, _ in s.epoch(0):
        first = first if first is not None else time.perf_counter() - t0
        n += int(b["ids"].shape[0])
    # throughput after the first batch (worker start-up is reported as the first-batch time)
    return time.perf_counter() - t0 - (first or 0.0), first or 0.0, n - batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", default="0,1,2")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config("configs/default.yaml")
    tokenize = build_text_backbone(cfg.model.text).tokenize
    sets = {"raw emoji webp (128 px)": sorted(glob.glob("shards/emoji/emoji-train-*.tar.gz"))}
    cached = sorted(glob.glob(".cache/features/train-*/feat-*.tar"))
    if cached:
        sets["frozen-tower feature shards"] = cached[: len(sets["raw emoji webp (128 px)"])]
    workers = [int(w) for w in args.workers.split(",")]
    print(f"torch threads 1, batch {args.batch}, {args.repeats} repeats (medians)")
    for name, urls in sets.items():
        times: dict[str, list[float]] = {"bare": []}
        firsts: dict[str, list[float]] = {}
        n_samples = {}
        for _ in range(args.repeats):
            dt, n = bare(urls)
            times["bare"].append(n / dt)
            n_samples["bare"] = n
            for w in workers:
                dt, first, n = stream(urls, w, args.batch, cfg.model.image.image_size, tokenize)
                times.setdefault(f"stream-w{w}", []).append(n / dt)
                firsts.setdefault(f"stream-w{w}", []).append(first)
                n_samples[f"stream-w{w}"] = n
        base = statistics.median(times["bare"])
        print(f"\n{name}: {len(urls)} shards, {n_samples['bare']} samples")
        print(f"  {'loop':12s} {'samples/s':>10s} {'÷ bare':>7s} {'first batch':>12s}")
        print(f"  {'bare':12s} {base:10.0f} {1.0:7.2f} {'':>12s}")
        for w in workers:
            key = f"stream-w{w}"
            rate = statistics.median(times[key])
            first = statistics.median(firsts[key])
            print(f"  {key:12s} {rate:10.0f} {rate / base:7.2f} {first * 1000:10.0f} ms")


if __name__ == "__main__":
    main()

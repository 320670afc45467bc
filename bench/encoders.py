"""Encoder throughput: EfficientNet-Lite0 at several sizes and MiniLM, forward vs fwd+bwd.

    python bench/encoders.py [--sizes 96 128 160 224 --batch 32 --max-length 32 --repeats 5
                              --threads 2]

Forward-only is what a frozen backbone costs (eval mode, ``torch.inference_mode``, i.e. what
feature caching pays once); fwd+bwd is what fine-tuning costs per step (train mode, batch-norm
updating, backward of a scalar of the features into every parameter). All configurations run
interleaved in one process (this machine is shared and noisy) and medians are printed side by
side, with the time one pass over the emoji training split would take at that rate.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from fne_dist.config import ImageEncoderConfig, TextEncoderConfig
from fne_dist.encoders import build_image_backbone, build_text_backbone

SIZES = Path(__file__).resolve().parents[1] / "shards" / "emoji" / "sizes.json"


def train_split_size() -> int:
    """Images in the emoji training shards (for the seconds-per-epoch column)."""
    sizes = json.loads(SIZES.read_text())
    return sum(n for name, n in sizes.items() if "-train-" in name)


def forward_only(net: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[[], float]:
    """A timed call of the frozen-backbone cost: eval mode, no autograd."""

    def run() -> float:
        net.eval()
        t0 = time.perf_counter()
        with torch.inference_mode():
            net(*inputs)
        return time.perf_counter() - t0

    return run


def forward_backward(net: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[[], float]:
    """A timed call of the fine-tuning cost: train mode, backward into every parameter."""

    def run() -> float:
        net.train()
        t0 = time.perf_counter()
        net(*inputs).square().mean().backward()
        elapsed = time.perf_counter() - t0
        net.zero_grad(set_to_none=True)
        return elapsed

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[96, 128, 160, 224])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    B = args.batch
    gen = torch.Generator().manual_seed(0)

    # One trainable copy per model: forward-only runs it in eval + inference mode, which costs
    # the same as a frozen copy.
    runs: dict[tuple[str, str], Callable[[], float]] = {}
    units: dict[str, str] = {}
    for size in args.sizes:
        net = build_image_backbone(
            ImageEncoderConfig(
                type="efficientnet_lite",
                name_or_path="efficientnet-lite0",
                image_size=size,
                frozen=False,
            )
        )
        px_BCHW = torch.randint(0, 256, (B, 3, size, size), dtype=torch.uint8, generator=gen)
        # channels_last: only the module is converted; the loader's uint8 batch stays NCHW.
        variants = {"": net, " CL": copy.deepcopy(net).to(memory_format=torch.channels_last)}
        for suffix, variant in variants.items():
            name = f"efficientnet-lite0 {size}px{suffix}"
            runs[(name, "fwd")] = forward_only(variant, (px_BCHW,))
            runs[(name, "fwd+bwd")] = forward_backward(variant, (px_BCHW,))
            units[name] = "img/s"
    text = build_text_backbone(
        TextEncoderConfig(
            type="hf", name_or_path="all-MiniLM-L6-v2", max_length=args.max_length, frozen=False
        )
    )
    phrase = "a grinning face with big eyes on a red heart next to the smiling cat"
    words = phrase.split(" ")
    # Captions of 3..14 words; the batch is padded to max_length, so the cost is length-fixed.
    captions = [" ".join(words[: 3 + i % 12]) for i in range(B)]
    tok = text.tokenize(captions)
    name = f"all-MiniLM-L6-v2 L={args.max_length}"
    runs[(name, "fwd")] = forward_only(text, (tok["input_ids"], tok["attention_mask"]))
    runs[(name, "fwd+bwd")] = forward_backward(text, (tok["input_ids"], tok["attention_mask"]))
    units[name] = "cap/s"

    t0 = time.perf_counter()
    for run in runs.values():  # warm-up: one-off allocations and kernel selection
        run()
    print(f"warm-up: {time.perf_counter() - t0:.1f} s")
    times: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    for _ in range(args.repeats):
        for key, run in runs.items():
            times[key].append(run())

    n_train = train_split_size()
    print(
        f"B={B} threads={args.threads} repeats={args.repeats} (medians); "
        f"epoch = one pass over the {n_train} training images/captions"
    )
    header = (
        f"{'model':28s} {'fwd':>9s} {'fwd+bwd':>9s} {'unit':>6s} {'bwd cost':>9s}"
        f" {'epoch fwd':>10s} {'epoch f+b':>10s}"
    )
    print(header)
    print("-" * len(header))
    for name, unit in units.items():
        fwd = B / statistics.median(times[(name, "fwd")])
        fb = B / statistics.median(times[(name, "fwd+bwd")])
        print(
            f"{name:28s} {fwd:9.1f} {fb:9.1f} {unit:>6s} {fwd / fb:8.2f}x"
            f" {n_train / fwd:9.1f}s {n_train / fb:9.1f}s"
        )


if __name__ == "__main__":
    main()

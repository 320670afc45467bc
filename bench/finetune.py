"""Fine-tuning choices: which blocks of EfficientNet-Lite0 and MiniLM train, at which image size,
with or without channels_last and gradient checkpointing (configs/finetune.yaml's choices).

    python bench/finetune.py [--batch 16 --repeats 5 --threads 2 --sizes 96 128]

Each variant is one training micro step of both towers as the loop runs it: the online
forward, the momentum forward (no gradient) and the backward of a scalar of both towers'
features into every trained parameter. All variants run interleaved in one process (this
machine is shared and noisy) and the medians are printed side by side, with the activation
memory autograd keeps for backward (the bytes of every tensor saved for backward, counted by a
``saved_tensors_hooks`` pair: what gradient checkpointing trades compute for) and the trained
parameter count.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from fne_dist.config import ImageEncoderConfig, TextEncoderConfig
from fne_dist.encoders import build_image_backbone, build_text_backbone


@dataclass(frozen=True)
class Variant:
    image_size: int
    image_blocks: int | None  # None: all 16 MBConv blocks
    text_blocks: int | None  # None: all 6 layers
    checkpointing: bool = False
    channels_last: bool = True

    def label(self) -> str:
        img = "all" if self.image_blocks is None else f"last {self.image_blocks}"
        txt = "all" if self.text_blocks is None else f"last {self.text_blocks}"
        flags = ("ckpt " if self.checkpointing else "") + ("CL" if self.channels_last else "NCHW")
        return f"{self.image_size:>4} px | img {img:>7} | txt {txt:>6} | {flags}"


class Towers(nn.Module):
    def __init__(self, v: Variant, max_length: int) -> None:
        super().__init__()
        self.image = build_image_backbone(
            ImageEncoderConfig(
                type="efficientnet_lite",
                name_or_path="efficientnet-lite0",
                image_size=v.image_size,
                train_blocks=v.image_blocks,
                channels_last=v.channels_last,
                grad_checkpointing=v.checkpointing,
            )
        )
        self.text = build_text_backbone(
            TextEncoderConfig(
                name_or_path="all-MiniLM-L6-v2",
                max_length=max_length,
                train_blocks=v.text_blocks,
                grad_checkpointing=v.checkpointing,
            )
        )

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.image(pixels).square().mean() + self.text(ids, mask).square().mean()


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward during ``fn()``."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", type=int, nargs="+", default=[96, 128])
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    variants = []
    low, top = min(args.sizes), max(args.sizes)
    variants += [Variant(low, None, None)]  # everything trained: the most a step can cost
    variants += [Variant(size, 4, 2) for size in args.sizes]
    variants += [Variant(top, 4, 2, channels_last=False), Variant(top, 4, 2, checkpointing=True)]
    runs = []
    for v in variants:
        online = Towers(v, args.max_length)
        momentum = copy.deepcopy(online).requires_grad_(False)
        pixels = torch.randint(
            0, 256, (args.batch, 3, v.image_size, v.image_size), dtype=torch.uint8
        )
        ids = torch.randint(1000, 20000, (args.batch, args.max_length))
        mask = torch.ones_like(ids)

        def step(online=online, momentum=momentum, inputs=(pixels, ids, mask)) -> None:
            online(*inputs).backward()
            with torch.no_grad():
                momentum(*inputs)
            online.zero_grad(set_to_none=True)

        step()  # warm-up (oneDNN primitive caches)
        mb = saved_bytes(lambda o=online, i=(pixels, ids, mask): o(*i)) / 2**20
        trained = sum(p.numel() for p in online.parameters() if p.requires_grad)
        runs.append((v, step, mb, trained, []))
        print(f"built {v.label()}: {mb:.0f} MB saved for backward", flush=True)
    for _ in range(args.repeats):  # interleaved: every variant sees the same machine load
        for _v, step, _mb, _n, times in runs:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    base = statistics.median(runs[0][4])
    print(
        f"batch {args.batch}, {args.max_length} tokens, {args.threads} threads, "
        f"median of {args.repeats}"
    )
    print(
        f"{'variant':<52} {'step ms':>8} {'× first':>8} {'samples/s':>9} "
        f"{'saved MB':>9} {'trained':>8}"
    )
    for v, _s, mb, n, times in runs:
        med = statistics.median(times)
        print(
            f"{v.label():<52} {med * 1e3:>8.0f} {med / base:>8.2f} "
            f"{args.batch / med:>9.1f} {mb:>9.0f} {n / 1e6:>7.1f}M"
        )


if __name__ == "__main__":
    main()

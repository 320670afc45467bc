"""What FNE, the memory and the gather add to a fine-tuning step, side by side.

    python bench/overhead.py [--batch 32 --memory 1024 16384 --repeats 3 --threads 2]
                             [--random-init] [--device cuda --bf16]

One process, the fine-tuning model (EfficientNet-Lite0 + MiniLM-L6, both towers trained, MLP
heads; ``bench/finetune_model.py``), the same synthetic batches for every variant, one AdamW
step per step. The variants run interleaved (variant 1, 2, ..., 1, 2, ...: the machine is
shared and noisy) and each reports the median of ``--repeats`` steps:

- ``vse_pp in-batch``: online forward, in-batch VSE++, backward + step (no momentum encoder, no
  memory, no gather): the encoders' own cost;
- ``fne paper K=…`` / ``fne default K=…``: the loop's step (``fne_dist.step.forward_step``:
  online + momentum forward, gather, statistics, FNE over [gathered batch ; memory]), backward
  + step, EMA, enqueue, with the paper's posterior and the default run's (image-image mixture).
  With ``--train-blocks`` (configs/finetune.yaml's 4 and 2 by default) the frozen early layers
  run once for both encoders, as in the loop (``fne_dist.shared_prefix``);
- ``… unshared``: the same step with the momentum model run in full (the loop before the shared
  prefix), for the first K;
- ``dflt K=… online``: ``memory.encoder: online``, the memory fed from the online model's
  detached embeddings (XBM-style cross-batch memory: no momentum forward, no EMA), at every K
  (docs/benchmarks.md: its cost and its quality against the momentum memory).

At world size 1 the gather is an identity; ``bench/distributed.py`` measures the collectives.
The memory is filled with random unit vectors before timing, so every step's FNE sees K
candidates. The overhead column is the step ÷ the in-batch step; "FNE part" is the same
without the momentum forward and EMA, i.e. what FNE costs beyond keeping a momentum encoder.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from dataclasses import dataclass, field

import torch
from finetune_model import caption_lengths, finetune_model, synthetic_batch  # bench/ on sys.path

from fne_dist.encoders import trim_padding
from fne_dist.fne import Anchors, Candidates, FneConfig, SimilarityStats, retrieval_loss
from fne_dist.memory import MomentumMemory
from fne_dist.momentum import ema_update, make_momentum_copy
from fne_dist.shared_prefix import SharedPrefix
from fne_dist.step import StepPosition, forward_step
from fne_dist.timing import PhaseTimer

PHASES = (
    "online_forward",
    "momentum_forward",
    "gather",
    "reduce",
    "posterior_fit",
    "fne_loss",
    "backward_step",
    "ema",
    "enqueue",
    "other",
)
DEFAULT_FNE = {  # configs/default.yaml's fne section
    "posterior": "intra_mixture",
    "stats_source": "all_pairs",
    "fallback": "unflagged",
    "eps": 0.5,
    "tau_fn": 4.0,
}


class CpuPhaseTimer(PhaseTimer):
    """Per phase, the process's CPU seconds (all threads) instead of wall seconds: on a shared
    machine the wall clock mostly measures the other processes, CPU time much less so."""

    @contextlib.contextmanager
    def phase(self, name: str):
        start = time.process_time()
        try:
            yield
        finally:
            self.seconds[name] += time.process_time() - start


@dataclass
class Variant:
    name: str
    cfg: FneConfig
    memory: MomentumMemory | None
    stats: SimilarityStats = field(default_factory=SimilarityStats)
    steps: list[dict[str, float]] = field(default_factory=list)
    encoders: str = "shared"  # shared (the loop's), unshared, online (no momentum encoder)
    pad: int = 8  # model.text.pad_multiple: 0 every batch 32 tokens, else trimmed (encoders.py)
    base: str = ""  # the in-batch variant of the same padding, the ratios' denominator


class OnlineAsMomentum:
    """An XBM-style memory: the "momentum" embeddings are the online ones, detached."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.last = model, None

    def online(self, batch):
        self.last = self.model(batch)
        return self.last

    def momentum(self, _batch):
        return tuple(t.detach() for t in self.last)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--memory", type=int, nargs="+", default=[1024, 16384])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--random-init", action="store_true", help="no pretrained weights needed")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="autocast the towers to bfloat16")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument(
        "--train-blocks", type=int, nargs=2, default=[4, 2], metavar=("IMAGE", "TEXT"),
        help="last blocks trained per tower (configs/finetune.yaml's); -1 -1: whole towers",
    )  # fmt: skip
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="time the process's CPU seconds, not wall seconds (a loaded machine; CPU only)",
    )
    ap.add_argument(
        "--groups",
        type=int,
        default=0,
        help="label each pair with group id %% GROUPS (emoji-like data: FN detection is then "
        "measured every step); 0: no labels (Flickr/COCO-like, detection skipped on the CPU)",
    )
    ap.add_argument(
        "--captions",
        choices=("emoji", "uniform"),
        default="emoji",
        help="caption lengths: the emoji captions' token counts (mean 4.5) or uniform 8..32",
    )
    ap.add_argument(
        "--pad-multiple",
        type=int,
        nargs="+",
        default=[8],
        help="model.text.pad_multiple per variant group: 0 pads every caption to 32 tokens "
        "(the loop before the setting), k trims each batch to its longest caption rounded up "
        "to k; several values run every variant for each, interleaved",
    )
    args = ap.parse_args()
    print("load average at the start {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    blocks = tuple(None if n < 0 else n for n in args.train_blocks)
    model, note = finetune_model(not args.random_init, args.image_size, train_blocks=blocks)
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    momentum = make_momentum_copy(model)
    opt = torch.optim.AdamW((p for p in model.parameters() if p.requires_grad), lr=2e-5)
    variants = []
    for pad in args.pad_multiple:
        suffix = "" if len(args.pad_multiple) == 1 else f" p{pad or 32}"
        variants += make_variants(args, model, momentum, device, pad, suffix)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
    )
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(
        f"{note}; {params / 1e6:.1f}M trained parameters; batch {args.batch}, "
        f"{args.image_size} px, device {device}{', bf16 autocast' if args.bf16 else ''}, "
        f"threads {args.threads}, median of {args.repeats} interleaved steps "
        f"after {args.warmup} untimed; {'CPU' if args.cpu_time else 'wall'} time; "
        + (f"group labels id % {args.groups}" if args.groups else "no group labels")
        + f"; {args.captions} caption lengths; p32: padded to 32 tokens, p8: to the batch's "
        "longest caption rounded up to 8"
    )
    step = 0
    for r in range(args.warmup + args.repeats):
        lengths_B = caption_lengths(args.batch, 10**6 + r, args.captions)  # same in a round
        for v in variants:
            batch = synthetic_batch(args.batch, step, device, args.image_size, lengths_B=lengths_B)
            if v.pad:
                ids, mask = trim_padding(batch["input_ids"], batch["attention_mask"], v.pad)
                batch.update(input_ids=ids, attention_mask=mask)
            if args.groups:
                batch["groups"] = batch["ids"] % args.groups
            if args.channels_last:
                batch["pixels"] = batch["pixels"].contiguous(memory_format=torch.channels_last)
            timer = CpuPhaseTimer(device) if args.cpu_time else PhaseTimer(device)
            times = one_step(v, (model, momentum, opt, timer), batch, step, autocast, device)
            step += 1
            if r >= args.warmup:
                v.steps.append(times)
    report(variants)
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def make_variants(args, model, momentum, device, pad: int, suffix: str) -> list[Variant]:
    """The in-batch baseline and every FNE variant at caption padding ``pad``."""
    dim = model.embed_dim
    base = "vse_pp in-batch" + suffix
    variants = [Variant(base, FneConfig(loss="vse_pp"), None, pad=pad, base=base)]
    for k in args.memory:
        for label, extra in (("paper", {}), ("default", DEFAULT_FNE)):
            cfg = FneConfig(gate_size=args.batch, **extra)
            memory = filled_memory(k, dim, device, args.groups)
            variants.append(Variant(f"fne {label} K={k}{suffix}", cfg, memory, pad=pad, base=base))
    k0, cfg0 = args.memory[0], FneConfig(gate_size=args.batch, **DEFAULT_FNE)
    if SharedPrefix(model, model, momentum).active:
        memory = filled_memory(k0, dim, device, args.groups)
        name = f"dflt K={k0} unshared{suffix}"
        variants.append(Variant(name, cfg0, memory, encoders="unshared", pad=pad, base=base))
    for k in args.memory:  # memory.encoder: online at every K (the ≤ 5 % candidate)
        v_cfg = FneConfig(gate_size=args.batch, **DEFAULT_FNE)
        memory = filled_memory(k, dim, device, args.groups)
        name = f"dflt K={k} online{suffix}"
        variants.append(Variant(name, v_cfg, memory, encoders="online", pad=pad, base=base))
    return variants


def filled_memory(k: int, dim: int, device: torch.device, groups: int = 0) -> MomentumMemory:
    memory = MomentumMemory(k, dim, seed=1, device=device)
    g = torch.Generator().manual_seed(2)
    rows = torch.nn.functional.normalize(torch.randn(2, k, dim, generator=g), dim=2).to(device)
    ids = 10**9 + torch.arange(k, device=device)
    memory.enqueue(rows[0], rows[1], ids, ids % groups if groups else None)
    return memory


def one_step(v: Variant, parts, batch, step: int, autocast, device) -> dict[str, float]:
    """One training step of variant ``v``: its phases in seconds (the sum is the step)."""
    model, momentum, opt, timer = parts
    clock = time.process_time if isinstance(timer, CpuPhaseTimer) else time.perf_counter
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = clock()
    if v.memory is None:  # in-batch VSE++: the towers, the loss, backward, step
        with timer.phase("online_forward"), autocast:
            img, txt, _ = model(batch)
        ids, b = batch["ids"], batch["ids"].shape[0]
        with timer.phase("fne_loss"):
            arange = torch.arange(b, device=device)
            loss = retrieval_loss(
                Anchors(img, txt, ids, arange, batch["groups"]),
                Candidates(img, txt, ids, b, batch["groups"]),
                v.cfg,
            ).loss
    else:
        if v.encoders == "shared":
            pair = SharedPrefix(model, model, momentum)
            encoders = (pair.online, pair.momentum)
        elif v.encoders == "online":
            pair = OnlineAsMomentum(model)
            encoders = (pair.online, pair.momentum)
        else:
            encoders = (model, momentum)
        with autocast:
            at = StepPosition(0, step, False)
            out = forward_step(*encoders, batch, v.memory, v.stats, v.cfg, at, timer)
        loss = out.loss
    with timer.phase("backward_step"):
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if v.memory is not None:
        if v.encoders != "online":
            with timer.phase("ema"):
                ema_update(momentum, model, 0.995)
        with timer.phase("enqueue"):
            v.stats.add_step(out.stat_sums, v.cfg.mixture_decay)
            g = out.gathered
            v.memory.enqueue(g.img_ND, g.txt_ND, g.ids_N, g.groups_N)
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = timer.totals()
    # what no phase covers: the statistics' sums and the Gaussians' fit between gather and loss
    times["other"] = clock() - t0 - sum(times.values())
    return times


def report(variants: list[Variant]) -> None:
    """Medians per phase; every ratio is over the in-batch step of the same caption padding
    (and, with several paddings, the step over the first padding's in-batch step too)."""
    med = {
        v.name: {p: statistics.median(s.get(p, 0.0) for s in v.steps) for p in PHASES}
        for v in variants
    }
    total = {v.name: statistics.median(sum(s.values()) for s in v.steps) for v in variants}
    base = {v.name: total[v.base] for v in variants}
    w = max(21, *(len(v.name) + 1 for v in variants))

    def row(label: str, values: dict[str, float], fmt: str, unit: str = "") -> None:
        cells = "".join(f"{format(values[v.name], fmt) + unit:>{w}s}" for v in variants)
        print(f"{label:20s}" + cells)

    print(f"{'ms per step':20s}" + "".join(f"{v.name:>{w}s}" for v in variants))
    for p in PHASES:
        if any(med[v.name][p] for v in variants):
            row(p, {n: 1e3 * med[n][p] for n in med}, ".1f")
    row("step (median)", {n: 1e3 * total[n] for n in total}, ".1f")
    row("÷ in-batch", {n: total[n] / base[n] for n in total}, ".3f", "x")
    if len({v.base for v in variants}) > 1:
        first = total[variants[0].name]
        row("÷ 1st in-batch", {n: total[n] / first for n in total}, ".3f", "x")
    fne_part = {  # the step without the momentum encoder's forward and EMA
        v.name: statistics.median(
            sum(s.values()) - s.get("momentum_forward", 0.0) - s.get("ema", 0.0) for s in v.steps
        )
        for v in variants
    }
    row("FNE part ÷ in-b.", {n: fne_part[n] / base[n] for n in total}, ".3f", "x")
    # what FNE itself adds: its phases (the in-batch loss subtracted) over the in-batch step,
    # each phase's median on its own: robust to a slow step elsewhere
    fne_only = ("gather", "reduce", "posterior_fit", "fne_loss", "enqueue", "other")
    added = {
        v.name: sum(med[v.name][p] for p in fne_only) - med[v.base]["fne_loss"] for v in variants
    }
    row("FNE phases ÷ in-b.", {n: 100 * added[n] / base[n] for n in total}, ".1f", "%")
    mom = {n: med[n]["momentum_forward"] + med[n]["ema"] for n in total}
    row("momentum enc ÷ in-b.", {n: 100 * mom[n] / base[n] for n in total}, ".1f", "%")


if __name__ == "__main__":
    main()

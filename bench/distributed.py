"""Distributed step profile: where a step's time goes, and what each launcher costs.

    python bench/distributed.py [--epochs 2] [--config configs/default.yaml]
    python bench/distributed.py --scaling [--finetune] [--epochs 0.2] [--repeats 3] [--ddp]
        [--zero] [--no-1x2] [--baseline CHECKOUT [--baseline-2x1-only]] [--only LABEL,...]

Runs, one after the other in this process's lifetime (this machine is shared and noisy, so
compare within one run): 1 rank and 2 ranks under torchrun (DeepSpeed engine), 2 Ray Train
workers (DeepSpeed), and 2 ranks under torchrun with plain torch DDP. Each run times every phase
of the step (``train.profile_phases``) and reports samples/s of the training loop; the table
prints ms per step per phase, the fraction of the step spent in our collectives (gather +
reduce; DeepSpeed's gradient all-reduce is inside backward_step), and the ratios.

``--scaling``: does a second rank pay on this machine's cores? Same global batch (32), under
torchrun, interleaved ``--repeats`` times (medians): 2 ranks × 1 thread, 1 rank × 2 threads,
1 rank × 1 thread. ``--finetune`` trains both towers (EfficientNet-Lite0 + MiniLM from the raw
shards, ``model.*.frozen=false``), where a step is the encoders' work rather than the heads'.
``--ddp`` adds 2 ranks × 1 thread under torch DDP (the gradient all-reduce in buckets during
backward) beside DeepSpeed's ZeRO-0 (one reduction after backward); ``--zero`` adds 2 ranks ×
1 thread at ZeRO-1 and ZeRO-2, each with DeepSpeed's ``overlap_comm`` on and off (passed through
``engine.deepspeed_config``; the plain rows are ZeRO-0, where DeepSpeed has no overlap);
``--no-1x2`` leaves out 1 rank × 2 threads; ``--baseline`` adds another checkout's 2 × 1, 1 × 2
and 1 × 1 runs (before/after a change, interleaved with this tree's; ``--baseline-2x1-only``: its
2 × 1 alone, for a change a single rank never reaches); ``--only`` keeps the layouts named
(their labels, comma-separated, in the order given). ``--zero-bucket N`` adds
ZeRO-1/2 with ``overlap_comm`` and DeepSpeed's reduce and all-gather buckets of N elements
(its default, 5e8, holds all of the fine-tuning model's gradients in one bucket: nothing is
reduced before backward ends).

The table splits ``backward_step`` into its parts (``PhaseTimer.part``): autograd's backward
(with what DeepSpeed reduces in its hooks: ZeRO-2, ZeRO-1 with ``overlap_comm``, DDP's
buckets), ``grad_reduce`` (DeepSpeed's ``allreduce_gradients`` after it), ``grad_check`` and
``optimizer_step`` (at ZeRO >= 1 with the all-gather of the updated partitions). Each run's
loss (the epoch's mean over steps and ranks) and test rsum are printed: the same seed and
global batch give the same training at every ZeRO stage, up to the order of float additions.

The lock rule here (<= 10 minutes a use) fits one repeat: ``--save FILE`` appends each run's
metrics to FILE, and ``--combine FILE ...`` prints the medians table of several invocations'
runs (interleaved: each invocation runs every layout once).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = (
    "data",
    "online_forward",
    "momentum_forward",
    "gather",
    "reduce",
    "posterior_fit",
    "fne_loss",
    "backward_step",
    "ema",
    "enqueue",
    "finite_check",
)
# backward_step's parts (timed inside it); "backward" is shown without grad_reduce
PARTS = ("backward", "grad_reduce", "grad_check", "optimizer_step")
OURS = ("gather", "reduce", "finite_check")  # our collectives (the data vote rides the gather)


class RunFailed(Exception):
    pass


def run(name: str, cmd: list[str], out: Path, checkout: Path = ROOT) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "RAY_ADDRESS")}
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env["PYTHONPATH"] = str(checkout)  # that checkout's package, not the venv's install
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RunFailed(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    metrics = json.loads((out / name / "metrics.json").read_text())
    metrics["process_wall_s"] = wall
    return metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--scaling", action="store_true", help="2x1 vs 1x2 vs 1x1 threads, medians")
    ap.add_argument("--finetune", action="store_true", help="both towers trained (--scaling)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=96, help="--finetune's image size")
    ap.add_argument("--ddp", action="store_true", help="--scaling: add 2 ranks x 1 thread, DDP")
    ap.add_argument(
        "--zero", action="store_true", help="--scaling: add 2x1 at ZeRO-1/2, overlap_comm on/off"
    )
    ap.add_argument("--no-1x2", action="store_true", help="--scaling: leave out 1 rank x 2 threads")
    ap.add_argument("--baseline-2x1-only", action="store_true", help="no 1x2 baseline run")
    ap.add_argument("--only", help="--scaling: comma-separated layout labels to keep (a short run)")
    ap.add_argument(
        "--baseline",
        help="a checkout (git worktree add --detach) whose 2x1, 1x2 and 1x1 runs are added",
    )
    ap.add_argument(
        "--zero-bucket",
        type=float,
        help="--scaling: add 2x1 ZeRO-1/2 overlap with reduce/allgather buckets of N elements",
    )
    ap.add_argument("--save", help="--scaling: append each run's metrics to this JSON file")
    ap.add_argument("--combine", nargs="+", help="print the medians of these --save files")
    args = ap.parse_args()
    if args.combine:
        combined: dict[str, list[dict]] = {}
        for path in args.combine:
            for label, runs in json.loads(Path(path).read_text())["results"].items():
                combined.setdefault(label, []).extend(runs)
        print_scaling(combined, f"combined {', '.join(args.combine)}")
        return
    if args.scaling:
        scaling(args)
        return
    py = sys.executable
    torchrun = [py, "-m", "torch.distributed.run", "--standalone"]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)

        def common(name: str, workers: int, batch: int) -> list[str]:
            return [
                "--config",
                args.config,
                f"run.output_dir={out}",
                f"run.name={name}",
                "run.threads=1",
                f"dist.workers={workers}",
                f"train.batch_size={batch}",
                f"train.epochs={args.epochs}",
                "train.profile_phases=true",
                "train.log_every=100000",
                "train.warmup_steps=10",
                "train.warmup_epochs=null",
            ]

        # Same global batch (32) everywhere: 1 × 32 and 2 × 16.
        runs = {
            "torchrun-1-deepspeed": [
                *torchrun,
                "--nproc_per_node",
                "1",
                "-m",
                "fne_dist.train",
                *common("torchrun-1-deepspeed", 1, 32),
            ],
            "torchrun-2-deepspeed": [
                *torchrun,
                "--nproc_per_node",
                "2",
                "-m",
                "fne_dist.train",
                *common("torchrun-2-deepspeed", 2, 16),
            ],
            "ray-2-deepspeed": [
                py,
                "-m",
                "fne_dist.train",
                *common("ray-2-deepspeed", 2, 16),
                "dist.launcher=ray",
            ],
            "torchrun-2-ddp": [
                *torchrun,
                "--nproc_per_node",
                "2",
                "-m",
                "fne_dist.train",
                *common("torchrun-2-ddp", 2, 16),
                "engine.kind=ddp",
            ],
        }
        try:
            results = {name: run(name, cmd, out) for name, cmd in runs.items()}
        except RunFailed as err:
            sys.exit(str(err))

    steps = {n: r["steps"] for n, r in results.items()}
    print(f"config {Path(args.config).name}, {args.epochs} epochs, global batch 32, 1 thread/rank")
    print(f"{'phase (ms/step)':18s}" + "".join(f"{n:>22s}" for n in results))
    for phase in PHASES:
        row = [1e3 * r["phase_seconds"].get(phase, 0.0) / steps[n] for n, r in results.items()]
        print(f"{phase:18s}" + "".join(f"{v:22.2f}" for v in row))
    for n, r in results.items():
        comm = r["phase_seconds"].get("gather", 0.0) + r["phase_seconds"].get("reduce", 0.0)
        print(
            f"{n:22s} samples/s {r['samples_per_s']:8.0f}   "
            f"collectives {100 * comm / r['loop_time_s']:5.2f}% of the loop   "
            f"process wall {r['process_wall_s']:6.1f} s (loop {r['loop_time_s']:.1f} s)"
        )
    sps = {n: r["samples_per_s"] for n, r in results.items()}
    ratios = {
        "2 ranks / 1 rank (torchrun, DeepSpeed)": ("torchrun-2-deepspeed", "torchrun-1-deepspeed"),
        "Ray+DeepSpeed / torchrun+DDP (2 ranks)": ("ray-2-deepspeed", "torchrun-2-ddp"),
        "torchrun+DeepSpeed / torchrun+DDP (2 ranks)": ("torchrun-2-deepspeed", "torchrun-2-ddp"),
    }
    for label, (a, b) in ratios.items():
        print(f"{label}: {sps[a] / sps[b]:.2f}x samples/s")


def scaling(args: argparse.Namespace) -> None:
    """2 ranks × 1 thread vs 1 rank × 2 threads vs 1 rank × 1 thread, medians of interleaved
    repeats, global batch 32 (torchrun: Ray's start-up is not what is measured here)."""
    py = sys.executable
    extra = []
    if args.finetune:
        extra = [
            "model.image.frozen=false",
            "model.text.frozen=false",
            f"model.image.image_size={args.image_size}",
            "memory.momentum=0.995",
            "optim.lr=1.0e-4",
            "data.loader_workers=0",  # the same in-process decoding for every layout
        ]
    layouts = {
        "2 ranks x 1 thread": (2, 1),
        "1 rank x 2 threads": (1, 2),
        "1 rank x 1 thread": (1, 1),
    }
    if args.no_1x2:
        del layouts["1 rank x 2 threads"]
    checkouts = {label: ROOT for label in layouts}
    overrides: dict[str, list[str]] = {label: [] for label in layouts}
    tmp_configs = tempfile.TemporaryDirectory()
    if args.zero:  # DeepSpeed reduces in backward hooks (overlap_comm) only at ZeRO >= 1
        for stage in (1, 2):
            for overlap in (True, False):
                label = f"2x1 zero{stage} {'overlap' if overlap else 'no-overlap'}"
                path = Path(tmp_configs.name) / f"{label.replace(' ', '_')}.json"
                path.write_text(json.dumps({"zero_optimization": {"overlap_comm": overlap}}))
                layouts[label] = (2, 1)
                checkouts[label] = ROOT
                overrides[label] = [f"engine.zero_stage={stage}", f"engine.deepspeed_config={path}"]
    if args.zero_bucket:  # buckets small enough to reduce during backward
        n = int(args.zero_bucket)
        for stage in (1, 2):
            label = f"2x1 zero{stage} overlap b{args.zero_bucket:.0e}"
            path = Path(tmp_configs.name) / f"{label.replace(' ', '_')}.json"
            zero = {"overlap_comm": True, "reduce_bucket_size": n, "allgather_bucket_size": n}
            path.write_text(json.dumps({"zero_optimization": zero}))
            layouts[label] = (2, 1)
            checkouts[label] = ROOT
            overrides[label] = [f"engine.zero_stage={stage}", f"engine.deepspeed_config={path}"]
    if args.ddp:  # torch DDP: the gradient all-reduce in buckets, overlapping backward
        layouts["2x1 ddp"] = (2, 1)
        checkouts["2x1 ddp"] = ROOT
        overrides["2x1 ddp"] = ["engine.kind=ddp"]
    if args.baseline:  # the other checkout's layouts
        for label, shape in (
            ("2x1 baseline", (2, 1)),
            ("1x2 baseline", (1, 2)),
            ("1x1 baseline", (1, 1)),
        ):
            layouts[label] = shape
            checkouts[label] = Path(args.baseline).resolve()
            overrides[label] = []
        if args.no_1x2 or args.baseline_2x1_only:
            del layouts["1x2 baseline"]
        if args.baseline_2x1_only:
            del layouts["1x1 baseline"]
    if args.only:  # e.g. "2 ranks x 1 thread,1 rank x 1 thread,2x1 zero1 overlap"
        keep = [label.strip() for label in args.only.split(",")]
        unknown = [label for label in keep if label not in layouts]
        if unknown:
            sys.exit(f"--only: unknown {unknown}; have {list(layouts)}")
        layouts = {label: layouts[label] for label in keep}
    results: dict[str, list[dict]] = {name: [] for name in layouts}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for r in range(args.repeats):
            for label, (ranks, threads) in layouts.items():
                name = f"{label.replace(' ', '_')}-{r}"
                cmd = [
                    py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                    str(ranks), "-m", "fne_dist.train", "--config", args.config,
                    f"run.output_dir={out}", f"run.name={name}", f"run.threads={threads}",
                    f"dist.workers={ranks}", f"train.batch_size={32 // ranks}",
                    f"train.epochs={args.epochs}", "train.profile_phases=true",
                    "train.log_every=100000", "train.warmup_steps=3", "train.warmup_epochs=null",
                    "run.pictures=false", *extra, *overrides[label],
                ]  # fmt: skip
                try:
                    m = run(name, cmd, out, checkouts[label])
                except RunFailed as err:  # the other layouts still run (one lock use each)
                    print(f"# {label} #{r}: {err}", flush=True)
                    continue
                m["layout"], m["repeat"] = label, r
                results[label].append(m)
                per_step = {p: 1e3 * m["phase_seconds"].get(p, 0.0) / m["steps"] for p in PHASES}
                shown = " ".join(f"{p} {v:.0f}" for p, v in per_step.items() if v >= 0.5)
                parts = m.get("phase_part_seconds", {})
                split = " ".join(f"{p} {1e3 * v / m['steps']:.0f}" for p, v in parts.items())
                print(
                    f"# {label} #{r}: {m['samples_per_s']:.1f} samples/s; ms/step: {shown}; "
                    f"[{split}]; loss {m['diagnostics'].get('loss', float('nan')):.6f}; "
                    f"test rsum {m['test'].get('rsum', float('nan')):.2f}; "
                    f"load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
                if args.save:  # after every run: a run cut off by the lock's limit keeps these
                    saved = {"args": vars(args), "results": results}
                    Path(args.save).write_text(json.dumps(saved, default=str))
    tmp_configs.cleanup()
    what = "fine-tuning both towers" if args.finetune else Path(args.config).name
    print_scaling(results, f"{what}, global batch 32, {args.epochs} epochs")


def print_scaling(results: dict[str, list[dict]], what: str) -> None:
    """The medians table of ``results`` (layout → its runs' metrics.json)."""
    layouts = [n for n in results if results[n]]
    counts = sorted({len(results[n]) for n in layouts})
    print(f"{what}, median of {'/'.join(map(str, counts))} interleaved runs per layout")
    print("DeepSpeed ZeRO-0 unless the label names a stage; 'ddp': torch DDP's buckets")
    print(f"{'ms/step':24s}" + "".join(f"{n:>26s}" for n in layouts))

    def med(label: str, fn) -> float:
        return statistics.median(fn(m) for m in results[label])

    def per_step(m: dict, key: str, name: str) -> float:
        return 1e3 * m.get(key, {}).get(name, 0.0) / m["steps"]

    for phase in PHASES:
        vals = [med(n, lambda m, p=phase: per_step(m, "phase_seconds", p)) for n in layouts]
        print(f"{phase:24s}" + "".join(f"{v:26.2f}" for v in vals))

    def part(m: dict, name: str) -> float:
        value = per_step(m, "phase_part_seconds", name)
        if name == "backward":  # DeepSpeed's reduction is timed inside engine.backward
            value -= per_step(m, "phase_part_seconds", "grad_reduce")
        return value

    for name in PARTS:
        vals = [med(n, lambda m, p=name: part(m, p)) for n in layouts]
        print(f"{'  ' + name:24s}" + "".join(f"{v:26.2f}" for v in vals))
    sps = {n: med(n, lambda m: m["samples_per_s"]) for n in layouts}
    print(f"{'samples/s':24s}" + "".join(f"{sps[n]:26.1f}" for n in layouts))
    for one in ("1 rank x 1 thread", "1x1 baseline"):
        if one in sps:
            ratios = "".join(f"{sps[n] / sps[one]:25.2f}x" for n in layouts)
            print(f"{'÷ ' + one:24s}" + ratios)

    def share(names: tuple[str, ...]) -> dict[str, float]:
        def one(m: dict) -> float:
            spent = sum(m["phase_seconds"].get(p, 0.0) for p in names if p in PHASES)
            spent += sum(m.get("phase_part_seconds", {}).get(p, 0.0) for p in names)
            return 100 * spent / m["loop_time_s"]

        return {n: med(n, one) for n in layouts}

    # ours: the gather (with the next step's data vote), the statistics' reduce, and at
    # ZeRO >= 1 or with accumulation the non-finite flag's all-reduce
    ours, with_grads = share(OURS), share((*OURS, "grad_reduce"))
    print(f"{'ours % loop':24s}" + "".join(f"{ours[n]:25.2f}%" for n in layouts))
    print(f"{'+ grad_reduce % loop':24s}" + "".join(f"{with_grads[n]:25.2f}%" for n in layouts))
    # the training itself: the epoch's mean loss (over steps and ranks) and the test rsum
    for n in layouts:  # a shared machine's load moves single runs more than most changes
        runs = ", ".join(f"{m['samples_per_s']:.1f}" for m in results[n])
        print(f"samples/s per run, {n}: {runs}")
    nan = float("nan")
    for n in layouts:
        runs = ", ".join(
            f"{m['diagnostics'].get('loss', nan):.8f} ({m['test'].get('rsum', nan):.2f})"
            for m in results[n]
        )
        print(f"loss (test rsum) per run, {n}: {runs}")
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()

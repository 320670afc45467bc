"""The default run's wall time by phase, for one or more checkouts side by side.

    python bench/default_run.py [--checkout LABEL=PATH ...] [--repeats 3] [--cache DIR] [--torchrun]
                                [--set KEY=VALUE ...] [--variant LABEL=KEY=VALUE,KEY=VALUE]

Runs ``python -m fne_dist.train`` (configs/default.yaml: 2 Ray workers, 20 epochs) with
``train.profile_phases=true`` from each checkout (``git worktree add --detach /tmp/old COMMIT``
makes one), the runs interleaved (checkout A, B, A, B, ...: this machine is shared and noisy)
and all on one warm feature cache (``data.cache_dir``: build it once, or copy an existing
``.cache/features``). Prints medians of the repeats: the process's wall time, the training
loop, what comes before and after it, and the loop's per-step phases in ms. ``--variant`` adds
a run of the first checkout with extra overrides (e.g. the paper's posterior), to separate a
configuration's cost from the code's.
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

from fne_dist.monitoring import catalog

ROOT = Path(__file__).resolve().parents[1]
# The PhaseTimer's names, as the monitoring catalog lists them (one list, not two).
PHASES = catalog.PHASES


def one_run(checkout: Path, overrides: list[str], out: Path, name: str, torchrun: bool) -> dict:
    """One default run from ``checkout``; its metrics.json plus the process's wall time."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "RAY_ADDRESS")}
    # the checkout's package, not the venv's editable install (Ray workers inherit the env)
    env["PYTHONPATH"] = str(checkout)
    env.setdefault("RAY_raylet_start_wait_time_s", "300")  # a loaded machine starts Ray slowly
    # torchrun: the same 2-rank loop without Ray's start-up (which a loaded machine can time out)
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = [
        sys.executable,
        *(launch if torchrun else []),
        "-m",
        "fne_dist.train",
        f"run.output_dir={out}",
        f"run.name={name}",
        "train.profile_phases=true",
        *overrides,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    metrics = json.loads((out / name / "metrics.json").read_text())
    metrics["process_wall_s"] = wall
    metrics["summary"] = [line for line in proc.stdout.splitlines() if line.startswith("test ")]
    return metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--checkout", action="append", default=[], help="LABEL=PATH (default: this tree as 'HEAD')"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "features"))
    ap.add_argument("--set", action="append", default=[], help="an override for every run")
    ap.add_argument(
        "--variant", action="append", default=[], help="LABEL=KEY=VALUE,KEY=VALUE (1st checkout)"
    )
    ap.add_argument("--torchrun", action="store_true", help="2 ranks under torchrun, not Ray")
    ap.add_argument(
        "--tabulate", nargs="+", metavar=("RUN_DIR", "LOG"),
        help="only print the table of the runs in RUN_DIR (a killed benchmark's temporary "
        "directory), process walls from its LOG",
    )  # fmt: skip
    args = ap.parse_args()
    if args.tabulate:
        tabulate(Path(args.tabulate[0]), Path(args.tabulate[1]) if args.tabulate[1:] else None)
        return
    checkouts = [c.split("=", 1) for c in args.checkout] or [["HEAD", str(ROOT)]]
    common = [f"data.cache_dir={Path(args.cache).resolve()}", *args.set]
    runs = {label: (Path(path).resolve(), common) for label, path in checkouts}
    for v in args.variant:
        label, sets = v.split("=", 1)
        runs[label] = (Path(checkouts[0][1]).resolve(), [*common, *sets.split(",")])
    results: dict[str, list[dict]] = {label: [] for label in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for label, (path, overrides) in runs.items():
                m = one_run(path, overrides, Path(tmp), f"{label}-{r}", args.torchrun)
                m["_label"] = label
                results[label].append(m)
                print(
                    f"# {label} #{r}: process {m['process_wall_s']:.1f} s, loop "
                    f"{m['loop_time_s']:.1f} s; {' | '.join(m['summary'])}",
                    flush=True,
                )
    print(f"median of {args.repeats} interleaved runs; load {os.getloadavg()[0]:.2f} at the end")
    table(results)


def table(results: dict[str, list[dict]]) -> None:
    """Medians per label of the runs' metrics (process_wall_s: NaN where unknown)."""
    labels = [label for label, ms in results.items() if ms]
    print(f"{'':28s}" + "".join(f"{label:>16s}" for label in labels))

    def row(name: str, fn, fmt: str = "{:16.1f}") -> None:
        vals = [statistics.median(fn(m) for m in results[label]) for label in labels]
        print(f"{name:28s}" + "".join(fmt.format(v) for v in vals))

    row("runs", lambda m: len(results[m["_label"]]), "{:16.0f}")
    row("process wall (s)", lambda m: m["process_wall_s"])
    row("  outside train() (s)", lambda m: m["process_wall_s"] - m["wall_time_s"])
    row("  train() (s)", lambda m: m["wall_time_s"])
    row("    loop (s)", lambda m: m["loop_time_s"])
    row("    train() not loop (s)", lambda m: m["wall_time_s"] - m["loop_time_s"])
    row("steps", lambda m: m["steps"], "{:16.0f}")
    for phase in PHASES:
        row(
            f"  {phase} (ms/step)",
            lambda m, p=phase: 1e3 * m["phase_seconds"].get(p, 0.0) / m["steps"],
            "{:16.2f}",
        )
    row(
        "  rest of loop (ms/step)",
        lambda m: 1e3 * (m["loop_time_s"] - sum(m["phase_seconds"].values())) / m["steps"],
        "{:16.2f}",
    )
    row("samples/s", lambda m: m["samples_per_s"], "{:16.0f}")
    row("test rsum", lambda m: m["test"]["rsum"], "{:16.2f}")


def tabulate(run_dir: Path, log: Path | None) -> None:
    """The table from the metrics.json files a (still running or killed) benchmark left in
    its temporary directory; process walls from its printed '# LABEL #r: process X s' lines."""
    walls = {}
    if log is not None:
        for line in log.read_text().splitlines():
            if line.startswith("# ") and ": process " in line:
                name, rest = line[2:].split(": process ", 1)
                label, r = name.rsplit(" #", 1)
                walls[f"{label}-{r}"] = float(rest.split(" s", 1)[0])
    results: dict[str, list[dict]] = {}
    for metrics in sorted(run_dir.glob("*/metrics.json")):
        name = metrics.parent.name
        m = json.loads(metrics.read_text())
        m["process_wall_s"] = walls.get(name, float("nan"))
        m["_label"] = name.rsplit("-", 1)[0]
        results.setdefault(m["_label"], []).append(m)
    table(results)


if __name__ == "__main__":
    main()

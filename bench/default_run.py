"""The default run's wall time by phase, for one or more checkouts side by side.

    python bench/default_run.py [--checkout LABEL=PATH ...] [--repeats 3] [--cache DIR] [--torchrun]
                                [--set KEY=VALUE ...] [--variant LABEL=KEY=VALUE,KEY=VALUE]
                                [--out DIR]

Runs ``python -m fne_dist.train`` (configs/default.yaml: 2 Ray workers, 20 epochs) with
``train.profile_phases=true`` from each checkout (``git worktree add --detach /tmp/old COMMIT``
makes one), the runs interleaved (checkout A, B, A, B, ...: this machine is shared and noisy)
and all on one warm feature cache (``data.cache_dir``: build it once, or copy an existing
``.cache/features``). Prints medians of the repeats: the process's wall time and CPU seconds
(every descendant process's, Ray's included: less disturbed by other work than the wall
clock), the process's stages (when the lines that end them arrived: Ray started, workers
started, set up, loop done, summary printed, exit), rank 0's own timeline inside ``train()``
(metrics.json, where the checkout writes one: towers, process group, data, engine, loop, final
evaluation), and the loop's per-step phases in ms. ``--variant`` adds a run of the first
checkout with extra overrides (e.g. the paper's posterior), to separate a configuration's cost
from the code's. ``--out`` keeps the run directories.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from fne_dist.monitoring import catalog

nan = math.nan
ROOT = Path(__file__).resolve().parents[1]
# The PhaseTimer's names, as the monitoring catalog lists them (one list, not two).
PHASES = catalog.PHASES


# Lines the run prints (any checkout, the Ray launcher's ones only under Ray), in order: each
# one's arrival marks the end of a stage of the process, on the benchmark's own clock.
MARKERS = (
    ("first line", re.compile(r".")),
    ("ray started", re.compile(r"Started a local Ray instance")),
    ("workers started", re.compile(r"Started training worker group")),
    ("set up", re.compile(r"\] rank 0/\d+ on \w+")),  # data, model, engine: the loop starts
    ("loop done", re.compile(r"\] step (\d+)/\1 ")),  # the last progress line
    ("summary", re.compile(r"test  i2t R@1")),  # final evaluation, metrics.json, weights
)
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# metrics.json's timeline (fne_dist.timing.Timeline, checkouts since it exists), in order
TIMELINE = (
    "train_start",
    "towers_built",
    "group_ready",
    "data_ready",
    "engine_built",
    "engine_ready",
    "loop_start",
    "loop_end",
    "last_checkpoint",
    "evaluated",
)


class CpuSampler(threading.Thread):
    """The CPU seconds of a process and all its descendants (Ray's daemons and workers are the
    driver's), read every second: each process's last reading, summed. A process that lives
    less than a second is missed; the machine's other work is not counted (unlike wall time)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.seen: dict[tuple[int, float], float] = {}  # (pid, start time) -> CPU seconds
        self.kind: dict[tuple[int, float], str] = {}  # (pid, start time) -> process_kind
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(1.0):
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                continue
            for p in procs:
                try:
                    t, key = p.cpu_times(), (p.pid, p.create_time())
                    self.seen[key] = t.user + t.system
                    # the latest title: a prestarted Ray worker becomes an actor later
                    self.kind[key] = process_kind(p, self.root)
                except psutil.Error:
                    pass

    def total(self) -> float:
        return sum(self.seen.values())

    def by_kind(self) -> dict[str, float]:
        kinds: dict[str, float] = {}
        for key, seconds in self.seen.items():
            kinds[self.kind[key]] = kinds.get(self.kind[key], 0.0) + seconds
        return kinds


# What a descendant process is, by its title (Ray names its processes), for the CPU split
KINDS = (
    ("RayTrainWorker", "train workers"),
    ("TrainController", "Ray Train actors"),
    ("ray::", "Ray Train actors"),  # the state actor, coordinator, cleaner, watcher, idle
    ("raylet", "Ray daemons"),
    ("gcs_server", "Ray daemons"),
    ("dashboard", "Ray dashboard + agents"),
    ("agent", "Ray dashboard + agents"),
    ("log_monitor", "Ray daemons"),
    ("monitor", "Ray daemons"),
)


def process_kind(p: psutil.Process, root: psutil.Process) -> str:
    if p.pid == root.pid:
        return "driver"
    try:
        title = " ".join(p.cmdline()[:3]) or p.name()
    except psutil.Error:
        return "other"
    return next((kind for needle, kind in KINDS if needle in title), "other")


def one_run(
    checkout: Path, overrides: list[str], out: Path, name: str, torchrun: bool
) -> dict | None:
    """One default run from ``checkout``; its metrics.json plus the process's wall time, its
    CPU seconds (with every descendant: Ray's daemons and workers included), and when
    each of ``MARKERS`` first appeared (seconds after the start)."""
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
    t0_epoch, t0 = time.time(), time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=checkout, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    cpu = CpuSampler(proc.pid)
    cpu.start()
    lines, seen = [], {}
    for raw in proc.stdout:  # read as it comes: the arrival times are the markers
        now, line = time.perf_counter() - t0, ANSI.sub("", raw.rstrip("\n"))
        lines.append(line)
        for label, pattern in MARKERS:
            if label not in seen and pattern.search(line):
                seen[label] = now
    proc.wait()
    wall = time.perf_counter() - t0
    cpu.stop.set()
    cpu.join()
    if proc.returncode != 0:
        # the other checkouts' runs still count: one that fails is left out of the table
        print(f"# {name} failed ({proc.returncode}):\n" + "\n".join(lines[-40:]), flush=True)
        return None
    metrics = json.loads((out / name / "metrics.json").read_text())
    metrics["process_wall_s"] = wall
    metrics["process_cpu_s"] = cpu.total()
    metrics["cpu_by_kind_s"] = cpu.by_kind()
    metrics["markers_s"] = seen
    marks = metrics.get("timeline") or {}
    metrics["timeline_s"] = {k: v - t0_epoch for k, v in marks.items()}
    bare = [ln.split(") ", 1)[-1] if ln.startswith("(") else ln for ln in lines]  # Ray's prefix
    metrics["summary"] = [ln for ln in bare if ln.startswith(("test ", "val ")) and "rsum" in ln]
    own = ("process_wall_s", "process_cpu_s", "cpu_by_kind_s", "markers_s", "timeline_s", "summary")
    # beside metrics.json: --tabulate reads it back (a benchmark killed half-way still counts)
    (out / name / "bench.json").write_text(json.dumps({k: metrics[k] for k in own}, indent=1))
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
    ap.add_argument("--out", help="keep the run directories here (default: a temporary one)")
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
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.out or scratch
        for r in range(args.repeats):
            for label, (path, overrides) in runs.items():
                m = one_run(path, overrides, Path(tmp), f"{label}-{r}", args.torchrun)
                if m is None:
                    continue
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
    print(f"{'':34s}" + "".join(f"{label:>16s}" for label in labels))

    def row(name: str, fn, fmt: str = "{:16.1f}") -> None:
        vals = [statistics.median(fn(m) for m in results[label]) for label in labels]
        print(f"{name:34s}" + "".join(fmt.format(v) for v in vals))

    row("runs", lambda m: len(results[m["_label"]]), "{:16.0f}")
    row("process wall (s)", lambda m: m["process_wall_s"])
    row("process CPU (s)", lambda m: m.get("process_cpu_s", nan))
    for kind in dict.fromkeys(kind for _, kind in (*KINDS, ("", "driver"), ("", "other"))):
        row(f"  CPU {kind} (s)", lambda m, k=kind: m.get("cpu_by_kind_s", {}).get(k, 0.0))
    # the process's stages, from when each marker line arrived: a stage runs from the last
    # marker seen before it (Ray's lines are missing under torchrun); NaN: its line never came
    for i, (label, _) in enumerate(MARKERS):
        row(f"  ..{label} (s)", lambda m, i=i: _marker_span(m, i))
    row("  ..exit (s)", lambda m: _marker_span(m, len(MARKERS)))
    # inside train() on rank 0 (metrics.json's timeline, where the checkout writes one)
    row("  train() from start (s)", lambda m: m["timeline_s"].get("train_start", nan))
    for i, mark in enumerate(TIMELINE[1:], 1):  # from the last earlier mark the checkout writes
        row(f"    ..{mark} (s)", lambda m, i=i: _since_last(m["timeline_s"], TIMELINE, i))
    row("    ..exit (s)", lambda m: m["process_wall_s"] - m["timeline_s"].get("evaluated", nan))
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
    for split, key in (("test", "rsum"), ("test", "group_rsum"), ("test", "group_map")):
        row(f"{split} {key}", lambda m, s=split, k=key: m[s].get(k, nan), "{:16.2f}")
    row("val rsum", lambda m: m["val"]["rsum"], "{:16.2f}")


def _marker_span(m: dict, i: int) -> float:
    """Seconds from the last marker seen before ``MARKERS[i]`` (or the start) to it (``i`` past
    the end: to the process's exit)."""
    order = (*(label for label, _ in MARKERS), "exit")
    return _since_last({**m["markers_s"], "exit": m["process_wall_s"]}, order, i)


def _since_last(times: dict[str, float], order: tuple[str, ...], i: int) -> float:
    """Seconds from the last mark of ``order[:i]`` in ``times`` (or 0) to ``order[i]``."""
    earlier = [times[name] for name in order[:i] if name in times]
    return times.get(order[i], nan) - (earlier[-1] if earlier else 0.0)


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
        m["process_wall_s"] = walls.get(name, nan)
        m.setdefault("markers_s", {})
        m["timeline_s"] = {}
        if (metrics.parent / "bench.json").is_file():  # what the benchmark measured itself
            m.update(json.loads((metrics.parent / "bench.json").read_text()))
        m["_label"] = name.rsplit("-", 1)[0]
        results.setdefault(m["_label"], []).append(m)
    table(results)


if __name__ == "__main__":
    main()

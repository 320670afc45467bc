"""Distributed step profile: where a step's time goes, and what each launcher costs.

    python bench/distributed.py [--epochs 2] [--config configs/default.yaml]

Runs, one after the other in this process's lifetime (this machine is shared and noisy, so
compare within one run): 1 rank and 2 ranks under torchrun (DeepSpeed engine), 2 Ray Train
workers (DeepSpeed), and 2 ranks under torchrun with plain torch DDP. Each run times every phase
of the step (``train.profile_phases``) and reports samples/s of the training loop; the table
prints ms per step per phase, the fraction of the step spent in our collectives (gather +
reduce; DeepSpeed's gradient all-reduce is inside backward_step), and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
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
    "fne_loss",
    "backward_step",
    "ema",
    "enqueue",
)


def run(name: str, cmd: list[str], out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "RAY_ADDRESS")}
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    metrics = json.loads((out / name / "metrics.json").read_text())
    metrics["process_wall_s"] = wall
    return metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    ap.add_argument("--epochs", type=float, default=2.0)
    args = ap.parse_args()
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
        results = {name: run(name, cmd, out) for name, cmd in runs.items()}

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


if __name__ == "__main__":
    main()

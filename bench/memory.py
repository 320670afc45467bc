"""Replicated against sharded momentum memory: measured per-rank bytes and step time, 2 ranks.

    python bench/memory.py [--sizes 65536 262144 1048576 --dim 256 --batch 32 --steps 5]
    python bench/memory.py --paper   # the sizes on paper at 64 GPUs (docs/sharded-memory.md)

For each K, one run of 2 gloo ranks (CPU processes) per layout, one after the other in this
run. Each rank builds its memory (the whole one, or its K/2 shard) and runs ``--steps``
forward+backward steps of the FNE loss over [gathered batch ; memory] on synthetic unit
embeddings (μ⁺ placed so ~1 % of the candidates are in the window). Reported per rank (the
larger of the two): the memory's bytes as measured (RSS after building it less RSS before),
the peak RSS of the process, and the median step time. Memory numbers are measured, not
computed; step times on a shared machine are noisy (ratios of medians, same run).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def worker(args: argparse.Namespace) -> None:
    """One rank: build the memory, time the steps, write a JSON record."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from fne_dist.distributed.sharded import DefaultComm, ShardStep, sharded_retrieval_loss
    from fne_dist.fne import (
        Anchors,
        Candidates,
        FneConfig,
        SimilarityStats,
        retrieval_loss,
        stats_of,
        step_uniforms,
    )
    from fne_dist.memory import MomentumMemory, ShardRange

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    K, D, B = args.size, args.dim, args.batch
    G = B * world
    rss0 = _rss()
    shard = ShardRange.of(K, rank, world) if args.layout == "sharded" else None
    memory = MomentumMemory(K, D, seed=1, shard=shard)
    memory.ids_K.copy_(torch.arange(memory.shard.lo, memory.shard.hi) + 10**6)  # all written
    rss1 = _rss()
    cfg = FneConfig()
    gen = torch.Generator().manual_seed(rank)
    # μ⁺ so that ~1 % of random 256-d cosines (sd ≈ 1/16) lie above μ⁺ − margin
    stats = SimilarityStats()
    stats.add(stats_of(torch.full((400,), 0.2 + 2.3 / D**0.5), torch.zeros(800)))
    g = stats.gaussians()
    times = []
    for step in range(args.steps + 1):
        img = F.normalize(torch.randn(B, D, generator=gen), dim=1).requires_grad_()
        txt = F.normalize(torch.randn(B, D, generator=gen), dim=1).requires_grad_()
        ids = torch.arange(B) + rank * B
        dist.barrier()
        t0 = time.perf_counter()
        gathered = Candidates(
            *(torch.cat(_gather(x.detach())) for x in (img, txt)),
            torch.cat(_gather(ids)),
            G,
            torch.cat(_gather(ids)),
        )
        anchors = Anchors(img, txt, ids, rank * B + torch.arange(B), ids)
        u = step_uniforms(0, step, G, 1)
        if args.layout == "sharded":
            out = sharded_retrieval_loss(ShardStep(anchors, gathered, memory, u), cfg, g, None,
                                         DefaultComm())  # fmt: skip
        else:
            cands = Candidates.concat(gathered, memory.candidates())
            out = retrieval_loss(anchors, cands, cfg, g, u[:, rank * B : (rank + 1) * B])
        out.loss.backward()
        if step:  # the first step warms up
            times.append(time.perf_counter() - t0)
    record = dict(
        rank=rank,
        memory_bytes=rss1 - rss0,
        peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        step_s=statistics.median(times),
        window=float(out.diagnostics["frac_in_window"]),
    )
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def _gather(x):
    import torch
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return parts


def launch(args: argparse.Namespace, size: int, layout: str) -> list[dict]:
    from fne_dist.distributed.launch import free_port

    with tempfile.TemporaryDirectory() as out:
        port, procs = free_port(), []
        for rank in range(args.world):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(args.world),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                       OMP_NUM_THREADS=str(args.threads))  # fmt: skip
            cmd = [sys.executable, __file__, "--worker", "--size", str(size), "--layout", layout,
                   "--out", out, "--dim", str(args.dim), "--batch", str(args.batch),
                   "--steps", str(args.steps), "--threads", str(args.threads)]  # fmt: skip
            procs.append(subprocess.Popen(cmd, env=env))
        codes = [p.wait(timeout=3600) for p in procs]
        if any(codes):  # e.g. -9: the kernel's OOM killer; reported as a row, not hidden
            for p in procs:
                if p.poll() is None:
                    p.kill()
            return [{"failed": min(codes)}]
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(args.world)]


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def paper_table(world: int = 64, batch: int = 256) -> str:
    """Per-rank bytes and bytes sent per step per rank, replicated vs sharded, at ``world``
    GPUs: what this implementation holds and sends, k = 1, float32 storage, no detection sums.
    Ring collectives: an all-gather sends W − 1 parts, an all-reduce 2·(W−1)/W of its size;
    the all-to-all of the picks sends the rows a rank owns for other ranks' anchors
    (2·B·(W−1)/W on average)."""
    G = world * batch
    ring = 2 * (world - 1) / world
    rows = ["| K | D | memory / rank, replicated | memory / rank, sharded | sent / rank / step, "
            "replicated | sent / rank / step, sharded |", "|---|---|---|---|---|---|"]  # fmt: skip
    for K in (2**20, 2**24):
        for D in (256, 768):
            slot = 2 * D * 4 + 3 * 8  # two embeddings, id, group, write counter
            replicated_mem = K * slot
            sharded_mem = -(-K // world) * slot
            gather = (world - 1) * batch * (2 * D * 4 + 2 * 8)  # momentum rows, ids, groups
            sharded_extra = (
                (world - 1) * batch * (2 * D * 4 + 3 * 8)  # anchors (detached), ids, cols, groups
                + 2 * (world - 1) * batch * 4  # s⁺, per direction
                + 2 * (world - 1) * (batch + G) * 8  # segment totals, per direction
                + 2 * ring * G * (8 + 8 + 3 * 8)  # fallback max, first column, counts
                + 2 * ring * G * (3 * 8 + 4)  # the draw's picks
                + 2 * batch * (world - 1) / world * (2 * D * 4 + 2 * 8)  # the picked rows
            )
            rows.append(
                f"| {K:,} | {D} | {mib(replicated_mem)} | {mib(sharded_mem)} | {mib(gather)} | "
                f"{mib(gather + sharded_extra)} |"
            )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[65536, 262144, 1048576])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32, help="anchors per rank")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--paper", action="store_true", help="print the sizes on paper and exit")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--layout", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    if args.paper:
        print(paper_table())
        return
    print(f"D={args.dim}, {args.world} ranks × B={args.batch}, {args.steps} steps, "
          f"{args.threads} thread(s) per rank; per rank, the larger of the ranks")  # fmt: skip
    print("| K | layout | memory (RSS Δ) | peak RSS | step (median) | step ÷ replicated |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        base = None
        for layout in ("replicated", "sharded"):
            recs = launch(args, size, layout)
            if "failed" in recs[0]:
                why = "killed (out of memory)" if recs[0]["failed"] == -9 else "failed"
                print(
                    f"| {size:,} | {layout} | {why}, exit {recs[0]['failed']} | | | |", flush=True
                )
                continue
            mem = max(r["memory_bytes"] for r in recs)
            peak = max(r["peak_rss"] for r in recs)
            step = max(r["step_s"] for r in recs)
            base = base or (step if layout == "replicated" else None)
            ratio = f"{step / base:.2f}×" if base else "n/a"
            print(f"| {size:,} | {layout} | {mib(mem)} | {mib(peak)} | {step * 1e3:,.0f} ms | "
                  f"{ratio} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

"""Replicated against sharded momentum memory: measured per-rank bytes and step time, 2 ranks.

    python bench/memory.py [--sizes 65536 262144 1048576 --dim 256 --batch 32 --steps 5]
    python bench/memory.py --paper   # the sizes on paper at 64 GPUs (docs/sharded-memory.md)

For each K, one run of 2 gloo ranks (CPU processes) that holds both layouts side by side: each
rank builds its K/2 shard, then the whole memory (the same seeded slots), and runs
forward+backward steps of the FNE loss over [gathered batch ; memory] on synthetic unit
embeddings (μ⁺ placed so ~1 % of the candidates are in the window), the two layouts
interleaved step by step (the order alternating: R S, S R, ...) on the same anchors and
uniforms, so that load on a shared machine hits both alike. Reported per rank (the larger of
the two ranks): the memory's bytes as measured (RSS after building it less RSS before), the
step's transient peak (peak RSS during the step less RSS before it: the whole-row sampler's
concatenated block, the similarities, autograd), the median step time and the ratio of the
medians, sharded ÷ replicated; and the largest |loss difference| between the layouts over the
steps (both draw the same candidates; float32). Memory numbers are measured, not computed.
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
sys.path.insert(0, str(ROOT))
LAYOUTS = ("replicated", "sharded")


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _reset_peak() -> bool:
    """Reset the kernel's peak RSS of this process (VmHWM; Linux ≥ 4.0), False where refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def worker(args: argparse.Namespace) -> None:
    """One rank: build both memories, time interleaved steps, write a JSON record."""
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
    # a shard built and dropped first: the first build's one-time costs (the allocator keeps
    # the heap its generation chunks grew) are not charged to the measured ones
    MomentumMemory(K, D, seed=1, shard=ShardRange.of(K, rank, world))
    memories, memory_bytes = {}, {}
    for layout in ("sharded", "replicated"):  # the small one first: its Δ holds no leftovers
        before = _rss()
        shard = ShardRange.of(K, rank, world) if layout == "sharded" else None
        memory = MomentumMemory(K, D, seed=1, shard=shard)
        memory.ids_K.copy_(torch.arange(memory.shard.lo, memory.shard.hi) + 10**6)  # all written
        memories[layout], memory_bytes[layout] = memory, _rss() - before
    cfg = FneConfig()
    gen = torch.Generator().manual_seed(rank)
    # μ⁺ so that ~1 % of random 256-d cosines (sd ≈ 1/16) lie above μ⁺ − margin
    stats = SimilarityStats()
    stats.add(stats_of(torch.full((400,), 0.2 + 2.3 / D**0.5), torch.zeros(800)))
    g = stats.gaussians()
    peaks_ok = _reset_peak()
    times: dict[str, list[float]] = {k: [] for k in LAYOUTS}
    peaks: dict[str, int] = dict.fromkeys(LAYOUTS, 0)
    loss_gap, window = 0.0, {}

    def step(layout: str, img, txt, ids, u) -> tuple[float, float, int]:
        img, txt = img.detach().requires_grad_(), txt.detach().requires_grad_()
        dist.barrier()
        rss, reset = _rss(), _reset_peak()
        t0 = time.perf_counter()
        gathered = Candidates(
            *(torch.cat(_gather(x.detach())) for x in (img, txt)),
            torch.cat(_gather(ids)),
            G,
            torch.cat(_gather(ids)),
        )
        anchors = Anchors(img, txt, ids, rank * B + torch.arange(B), ids)
        memory = memories[layout]
        if layout == "sharded":
            out = sharded_retrieval_loss(ShardStep(anchors, gathered, memory, u), cfg, g, None,
                                         DefaultComm())  # fmt: skip
        else:
            cands = Candidates.concat(gathered, memory.candidates())
            out = retrieval_loss(anchors, cands, cfg, g, u[:, rank * B : (rank + 1) * B])
        out.loss.backward()
        seconds = time.perf_counter() - t0
        window[layout] = float(out.diagnostics["frac_in_window"])
        return seconds, float(out.loss.detach()), (_peak() - rss) if reset else 0

    for i in range(args.steps + 1):  # step 0 warms both up
        img = F.normalize(torch.randn(B, D, generator=gen), dim=1)
        txt = F.normalize(torch.randn(B, D, generator=gen), dim=1)
        ids = torch.arange(B) + rank * B
        u = step_uniforms(0, i, G, 1)
        order = LAYOUTS if i % 2 == 0 else LAYOUTS[::-1]
        losses = {}
        for layout in order:
            seconds, losses[layout], peak = step(layout, img, txt, ids, u)
            if i:
                times[layout].append(seconds)
            peaks[layout] = max(peaks[layout], peak)
        loss_gap = max(loss_gap, abs(losses["sharded"] - losses["replicated"]))
    record = dict(
        rank=rank,
        memory_bytes=memory_bytes,
        step_peak=peaks if peaks_ok else None,
        step_s={k: statistics.median(v) for k, v in times.items()},
        ratios=[s / r for s, r in zip(times["sharded"], times["replicated"], strict=True)],
        loss_gap=loss_gap,
        window=window,
    )
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def _gather(x):
    import torch
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return parts


def launch(args: argparse.Namespace, size: int) -> list[dict]:
    from fne_dist.distributed.launch import free_port

    with tempfile.TemporaryDirectory() as out:
        port, procs = free_port(), []
        for rank in range(args.world):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(args.world),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                       OMP_NUM_THREADS=str(args.threads))  # fmt: skip
            cmd = [sys.executable, __file__, "--worker", "--size", str(size), "--out", out,
                   "--dim", str(args.dim), "--batch", str(args.batch),
                   "--steps", str(args.steps), "--threads", str(args.threads)]  # fmt: skip
            procs.append(subprocess.Popen(cmd, env=env))
        # one rank dead (e.g. -9: the kernel's OOM killer) leaves the other in a collective
        while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs):
            time.sleep(0.5)
        for p in procs:
            if p.poll() is None:
                p.kill()
        codes = [p.wait() for p in procs]
        if any(codes):  # reported as a row, not hidden
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
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    if args.paper:
        print(paper_table())
        return
    print(f"D={args.dim}, {args.world} ranks × B={args.batch}, {args.steps} interleaved steps "
          f"per layout, {args.threads} thread(s) per rank; per rank, the larger of the "
          "ranks")  # fmt: skip
    print("| K | layout | memory (RSS Δ) | step peak (RSS) | step (median) "
          "| sharded ÷ replicated |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    notes = []
    for size in args.sizes:
        recs = launch(args, size)
        if "failed" in recs[0]:
            why = "killed (out of memory?)" if recs[0]["failed"] == -9 else "failed"
            print(f"| {size:,} | both | {why}, exit {recs[0]['failed']} | | | |", flush=True)
            continue
        step = {k: max(r["step_s"][k] for r in recs) for k in LAYOUTS}
        for layout in LAYOUTS:
            mem = max(r["memory_bytes"][layout] for r in recs)
            peak = (mib(max(r["step_peak"][layout] for r in recs))
                    if recs[0]["step_peak"] is not None else "n/a")  # fmt: skip
            ratio = (f"{step['sharded'] / step['replicated']:.2f}×"
                     if layout == "sharded" else "")  # fmt: skip
            print(f"| {size:,} | {layout} | {mib(mem)} | {peak} | {step[layout] * 1e3:,.0f} ms "
                  f"| {ratio} |", flush=True)  # fmt: skip
        pairs = sorted(x for r in recs for x in r["ratios"])
        notes.append(
            f"K={size:,}: per-step ratios sharded ÷ replicated (both ranks) "
            f"{pairs[0]:.2f}..{pairs[-1]:.2f}; max |Δloss| {max(r['loss_gap'] for r in recs):.1e}; "
            f"in window {recs[0]['window']['replicated']:.1%} / {recs[0]['window']['sharded']:.1%}"
        )
    print("\n".join(notes))


if __name__ == "__main__":
    main()

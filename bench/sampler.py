"""Sampler micro-benchmark: FNE fwd+bwd ÷ vse_pp fwd+bwd over [batch ; memory].

    python bench/sampler.py [--batch 128 --memory 65536 --dim 256 --repeats 7 --threads 2]

Both losses run on the same candidates in one process, interleaved (this machine is shared and
noisy), and the ratio of medians is printed for the eager sampler and the torch.compile-fused one
(``fne.compile=true``). The issue's goal is ≤ 1.5×; the reference code costs 4.1×. Both are
also shown against a textbook VSE++ (autograd through the whole B×N matrix, as research code
writes it): our vse_pp selects under no_grad and backpropagates through the picks only.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from fne_dist.fne import (
    Anchors,
    Candidates,
    FneConfig,
    SimilarityStats,
    retrieval_loss,
    stats_of,
    step_uniforms,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--memory", type=int, default=65536)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    B, K, D = args.batch, args.memory, args.dim
    gen = torch.Generator().manual_seed(0)

    def unit(n: int) -> torch.Tensor:
        return F.normalize(torch.randn(n, D, generator=gen), dim=1)

    img, txt = unit(B).requires_grad_(), unit(B).requires_grad_()
    ids = torch.arange(B)
    batch = Candidates(unit(B), unit(B), ids, B)
    memory = Candidates(unit(K), unit(K), torch.randint(0, 10 * K, (K,), generator=gen), 0)
    cands = Candidates.concat(batch, memory)
    anchors = Anchors(img, txt, ids, torch.arange(B))
    stats = SimilarityStats()  # an open gate, so the Bayes part runs too
    stats.add(
        stats_of(
            0.5 + 0.05 * torch.randn(300, generator=gen),
            0.1 + 0.05 * torch.randn(600, generator=gen),
        )
    )
    g = stats.gaussians()
    u = step_uniforms(3407, 0, B)

    def step(cfg: FneConfig | None) -> float:
        t0 = time.perf_counter()
        if cfg is None:
            textbook_vse_pp().backward()
        else:
            retrieval_loss(anchors, cands, cfg, g, u).loss.backward()
        img.grad = txt.grad = None
        return time.perf_counter() - t0

    mask_BN = ids[:, None] == cands.ids_N[None, :]

    def textbook_vse_pp() -> torch.Tensor:
        """VSE++ as research code writes it: autograd through the whole B×N matrix."""
        total = torch.zeros(())
        for anchor_BD, cand_ND in ((img, cands.txt_ND), (txt, cands.img_ND)):
            sim_BN = anchor_BD @ cand_ND.T
            pos_B1 = sim_BN.diagonal()[:, None]  # the batch block comes first
            hinge_BN = (0.2 + sim_BN - pos_B1).clamp_min(0).masked_fill(mask_BN, 0)
            total = total + hinge_BN.max(dim=1).values.mean()
        return total

    configs: dict[str, FneConfig | None] = {
        "vse_pp": FneConfig(loss="vse_pp"),
        "vse_pp (textbook)": None,
        "fne (eager)": FneConfig(),
        "window (eager)": FneConfig(loss="window"),
        "fne (compiled)": FneConfig(compile=True),
    }
    t0 = time.perf_counter()
    for cfg in configs.values():  # warm-up, includes torch.compile's one-off compilation
        step(cfg)
    print(f"warm-up incl. compile: {time.perf_counter() - t0:.1f} s")
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.repeats):
        for name, cfg in configs.items():
            times[name].append(step(cfg))
    base = statistics.median(times["vse_pp"])
    textbook = statistics.median(times["vse_pp (textbook)"])
    print(f"B={B} K={K} D={D} threads={args.threads} repeats={args.repeats}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(
            f"{name:18s} median {med * 1e3:8.1f} ms   ratio to vse_pp {med / base:5.2f}x   "
            f"to textbook vse_pp {med / textbook:5.2f}x"
        )


if __name__ == "__main__":
    main()

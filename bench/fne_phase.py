"""The default run's FNE work per step, in-process, for checkouts side by side.

    python bench/fne_phase.py [--checkout LABEL=PATH ...] [--rounds 5] [--steps 200]

What ``bench/default_run.py`` times as the ``fne_loss`` phase (the loss's forward: selection,
weights, draws, diagnostics) and the posterior's per-step fit (``fne.posterior.fit``, the EM on
the running histogram, timed outside any phase), at the default run's size (B = 16 anchors per
rank, 32 gathered + 1,024 memory candidates, D = 256, group labels, 1 thread) with the default
config's FNE (``intra_mixture``, ``fallback: unflagged``, ε 0.5, τ_fn 4) and the paper's
posterior beside it. Each checkout runs in its own process (``PYTHONPATH``), the processes
interleaved (A, B, A, B, ...: this machine is shared and noisy); medians of the rounds' medians
in ms per step, and the ratio of each checkout to the first. Also prints a digest of every
output (loss, gradients, diagnostics) so the checkouts' results can be compared bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(steps: int) -> dict:
    """One process: ms per step of each piece, and the digest of the outputs."""
    import hashlib
    import time
    from dataclasses import replace

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
    from fne_dist.fne.estimators import sample_columns
    from fne_dist.fne.posteriors import CandidateSample, posterior_for

    torch.set_num_threads(1)
    B, G, K, D = 16, 32, 1024, 256
    gen = torch.Generator().manual_seed(0)

    def unit(n: int) -> torch.Tensor:
        return F.normalize(torch.randn(n, D, generator=gen), dim=1)

    classes = torch.randint(0, 10, (600,), generator=gen)  # image id -> group
    ids_N = torch.cat([torch.arange(G) // 5, torch.randint(0, 600, (K,), generator=gen)])
    cands = Candidates(unit(G + K), unit(G + K), ids_N, G, classes[ids_N])
    # online anchors near their momentum pairs, as in training
    img = F.normalize(cands.img_ND[:B] + 0.3 * unit(B), dim=1).requires_grad_()
    txt = F.normalize(cands.txt_ND[:B] + 0.3 * unit(B), dim=1).requires_grad_()
    a = Anchors(img, txt, ids_N[:B], torch.arange(B), classes[ids_N[:B]])
    u = step_uniforms(3407, 0, G, 1, 0, B)
    g = torch.Generator().manual_seed(1)
    stats = SimilarityStats()
    stats.add(
        stats_of(
            # μ⁺ 0.33: a window s > μ⁺ − 0.2 of ~2 % of the random candidates, as in the
            # default run's later epochs (0.1-2.2 %)
            0.33 + 0.05 * torch.randn(300, generator=g, dtype=torch.float64),
            0.1 * torch.randn(600, generator=g, dtype=torch.float64),
        )
    )
    gauss = stats.gaussians()
    default = FneConfig(
        posterior="intra_mixture",
        stats_source="all_pairs",
        fallback="unflagged",
        eps=0.5,
        tau_fn=4.0,
    )
    posterior = posterior_for(default)
    cols = sample_columns(3407, 0, G, 64, G + K, 0, B)
    valid = (ids_N[cols] != ids_N[:B][None, :, None]).flatten()
    sample = CandidateSample(torch.zeros(valid.shape), valid, img, cands.img_ND, cols)
    totals = posterior.sums(sample) * 40.0  # a running histogram
    g_default = replace(gauss, posterior=posterior.fit(gauss, totals))
    configs = {
        "fne_loss default (ms)": (default, g_default),
        "fne_loss paper (ms)": (FneConfig(), gauss),
    }
    digest = hashlib.sha256()
    for cfg, gg in configs.values():
        out = retrieval_loss(a, cands, cfg, gg, u)
        out.loss.backward()
        for t in (out.loss, img.grad, txt.grad, *out.diagnostics.values()):
            digest.update(t.detach().double().numpy().tobytes())
        img.grad = txt.grad = None
    fit = posterior.fit(gauss, totals)
    for t in fit.mixture.__dict__.values():
        digest.update(t.numpy().tobytes())

    def fit_once() -> object:
        return posterior.fit(gauss, totals)

    pieces = {
        name: (lambda c=c, gg=gg: retrieval_loss(a, cands, c, gg, u))
        for name, (c, gg) in configs.items()
    }
    pieces["posterior fit (ms)"] = fit_once
    times: dict[str, list[float]] = {name: [] for name in pieces}
    with torch.no_grad():  # the phase is the forward; backward is another phase
        for _ in range(steps):
            for name, fn in pieces.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {
        "ms": {name: 1e3 * statistics.median(ts) for name, ts in times.items()},
        "digest": digest.hexdigest()[:16],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkout", action="append", default=[], help="LABEL=PATH")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.steps)))
        return
    checkouts = [c.split("=", 1) for c in args.checkout] or [["HEAD", str(ROOT)]]
    runs: dict[str, list[dict]] = {label: [] for label, _ in checkouts}
    for _ in range(args.rounds):
        for label, path in checkouts:
            env = {**os.environ, "PYTHONPATH": str(Path(path).resolve())}
            cmd = [sys.executable, __file__, "--child", "--steps", str(args.steps)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            runs[label].append(json.loads(out.stdout.strip().splitlines()[-1]))
    labels = list(runs)
    print(f"medians of {args.rounds} interleaved rounds x {args.steps} steps; "
          f"load {os.getloadavg()[0]:.2f} at the end")  # fmt: skip
    print(f"{'':26s}" + "".join(f"{label:>14s}" for label in labels) + "   ratio to first")
    for name in runs[labels[0]][0]["ms"]:
        med = [statistics.median(r["ms"][name] for r in runs[label]) for label in labels]
        ratios = " ".join(f"{m / med[0]:.2f}" for m in med[1:])
        print(f"{name:26s}" + "".join(f"{m:14.2f}" for m in med) + f"   {ratios}")
    digests = {label: {r["digest"] for r in rs} for label, rs in runs.items()}
    same = len({d for ds in digests.values() for d in ds}) == 1
    print("outputs (loss, gradients, diagnostics, fit) bit-identical across checkouts: "
          f"{same} {digests}")  # fmt: skip


if __name__ == "__main__":
    main()

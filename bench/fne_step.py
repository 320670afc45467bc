"""FNE's part of a training step, without the towers, for checkouts side by side.

    python bench/fne_step.py [--checkout LABEL=PATH ...] [--batch 32] [--memory 1024 16384]
                             [--groups 0] [--rounds 3] [--steps 20]

What ``bench/overhead.py`` counts as FNE's own phases (``fne_dist.step.forward_step`` from the
gather on: statistics, posterior fit, [gathered batch ; memory], the FNE loss and its
diagnostics; then the loss's backward, the statistics' commit and the enqueue), with stub
encoders that hand back fixed unit embeddings, so the towers' cost and noise are out. The
memory is filled with random unit vectors, as in ``bench/overhead.py``; ``--groups N`` labels
the pairs (group = id mod N: FN detection is then measured every step, as on emoji), 0 leaves
them unlabelled (Flickr/COCO-like). One thread, the process's CPU seconds per step. Each
checkout runs in its own process (``PYTHONPATH``), interleaved (A, B, A, B, ...); medians of
the rounds' medians, the ratio to the first checkout, and a digest of every step's loss,
gradients and logged diagnostics (the detection sums with ``--groups``), so the checkouts'
results can be compared bit for bit.
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
FORMS = {  # configs/default.yaml's fne section, and the paper's (FneConfig's defaults)
    "default": {
        "posterior": "intra_mixture",
        "stats_source": "all_pairs",
        "fallback": "unflagged",
        "eps": 0.5,
        "tau_fn": 4.0,
    },
    "paper": {},
}


def measure(batch: int, k: int, form: str, groups: int, steps: int) -> dict:
    """One process: median CPU ms per step and the digest of the outputs."""
    import hashlib
    import time

    import torch
    import torch.nn.functional as F

    from fne_dist.fne import FneConfig, SimilarityStats
    from fne_dist.memory import MomentumMemory
    from fne_dist.step import StepPosition, forward_step

    torch.set_num_threads(1)
    d = 256
    cfg = FneConfig(gate_size=batch, **FORMS[form])
    memory = MomentumMemory(k, d, seed=1)
    gen = torch.Generator().manual_seed(2)
    ids_k = 10**9 + torch.arange(k)
    rows = F.normalize(torch.randn(2, k, d, generator=gen), dim=2)
    memory.enqueue(rows[0], rows[1], ids_k, ids_k % groups if groups else None)
    stats, temperature = SimilarityStats(), torch.tensor(0.05)
    digest = hashlib.sha256()
    times = []
    for step in range(steps + 3):
        g = torch.Generator().manual_seed(step)
        img = F.normalize(torch.randn(batch, d, generator=g), dim=1).requires_grad_()
        txt = F.normalize(torch.randn(batch, d, generator=g), dim=1).requires_grad_()
        ids = torch.arange(batch) + batch * step
        pairs = {"ids": ids, "groups": ids % groups if groups else torch.full_like(ids, -1)}
        t0 = time.process_time()
        out = forward_step(
            lambda _b, i=img, t=txt: (i, t, temperature),
            lambda _b, i=img, t=txt: (i.detach(), t.detach(), temperature),
            pairs,
            memory,
            stats,
            cfg,
            StepPosition(0, step, False),
        )
        out.loss.backward()
        stats.add_step(out.stat_sums, cfg.mixture_decay)
        gathered = out.gathered
        memory.enqueue(gathered.img_ND, gathered.txt_ND, gathered.ids_N, gathered.groups_N)
        if step >= 3:  # the first steps warm the allocator and the statistics
            times.append(time.process_time() - t0)
        # the logged diagnostics too (with labels: the detection sums), so a cheaper
        # diagnostic is checked to log the same numbers
        diag = [out.diagnostics[key] for key in sorted(out.diagnostics)]
        for t in (out.loss, img.grad, txt.grad, *diag):
            digest.update(t.detach().double().numpy().tobytes())
    return {"ms": 1e3 * statistics.median(times), "digest": digest.hexdigest()[:16]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkout", action="append", default=[], help="LABEL=PATH")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--memory", type=int, nargs="+", default=[1024, 16384])
    ap.add_argument("--groups", type=int, default=0, help="group = id mod N; 0: unlabelled")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # K FORM (internal)
    args = ap.parse_args()
    if args.child:
        k, form = args.child
        print(json.dumps(measure(args.batch, int(k), form, args.groups, args.steps)))
        return
    checkouts = [c.split("=", 1) for c in args.checkout] or [["HEAD", str(ROOT)]]
    cases = [(k, form) for k in args.memory for form in FORMS]
    runs: dict[tuple, list[dict]] = {(lab, *c): [] for lab, _ in checkouts for c in cases}
    for _ in range(args.rounds):
        for k, form in cases:
            for label, path in checkouts:
                env = {**os.environ, "PYTHONPATH": str(Path(path).resolve())}
                cmd = [sys.executable, __file__, "--child", str(k), form,
                       "--batch", str(args.batch), "--groups", str(args.groups),
                       "--steps", str(args.steps)]  # fmt: skip
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                runs[(label, k, form)].append(json.loads(out.stdout.strip().splitlines()[-1]))
    labels = [label for label, _ in checkouts]
    print(
        f"FNE's part of a step, CPU ms per step (1 thread), B = {args.batch}, "
        f"{'group labels id % ' + str(args.groups) if args.groups else 'no group labels'}; "
        f"medians of {args.rounds} interleaved rounds x {args.steps} steps; "
        f"load {os.getloadavg()[0]:.2f} at the end"
    )
    print(f"{'':22s}" + "".join(f"{label:>14s}" for label in labels) + "   ratio to first")
    for k, form in cases:
        med = [statistics.median(r["ms"] for r in runs[(lab, k, form)]) for lab in labels]
        ratios = " ".join(f"{m / med[0]:.2f}" for m in med[1:])
        print(f"{f'{form} K={k}':22s}" + "".join(f"{m:14.1f}" for m in med) + f"   {ratios}")
    same = all(
        len({r["digest"] for lab in labels for r in runs[(lab, k, form)]}) == 1 for k, form in cases
    )
    print(f"losses, gradients and diagnostics bit-identical across checkouts: {same}")


if __name__ == "__main__":
    main()

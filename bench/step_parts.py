"""Two parts of the default run's step, before and after, side by side in one process.

    python bench/step_parts.py [--repeats 5] [--cache DIR]

* the null-mixture fit (``fne.mixture_null_components: 3``, 100 EM iterations a step): the
  step-by-step loop of ``null_em_step`` (as ``fit_null_mixture`` was written first) against
  ``fit_null_mixture`` (in-place iterations, under TorchScript on the host), on emoji-shaped
  running histograms; it also checks that both give the same bits;
* the training stream's epochs over the default run's train feature cache (rank 0 of 2, batch
  16, in-process reading): parsing the tars every epoch against the stream's ``ShardMemo``;
  the first epoch (which fills the memo) and the later ones apart.

Prints medians (ms) and after ÷ before, interleaved, one thread (as each rank of the default
run).
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fne_dist.data import StreamOptions, TrainStream, shard_list
from fne_dist.data.batching import PairCollate, PairTransform
from fne_dist.fne.mixture import histogram
from fne_dist.fne.null_mixture import (
    NULL_FIT_ITERS,
    fit_null_mixture,
)

# the fit as first written (NULL_FIT_ITERS calls of null_em_step): the reference the tests hold
# the in-place, TorchScript EM to, timed here against it
from tests.test_null_mixture import _reference_fit as step_by_step_fit

F64 = torch.float64


def emoji_histograms(n: int) -> list[torch.Tensor]:
    """Running histograms shaped like the emoji's image-image similarities: a skewed null and
    1 % false negatives near 0.88 (tests/test_null_mixture.py's shape), decayed like the run's."""
    gen = torch.Generator().manual_seed(0)
    hists, running = [], torch.zeros(200, dtype=F64)
    for _ in range(n):
        u = torch.rand(2048, generator=gen, dtype=F64)
        z = torch.randn(2048, generator=gen, dtype=F64)
        x = torch.where(
            u < 0.01, 0.88 + 0.06 * z, torch.where(u < 0.76, -0.02 + 0.13 * z, 0.2 + 0.2 * z)
        )
        running = 0.99 * running + histogram(x.clamp(-1, 1), torch.ones_like(x, dtype=torch.bool))
        hists.append(running.clone())
    return hists


def time_fits(repeats: int) -> None:
    hists = emoji_histograms(20)
    same = all(
        torch.equal(a, b)
        for h in hists
        for j in (1, 3)
        for a, b in zip(
            (lambda m: (m.weights_K, m.mu_K, m.var_K))(step_by_step_fit(h, j)),
            (lambda m: (m.weights_K, m.mu_K, m.var_K))(fit_null_mixture(h, j)),
            strict=True,
        )
    )
    times: dict[str, list[float]] = {"step by step": [], "fit_null_mixture": []}
    for _ in range(repeats):
        for name, fit in (
            ("step by step", step_by_step_fit),
            ("fit_null_mixture", fit_null_mixture),
        ):
            t0 = time.perf_counter()
            for h in hists:
                fit(h, 3)
            times[name].append((time.perf_counter() - t0) / len(hists) * 1e3)
    before, after = (statistics.median(v) for v in times.values())
    print(f"null-mixture fit, J = 3, {NULL_FIT_ITERS} EM iterations ({len(hists)} histograms)")
    print(f"  step by step (before)   {before:7.2f} ms")
    print(f"  fit_null_mixture (now)  {after:7.2f} ms   after ÷ before {after / before:.2f}")
    print(f"  same bits (J = 1 and 3, every histogram): {same}")


def train_cache(cache: str) -> str | None:
    """The feature cache of the default run's train split (its sources.json names it)."""
    for sources in sorted(glob.glob(f"{cache}/feat-*/sources.json")):
        if any("emoji-train" in s for s in json.loads(Path(sources).read_text())):
            return str(Path(sources).parent / "feat-*.tar")
    return None


def time_epochs(cache: str, repeats: int, epochs: int = 6) -> None:
    spec = train_cache(cache)
    if spec is None:
        print(f"no train feature cache under {cache}: run the default run once")
        return
    per: dict[str, dict[str, list[float]]] = {"tars": {}, "memo": {}}
    for _ in range(repeats):
        for name in per:
            opts = StreamOptions(batch=16, seed=0, rank=0, world=2, workers=0)
            stream = TrainStream(
                shard_list(spec, "bench"), opts, PairTransform(None), PairCollate(None)
            )
            if name == "tars":
                stream.memo = None
            for e in range(epochs):
                t0 = time.perf_counter()
                n = sum(1 for _ in stream.epoch(e))
                key = "first epoch" if e == 0 else "later epochs"
                per[name].setdefault(key, []).append((time.perf_counter() - t0) / n * 1e3)
    print(f"\ntraining stream, default run's train cache, rank 0 of 2, batch 16, {epochs} epochs")
    for key in ("first epoch", "later epochs"):
        before, after = (statistics.median(per[name][key]) for name in ("tars", "memo"))
        print(
            f"  {key:13s} tars each epoch {before:5.2f} ms/batch   memo {after:5.2f} ms/batch"
            f"   after ÷ before {after / before:.2f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cache", default=str(Path(__file__).resolve().parents[1] / ".cache/features"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    time_fits(args.repeats)
    time_epochs(args.cache, args.repeats)


if __name__ == "__main__":
    main()

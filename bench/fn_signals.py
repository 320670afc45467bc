"""Which signal tells a false negative from a true negative? Measured on bench/quality.py's data.

    python bench/fn_signals.py [--variant fne] [--seed 0] [--features .cache/features]

Trains one run of ``--variant`` (the quality bench's loop), then, over train anchors × all
train items, with the generator's (or the families') labels: positive = same id, false
negative = same group, true negative = the rest. Prints the fitted Gaussians of the run
(μ±, σ±), each population's similarity mean ± sd, and how well each signal ranks false above
true negatives (AUC), over all candidates and inside the hard-cut window (s > μ⁺ − margin,
where the sampler draws): the cross-modal similarity s the posterior sees, s − s⁺, a z-score
within the anchor's candidates, the intra-modal similarities (image-image, text-text), and
the image-image robust z within the anchor's items (the retired ``fn_signal: tail``'s signal:
median and 1.4826·MAD over the anchor's other items).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality

from fne_dist.fne import FneConfig


def robust_z(x_bN: Tensor, null_bN: Tensor) -> Tensor:
    """(x − median) / max(1.4826 · MAD, 1e-3) per row, over the entries where null_bN holds."""
    x = x_bN.detach().to(torch.float64)
    masked = torch.where(null_bN, x, torch.nan)
    med_b = masked.nanmedian(dim=1, keepdim=True).values
    mad_b = (masked - med_b).abs().nanmedian(dim=1, keepdim=True).values
    scale_b = (1.4826 * mad_b).nan_to_num(1.0).clamp_min(1e-3)
    return ((x - med_b.nan_to_num(0.0)) / scale_b).nan_to_num(0.0)


def auc(x: Tensor, fn: Tensor, tn: Tensor, n: int = 4000) -> float:
    """P(a random false negative scores above a random true negative), on ≤ n of each."""
    gen = torch.Generator().manual_seed(0)
    a, b = x[fn], x[tn]
    a = a[torch.randperm(len(a), generator=gen)[:n]]
    b = b[torch.randperm(len(b), generator=gen)[:n]]
    if not len(a) or not len(b):
        return float("nan")
    return float(
        (a[:, None] > b[None]).double().mean() + 0.5 * (a[:, None] == b[None]).double().mean()
    )


@torch.no_grad()
def signals(model, train: dict, anchors: int = 600) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Each signal (anchors × items) and the label masks (pos, fn, tn)."""
    img = model.encode_image({"img_feat": train["img_feat"]})
    txt = model.encode_text({"txt_feat": train["txt_feat"]})
    a = slice(0, min(anchors, img.shape[0]))
    s = img[a] @ txt.T
    ids, grp = train["ids"], train["groups"]
    pos = ids[a, None] == ids[None]
    fn = (grp[a, None] == grp[None]) & ~pos & (grp[a, None] >= 0)
    neg = s.masked_fill(pos, float("nan"))
    mean, sd = neg.nanmean(1, keepdim=True), (neg - neg.nanmean(1, keepdim=True)).square()
    sd = sd.nanmean(1, keepdim=True).sqrt()
    s_pos = (img[a] * txt[a]).sum(1, keepdim=True)
    out = {"cross s": s, "s - s+": s - s_pos, "z within anchor": (s - mean) / sd,
           "image-image": img[a] @ img.T, "text-text": txt[a] @ txt.T}  # fmt: skip
    out["image-image robust z"] = robust_z(
        out["image-image"], ~pos
    )  # the retired tail posterior's signal
    return out, {"pos": pos, "fn": fn, "tn": ~pos & ~fn}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="fne", choices=sorted(quality.VARIANTS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--features", type=Path)
    p.add_argument("--epochs", type=int, default=quality.Setup.epochs)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    s = quality.Setup(epochs=args.epochs)
    if args.features:
        data = quality.load_cached_features(args.features)
        dims = dict(
            img_dim=data["train"]["img_feat"].shape[1], txt_dim=data["train"]["txt_feat"].shape[1]
        )
        s = quality.replace(s, **quality.FEATURE_SETUP, **dims)
    else:
        data = quality.make_data(s)
    cfg, keep = FneConfig(**quality.VARIANTS[args.variant]), {}
    quality.train_run(cfg, data, s, args.seed, keep)
    g = keep["stats"].gaussians(cfg.gate_size, cfg.var_floor, cfg.variance)
    print(f"fitted: mu+ {float(g.mu_pos):.3f} sd+ {float(g.var_pos.sqrt()):.3f}  "
          f"mu- {float(g.mu_neg):.3f} sd- {float(g.var_neg.sqrt()):.3f}")  # fmt: skip
    sig, lab = signals(keep["model"], data["train"])
    s_cross = sig["cross s"]
    window = s_cross > float(g.mu_pos) - cfg.cut_margin
    for name in ("pos", "fn", "tn"):
        x = s_cross[lab[name]]
        print(f"cross s of {name:3}: {float(x.mean()):+.3f} ± {float(x.std()):.3f}  (n {len(x)})")
    share = float((lab["fn"] & window).sum() / ((lab["fn"] | lab["tn"]) & window).sum())
    print(f"false-negative share of the window's candidates: {share:.3f}")
    for name, x in sig.items():
        all_auc, win_auc = (
            auc(x, lab["fn"], lab["tn"]),
            auc(x, lab["fn"] & window, lab["tn"] & window),
        )
        print(
            f"AUC false > true negative, {name:16}: all {all_auc:.3f}   in the window {win_auc:.3f}"
        )


if __name__ == "__main__":
    main()

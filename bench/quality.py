"""Does FNE earn its place? Every loss on the same data, model, budget and paired seeds.

    python bench/quality.py --smoke                 # tiny, 1 seed: runs end to end in < 1 min
    python bench/quality.py --seeds 0 1 2 --epochs 8 --classes 10 --out results/quality
    python bench/quality.py --features .cache/features --epochs 4 --out results/emoji
    python bench/quality.py --from-runs a/runs.json b/runs.json --out results/merged
    python bench/quality.py --features F --variants vse_pp_memory --momentum 0.9 --suffix _m09
    python bench/quality.py --loop --features F --epochs 4 --variants vse0 infonce fne_sum_intra

``--loop`` trains each run through the CLI itself (``python -m fne_dist.train``, one child
process per run, on the packaged default config: the emoji shards and their feature cache, the
default encoders, heads, memory, schedule and warm-up; one rank, the default run's global batch
of 32), so a loss that crashes ``python -m fne_dist.train`` fails the benchmark's goals. It
reports the end-of-run test (what the CLI reports), not a val-selected epoch, and trains on the
default config's data whatever ``--classes`` says. Without it, each run uses the benchmark's
own loop below (the same step, not the same data path, engine or launcher).

``--memory``, ``--momentum``, ``--warmup-epochs`` and ``--fresh-memory`` (re-encode the memory
every step: no staleness) change the run's setup for a diagnosis; ``--suffix`` names those rows
apart.

Data: a generator with a controllable false-negative rate (``--classes`` C: every candidate of
the anchor's class is a false negative, rate ≈ 1/C). Frozen towers with cached features are
what the default run trains (heads on fixed features), so the generator emits features
directly: an image feature is its class centre plus an instance part, each of its captions
a fixed linear map of it plus noise (another width), so strict retrieval needs the instance
part and the class part makes false negatives. Difficulty knobs (``Setup``): class
separation 1.5, instance 1.5, caption noise 2.5 were chosen so that neither strict nor group
R@K saturates and the id-mask oracle is clearly ahead of in-batch VSE++ on group rsum AND
group mAP (bench/results/quality_synthetic.md says what was tried).

``--features DIR``: the embedded emoji data through the default run's frozen encoders, read
from its feature cache (``data.cache_dir``; ``python -m fne_dist.train`` builds it once), with
the default run's head settings (``FEATURE_SETUP``); group = emoji family.

Each run uses the project's own step (``fne_dist.step.forward_step``: statistics, estimators,
sampler, loss), momentum encoder, memory and metrics, with a plain Adam loop on one process
(the loop's step order: forward → backward → step → EMA → enqueue; one warm-up epoch of
in-batch VSE++ as the reference). Each run's epoch is selected on val (rsum) and its test
metrics reported; the FN detection numbers are those of that run's last epoch.
Prints mean ± std over seeds, a paired bootstrap interval of each difference to ``fne``, the
share of the in-batch VSE++ → oracle gap each variant recovers (group-aware rsum) and the
issue's goals as PASS/FAIL; writes ``results.md``, ``runs.json`` (also after each variant)
and ``chart.png`` (matplotlib, Agg) to ``--out``.
"""

from __future__ import annotations

import argparse
import filecmp
import io
import json
import math
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fne_dist.config import ModelConfig, OptimConfig, load_config
from fne_dist.engine import lr_lambda
from fne_dist.fne import FneConfig, SimilarityStats
from fne_dist.memory import MomentumMemory
from fne_dist.model import DualEncoder
from fne_dist.momentum import ema_update, make_momentum_copy
from fne_dist.retrieval_metrics import retrieval_metrics
from fne_dist.run_summary import EpochDiagnostics
from fne_dist.shared_prefix import OnlineMemory
from fne_dist.step import StepPosition, forward_step

NEVER = 10**12  # a gate size no epoch reaches: the Bayes part stays off (kernel only)
_FNE_INTRA = dict(loss="fne", posterior="intra_mixture", eps=0.5, tau_fn=4.0)
_FNE_SUM = dict(_FNE_INTRA, loss="fne_sum", stats_source="all_pairs")
# Rows of retired options (prior_mode em, fn_signal both / tail / tail_both, infonce_fn) stay
# in bench/results/*.md as history; CHANGELOG.md says why each was retired.
VARIANTS: dict[str, dict] = {
    "vse_pp_batch": dict(loss="vse_pp", vse_pp_memory=False),
    "vse_pp_memory": dict(loss="vse_pp", vse_pp_memory=True),
    # diagnosis (emoji round 3): VSE++ over [batch ; memory] with group mates masked: what the
    # memory costs once its false negatives are gone
    "vse_pp_memory_oracle": dict(loss="vse_pp", vse_pp_memory=True, mask_groups=True),
    "vse0": dict(loss="vse0"),
    "infonce": dict(loss="infonce"),
    "window": dict(loss="window"),
    "fne_kernel": dict(loss="fne", gate_size=NEVER),
    "fne": dict(loss="fne"),
    "fne_all_pairs": dict(loss="fne", stats_source="all_pairs"),
    # posterior cross_mixture (fne.mixture): ε = 0.5 makes "P_fn > ε" the Bayes decision of a
    # calibrated posterior; τ_fn sets how far a likely false negative is down-weighted.
    "fne_mixture": dict(loss="fne", posterior="cross_mixture"),
    "fne_mixture_eps": dict(loss="fne", posterior="cross_mixture", eps=0.5),
    "fne_mixture_eps_t4": dict(loss="fne", posterior="cross_mixture", eps=0.5, tau_fn=4.0),
    # the sampler's P_fn from the image-image similarity (posterior intra_mixture)
    "fne_intra": _FNE_INTRA,
    "fne_intra_all_pairs": dict(_FNE_INTRA, stats_source="all_pairs"),
    # 8× the random candidates per anchor in the mixture's histogram: rare false negatives
    # (emoji: 0.6 % of candidates) get enough samples to form a component
    "fne_intra_s32": dict(_FNE_INTRA, stats_samples=32),
    # late in training most rows' windows are empty (emoji: ~80 % of rows fall back), and the
    # fallback, the hardest violator, is the flagged mate; skip flagged ones
    "fne_intra_all_pairs_unflagged": dict(
        _FNE_INTRA, stats_source="all_pairs", fallback="unflagged"
    ),
    # round 3 (fne.reduction): the expectation of the sampled hinge under the same weights
    # (what vse0 is to VSE++), or k = 4 draws without replacement (the mean of 4 hinges)
    "fne_expected": dict(loss="fne", reduction="expected"),
    "window_expected": dict(loss="window", reduction="expected"),
    "fne_intra_all_pairs_unflagged_expected": dict(
        _FNE_INTRA, stats_source="all_pairs", fallback="unflagged", reduction="expected"
    ),
    "fne_intra_all_pairs_unflagged_k4": dict(
        _FNE_INTRA, stats_source="all_pairs", fallback="unflagged", negatives=4
    ),
    # round 3 (fne.fallback_scope batch): an empty window's fallback violator from the batch
    # block only; measured on emoji: the hardest negative of [batch ; memory] costs ~30 group
    # rsum against the in-batch one, and neither masking group mates nor a fresh memory
    # recovers it, while ~80 % of rows fall back late in training
    "fne_batch_fallback": dict(loss="fne", fallback_scope="batch"),
    "fne_intra_all_pairs_unflagged_batch_fallback": dict(
        _FNE_INTRA, stats_source="all_pairs", fallback="unflagged", fallback_scope="batch"
    ),
    "fne_intra_all_pairs_unflagged_batch_fallback_expected": dict(
        _FNE_INTRA,
        stats_source="all_pairs",
        fallback="unflagged",
        fallback_scope="batch",
        reduction="expected",
    ),
    "oracle": dict(loss="fne", mask_groups=True),
    # the dense family's oracle: vse0 with the anchor's group mates masked
    "vse0_oracle": dict(loss="vse0", mask_groups=True),
    # FN elimination over every negative (fne.loss fne_sum, fne.summed): vse0's sum of hinges
    # over [batch ; memory], each candidate weighted by the posterior's P(true negative)
    "fne_sum_intra": _FNE_SUM,
    "fne_sum_intra_exp": dict(_FNE_SUM, sum_weight="exp"),
    "fne_sum_intra_hard": dict(_FNE_SUM, sum_weight="hard"),
    "fne_sum_intra_kernel_cut": dict(_FNE_SUM, sum_kernel=True, sum_cut=True),
    "fne_sum_intra_batch": dict(_FNE_SUM, sum_scope="batch"),
    "fne_sum_cross": dict(_FNE_SUM, posterior="cross_mixture"),
    # the mixture's true-negative density as two (three) Gaussians (fne.null_mixture): the
    # negatives' skewed tail gets its own component, the false-negative one fits the mates
    "fne_sum_intra_null2": dict(_FNE_SUM, mixture_null_components=2),
    "fne_sum_intra_null3": dict(_FNE_SUM, mixture_null_components=3),
    # J = 3 only on steps whose one-null fit is a tail (fne.mixture_null_auto): one form for
    # data whose false negatives are a few near-duplicates (emoji) and dense classes (synthetic)
    # (decided afresh every step: fne.mixture_null_latch = 0, the form measured before the latch)
    "fne_sum_intra_nullauto3": dict(
        _FNE_SUM, mixture_null_components=3, mixture_null_auto=True, mixture_null_latch=0
    ),
    # the same choice latched to J = 3 after 50 tail steps in a row (fne.mixture_null_latch):
    # the per-step choice flipped late in long emoji runs
    "fne_sum_intra_nulllatch3": dict(
        _FNE_SUM, mixture_null_components=3, mixture_null_auto=True, mixture_null_latch=50
    ),
    "fne_intra_all_pairs_unflagged_null2": dict(
        _FNE_INTRA, stats_source="all_pairs", fallback="unflagged", mixture_null_components=2
    ),
    "fne_sum_paper": dict(loss="fne_sum"),
    "fne_sum_paper_hard": dict(loss="fne_sum", sum_weight="hard"),
}
SMOKE_VARIANTS = ("vse_pp_batch", "vse0", "window", "fne", "fne_mixture_eps_t4", "fne_intra",
                  "fne_sum_intra", "oracle", "vse0_oracle")  # fmt: skip
ORACLES = ("oracle", "vse0_oracle")  # one per loss family: the sampled one and the dense one
# The goals' baselines: the best FNE form must beat each by > 1 sd on group rsum and group mAP.
BASELINES = ("vse0", "infonce", "vse_pp_batch", "vse_pp_memory")
METRICS = ("rsum", "group_rsum", "group_map", "end_rsum", "end_group_rsum", "end_group_map",
           "best_epoch", "fn_pfn_precision", "fn_pfn_recall",
           "fn_window_precision", "fn_window_recall", "frac_neg_same_group", "staleness",
           "wall_s")  # fmt: skip


@dataclass
class Setup:
    images: int = 1200
    captions: int = 2
    classes: int = 10
    img_dim: int = 48
    txt_dim: int = 32
    embed_dim: int = 64
    separation: float = 1.5  # class-centre scale (N(0, separation²) per dim): the FN signal
    instance: float = 1.5  # instance part (N(0, instance²) per dim): what strict retrieval needs
    noise: float = 2.5  # caption noise: keeps strict and group R@K off their ceiling
    epochs: int = 8
    batch: int = 32
    memory: int = 256
    momentum: float = 0.9  # heads from scratch need a fast momentum (docs/algorithm.md §8)
    lr: float = 2e-3
    # diagnosis only (--fresh-memory): re-encode every memory entry with the current momentum
    # model before each step, so the memory holds the same items with no staleness
    fresh_memory: bool = False
    # memory.encoder (--memory-encoder): what fills the memory and the batch candidates: the
    # momentum (EMA) copy, or the online model's detached embeddings (XBM-style: no EMA)
    memory_encoder: str = "momentum"
    # the CLI's schedule (the packaged default config's): the lr schedule and its linear
    # warm-up (optim.*), and the warm-up of in-batch VSE++ in epochs (train.warmup_epochs)
    optim: OptimConfig | None = None
    warmup_epochs: float = 1.0


def cli_schedule() -> dict:
    """The default run's optim section (schedule, lr warm-up) and train.warmup_epochs, read
    from the packaged configs/default.yaml, so the benchmark trains as ``python -m
    fne_dist.train`` does."""
    cfg = load_config(Path(__file__).parents[1] / "fne_dist" / "configs" / "default.yaml")
    return dict(optim=cfg.optim, warmup_epochs=cfg.train.warmup_epochs or 0.0)


def make_data(s: Setup, seed: int = 1234) -> dict[str, dict[str, Tensor]]:
    """train/val/test (60/20/20 % of the images) of cached-feature pairs with class groups."""
    gen = torch.Generator().manual_seed(seed)
    centres = s.separation * torch.randn(s.classes, s.img_dim, generator=gen)
    cls = torch.randint(0, s.classes, (s.images,), generator=gen)
    img = centres[cls] + s.instance * torch.randn(s.images, s.img_dim, generator=gen)
    mix = torch.randn(s.img_dim, s.txt_dim, generator=gen) / math.sqrt(s.img_dim)
    image_of = torch.arange(s.images).repeat_interleave(s.captions)
    txt = img[image_of] @ mix + s.noise * torch.randn(len(image_of), s.txt_dim, generator=gen)
    cut1, cut2 = int(0.6 * s.images), int(0.8 * s.images)
    splits = {}
    for name, (lo, hi) in {
        "train": (0, cut1),
        "val": (cut1, cut2),
        "test": (cut2, s.images),
    }.items():
        rows = ((image_of >= lo) & (image_of < hi)).nonzero().flatten()
        splits[name] = {
            "img_feat": img[image_of[rows]], "txt_feat": txt[rows], "ids": image_of[rows],
            "groups": cls[image_of[rows]], "img_only": img[lo:hi], "img_groups": cls[lo:hi],
            "text_to_image": image_of[rows] - lo,
        }  # fmt: skip
    return splits


def _read_feature_dir(path: Path) -> tuple[Tensor, Tensor, Tensor]:
    """(image features, text features, image ids and group ids) of one cached split:
    ``.npy`` members read with allow_pickle=False and the json's two integers; nothing else
    from the shards is interpreted."""
    rows: dict[str, dict] = {}
    for shard in sorted(path.glob("feat-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                f = tar.extractfile(m)
                if f is None or ext not in ("img_feat.npy", "txt_feat.npy", "json"):
                    continue
                data = f.read()
                if ext == "json":
                    meta = json.loads(data)
                    rows.setdefault(key, {})["ids"] = (int(meta["image_id"]), int(meta["group_id"]))
                else:
                    arr = np.load(io.BytesIO(data), allow_pickle=False)
                    rows.setdefault(key, {})[ext] = torch.from_numpy(arr.astype(np.float32))
    keys = sorted(rows)
    img = torch.stack([rows[k]["img_feat.npy"] for k in keys])
    txt = torch.stack([rows[k]["txt_feat.npy"].reshape(-1) for k in keys])
    return img, txt, torch.tensor([rows[k]["ids"] for k in keys])


def _is_split_dir(d: Path, split: str) -> bool:
    """A finished cache folder of ``split``: named ``<split>-<hash>`` (caches keyed by split),
    or, for content-keyed caches (``feat-<hash>``), every shard its sources.json lists is a
    ``*-<split>-*`` shard (the emoji shards' naming)."""
    if not d.is_dir() or ".tmp" in d.name:
        return False
    if d.name.startswith(f"{split}-"):
        return True
    sources = d / "sources.json"
    if not d.name.startswith("feat-") or not sources.is_file():
        return False
    names = [Path(str(s)).name for s in json.loads(sources.read_text())]
    return bool(names) and all(f"-{split}-" in n for n in names)


def _same_shards(a: Path, b: Path) -> bool:
    """Both folders hold the same feature shards, byte for byte."""
    names = sorted(p.name for p in a.glob("feat-*.tar"))
    if not names or names != sorted(p.name for p in b.glob("feat-*.tar")):
        return False
    return all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def load_cached_features(root: Path) -> dict[str, dict[str, Tensor]]:
    """train/val/test from a feature cache (``data.cache_dir`` of the default run: one
    ``<split>-<hash>`` folder per split, one caption per image), in make_data's layout; the
    group is the json's ``group_id`` (the emoji family)."""
    splits = {}
    for name in ("train", "val", "test"):
        found = [d for d in sorted(root.iterdir()) if _is_split_dir(d, name)]
        if len(found) > 1 and all(_same_shards(found[0], d) for d in found[1:]):
            found = found[:1]  # the same cache under both naming schemes (old and new keys)
        if len(found) != 1:
            raise SystemExit(f"{root}: expected one {name}-* feature folder, found {len(found)}")
        img, txt, ig = _read_feature_dir(found[0])
        n = img.shape[0]
        splits[name] = {
            "img_feat": img, "txt_feat": txt, "ids": ig[:, 0], "groups": ig[:, 1],
            "img_only": img, "img_groups": ig[:, 1], "text_to_image": torch.arange(n),
        }  # fmt: skip
    return splits


@torch.no_grad()
def evaluate(model: DualEncoder, split: dict[str, Tensor]) -> dict[str, float]:
    """Strict and group-aware R@K and group mAP (pessimistic ties) of one split."""
    img = model.encode_image({"img_feat": split["img_only"]})
    txt = model.encode_text({"txt_feat": split["txt_feat"]})
    return retrieval_metrics(img @ txt.T, split["text_to_image"], split["img_groups"])


def train_run(cfg: FneConfig, data: dict, s: Setup, seed: int, keep: dict | None = None) -> dict:
    """One run: the loop's step order on one process; the val-selected epoch's test metrics
    and (``end_*``) the last epoch's, which is what the CLI reports. The warm-up (in-batch
    VSE++ for ``s.warmup_epochs`` epochs, counted in steps as the loop does) and the lr
    schedule are the CLI's. ``keep``: receives the last epoch's model and statistics
    (bench/fn_signals.py)."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = DualEncoder(None, None, s.img_dim, s.txt_dim, ModelConfig(embed_dim=s.embed_dim,
                        head="mlp"), cfg.temperature)  # fmt: skip
    momentum = make_momentum_copy(model)
    memory = MomentumMemory(s.memory, s.embed_dim, seed=seed)
    stats = SimilarityStats(cfg.stats_reset, cfg.no_pos_mu)
    opt = torch.optim.Adam(model.parameters(), lr=s.lr)
    train, n, step = data["train"], data["train"]["ids"].shape[0], 0
    per_epoch = len(range(0, n - s.batch + 1, s.batch))
    warm_steps = round(s.warmup_epochs * per_epoch)
    sched = None
    if s.optim is not None:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(s.optim, per_epoch * s.epochs))
    best: tuple[float, dict, dict] = (-math.inf, {}, {})
    slot_rows = torch.full((s.memory,), -1, dtype=torch.long)  # train row of each memory slot
    online_memory = s.memory_encoder == "online"
    # the loop's encoder pair (fne_dist.loop): online memory = the online forward, detached
    pair = OnlineMemory(model) if online_memory else None
    encoders = (pair.online, pair.momentum) if pair is not None else (model, momentum)
    reference = model if online_memory else momentum  # what the memory's entries come from
    for epoch in range(s.epochs):
        stats.new_epoch()
        epoch_diag = EpochDiagnostics()
        # Σ cos(memory, momentum), Σ cos(memory, online), n; Σ cos(batch momentum, online), n
        stale = torch.zeros(5, dtype=torch.float64)
        # Paired seeds: the same data order for every variant of a seed.
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        for start in range(0, n - s.batch + 1, s.batch):
            warm = step < warm_steps  # in-batch VSE++, as the loop's ``state.warm``
            rows = order[start : start + s.batch]
            batch = {k: v[rows] for k, v in train.items()
                     if k in ("img_feat", "txt_feat", "ids", "groups")}  # fmt: skip
            if not warm:
                stale += _refresh_memory(
                    memory, (reference, model), train, slot_rows, s.fresh_memory
                )
                stale[3:] += _batch_lag(model, reference, batch)
            out = forward_step(*encoders, batch, memory, stats, cfg, StepPosition(seed, step, warm))
            stats.add_step(out.stat_sums, cfg.mixture_decay)  # no skipped steps here
            opt.zero_grad()
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
            opt.step()
            if sched is not None:
                sched.step()
            if not online_memory:  # online: the momentum copy is never read (as the loop)
                ema_update(momentum, model, s.momentum)
            if not warm:
                g = out.gathered
                slots = (memory.ptr + torch.arange(len(rows))) % max(s.memory, 1)
                memory.enqueue(g.img_ND, g.txt_ND, g.ids_N, g.groups_N)
                slot_rows[slots[-s.memory :] if s.memory else slots[:0]] = rows[-s.memory :]
                epoch_diag.add(out.diagnostics)
            step += 1
        row = epoch_diag.close_epoch(epoch)
        for key, (num, den) in {"staleness": (0, 2), "staleness_online": (1, 2),
                                "batch_online_cos": (3, 4)}.items():  # fmt: skip
            row[key] = float(stale[num] / stale[den]) if stale[den] > 0 else math.nan
        val = evaluate(model, data["val"])
        if val["rsum"] > best[0]:
            best = (val["rsum"], evaluate(model, data["test"]) | {"best_epoch": epoch}, row)
    _, test, diag = best
    end = {f"end_{k}": v for k, v in evaluate(model, data["test"]).items()}
    if keep is not None:
        keep.update(model=model, stats=stats)
    kept = ("fn_", "frac_", "staleness", "batch_online")
    return {**test, **end, **{k: v for k, v in diag.items() if k.startswith(kept)},
            "wall_s": time.perf_counter() - t0}  # fmt: skip


@torch.no_grad()
def _refresh_memory(
    memory: MomentumMemory,
    encoders: tuple[torch.nn.Module, torch.nn.Module],
    train: dict,
    slot_rows: Tensor,
    write: bool,
) -> Tensor:
    """(Σ cos with momentum, Σ cos with online, count, 0, 0) over the written memory slots: the
    cosine of each slot's image entry with the current momentum (the memory's staleness, 1 =
    fresh) and online embedding of the train pair it holds. ``write`` (``--fresh-memory``, a
    diagnosis, not a method): overwrite the slots with the momentum embeddings, so the memory
    holds the same items with no staleness."""
    out = torch.zeros(5, dtype=torch.float64)
    slots = (slot_rows >= 0).nonzero().flatten()
    if not slots.numel():
        return out
    feats = {k: train[k][slot_rows[slots]] for k in ("img_feat", "txt_feat")}
    img, txt, _ = encoders[0](feats)
    entries = memory.img_KD[slots]
    out[0] = (entries * img.float()).sum().double()
    out[1] = (entries * encoders[1].encode_image(feats).float()).sum().double()
    out[2] = float(slots.numel())
    if write:
        memory.img_KD[slots], memory.txt_KD[slots] = img.float(), txt.float()
    return out


@torch.no_grad()
def _batch_lag(model: DualEncoder, momentum: torch.nn.Module, batch: dict) -> Tensor:
    """(Σ cos, count) of the batch's momentum and online image embeddings: the momentum
    encoder's lag behind the online one, which the batch candidates carry too."""
    cos = (momentum.encode_image(batch) * model.encode_image(batch)).sum(1)
    return torch.stack([cos.sum().double(), torch.tensor(float(cos.numel()), dtype=torch.float64)])


def _yaml_value(v: object) -> str:
    """A config override's value as the CLI parses it (YAML): booleans lower-case, None null."""
    if v is None:
        return "null"
    return str(v).lower() if isinstance(v, bool) else str(v)


def loop_run(variant: str, seed: int, args: argparse.Namespace) -> dict:
    """One run through the CLI itself, ``python -m fne_dist.train`` in a child process, on the
    packaged default config (its data, encoders, heads, memory, schedule and warm-up), one rank
    with the default run's global batch (32), ``--epochs`` epochs, the variant's whole ``fne``
    section.
    A run that exits non-zero is recorded as ``failed`` (its exit status): the goals then fail
    for it. Only the end-of-run test is known (what the CLI reports): ``best_epoch`` is NaN and
    the val-selected columns repeat the end ones."""
    fne = FneConfig(**VARIANTS[variant])
    name = f"{variant}{args.suffix}-s{seed}"
    run_root = args.out / "loop-runs"
    overrides = [f"run.name={name}", f"run.output_dir={run_root}", f"run.seed={seed}",
                 "dist.workers=1", "train.batch_size=32", f"train.epochs={args.epochs}",
                 "checkpoint.at_epoch_end=false"]  # fmt: skip
    if args.features is not None:
        overrides.append(f"data.cache_dir={args.features}")
    if args.momentum is not None:
        overrides.append(f"memory.momentum={args.momentum}")
    if args.memory is not None:
        overrides.append(f"memory.size={args.memory}")
    if args.warmup_epochs is not None:
        overrides.append(f"train.warmup_epochs={args.warmup_epochs}")
    overrides.append(f"memory.encoder={args.memory_encoder}")
    overrides += [f"fne.{f.name}={_yaml_value(getattr(fne, f.name))}" for f in fields(fne)]
    t0 = time.perf_counter()
    # a fresh process per run: the CLI exactly as a user starts it (a process group, its port
    # and the rendezvous environment do not survive into the next run)
    code = subprocess.run([sys.executable, "-m", "fne_dist.train", *overrides]).returncode
    wall = time.perf_counter() - t0
    if code != 0:
        print(f"{name}: python -m fne_dist.train exited {code}", flush=True)
        return {"failed": float(code), "wall_s": wall}
    metrics = json.loads((run_root / name / "metrics.json").read_text())
    test, diag = metrics["test"], metrics.get("diagnostics", {})
    kept = ("fn_", "frac_")
    return {**test, **{f"end_{k}": v for k, v in test.items()}, "best_epoch": math.nan,
            **{k: v for k, v in diag.items() if k.startswith(kept)},
            "staleness": float(metrics.get("staleness") or math.nan), "wall_s": wall}  # fmt: skip


def failed(runs: dict[str, list[dict]], name: str) -> bool:
    """Some run of ``name`` exited non-zero (``--loop``): it cannot pass a goal."""
    return any("failed" in r for r in runs.get(name, []))


def mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def paired_bootstrap(a: list[float], b: list[float], reps: int = 2000) -> tuple[float, float]:
    """95 % interval of mean(a − b) over seeds, resampling the seed pairs."""
    diffs = torch.tensor([x - y for x, y in zip(a, b, strict=True)], dtype=torch.float64)
    if len(diffs) < 2 or torch.isnan(diffs).any():
        return math.nan, math.nan
    idx = torch.randint(
        0, len(diffs), (reps, len(diffs)), generator=torch.Generator().manual_seed(0)
    )
    means = diffs[idx].mean(1)
    return float(means.quantile(0.025)), float(means.quantile(0.975))


def _col(runs: dict[str, list[dict]], name: str, key: str) -> list[float]:
    return [float(r.get(key, math.nan)) for r in runs[name]]


def _beats(runs: dict, a: str, b: str, key: str) -> bool:
    """mean(a − b) over paired seeds exceeds one standard deviation of the differences."""
    diffs = [x - y for x, y in zip(_col(runs, a, key), _col(runs, b, key), strict=True)]
    mean, std = mean_std(diffs)
    return len(diffs) > 1 and not math.isnan(mean) and mean > std


def best_fne(runs: dict[str, list[dict]]) -> str | None:
    """The FNE form (sampled or summed) with the highest mean group rsum, or None."""
    fne_like = [
        v for v in runs if v.startswith("fne") and v != "fne_kernel" and not failed(runs, v)
    ]
    if not fne_like:
        return None
    return max(fne_like, key=lambda v: mean_std(_col(runs, v, "group_rsum"))[0])


def best_oracle(runs: dict[str, list[dict]], key: str = "group_map") -> str | None:
    """The oracle (one per loss family) with the highest mean ``key``, or None."""
    present = [o for o in ORACLES if o in runs]
    return max(present, key=lambda o: mean_std(_col(runs, o, key))[0]) if present else None


def goals(runs: dict[str, list[dict]]) -> list[str]:
    """The goals as PASS/FAIL lines (only those whose variants ran), with the margin: the best
    FNE form against every baseline (vse0, the winner, included), the share of the vse0 →
    best-oracle gap, and the posterior's detection."""
    crashed = [v for v in runs if failed(runs, v)]
    lines = [f"FAIL {v} exited non-zero through the CLI (--loop)" for v in crashed]
    best = best_fne(runs)
    if best is None:
        return lines
    lines.append(f"best FNE configuration (group rsum): {best}")
    if len(runs[best]) < 2:
        lines.append("(one seed: no standard deviation; the '> 1 sd' goals cannot pass)")
    verdict = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    for base in BASELINES:
        if base not in runs:
            continue
        if failed(runs, base):
            lines.append(f"FAIL {base} exited non-zero: no comparison")
            continue
        parts, ok = [], True
        for k in ("group_rsum", "group_map"):
            diffs = [x - y for x, y in zip(_col(runs, best, k), _col(runs, base, k), strict=True)]
            m, sd = mean_std(diffs)
            parts.append(f"{k} {m:+.1f} (sd {sd:.1f})")
            ok = ok and _beats(runs, best, base, k)
        lines.append(f"{verdict(ok)} {best} beats {base} by > 1 sd: " + ", ".join(parts))
    if "vse_pp_batch" in runs:
        a, b = (mean_std(_col(runs, v, "rsum"))[0] for v in (best, "vse_pp_batch"))
        lines.append(f"{verdict(a >= b)} {best} not worse than vse_pp_batch on strict rsum "
                     f"({a - b:+.1f})")  # fmt: skip
    oracle = best_oracle(runs)
    if oracle is not None:
        for base in ("vse0", "vse_pp_batch"):
            if base in runs:
                share = gap_share(runs, best, "group_map", base)
                target = 0.5 if base == "vse0" else 0.75
                lines.append(
                    f"{verdict(share >= target)} {best} recovers {100 * share:.0f}% of the "
                    f"{base} → {oracle} group_map gap (target ≥ {100 * target:.0f}%)"
                )
    if "fne_kernel" in runs:
        ok = _beats(runs, best, "fne_kernel", "group_rsum")
        lines.append(f"{verdict(ok)} posterior's share ({best} − fne_kernel, group rsum) > 1 sd")
    p, r = (mean_std(_col(runs, best, k))[0] for k in ("fn_pfn_precision", "fn_pfn_recall"))
    ok = p >= 0.5 and r >= 0.5
    lines.append(f"{verdict(ok)} P_fn>eps precision {p:.2f} recall {r:.2f} (target ≥ 0.5 each)")
    return lines


def gap_share(
    runs: dict[str, list[dict]], name: str, key: str = "group_map", base: str = "vse0"
) -> float:
    """(x − base) / (best oracle − base) of the means of ``key``; NaN without both."""
    oracle = best_oracle(runs, key)
    if base not in runs or oracle is None:
        return math.nan
    lo = mean_std(_col(runs, base, key))[0]
    hi = mean_std(_col(runs, oracle, key))[0]
    x = mean_std(_col(runs, name, key))[0]
    return (x - lo) / (hi - lo) if hi != lo else math.nan


def table(runs: dict[str, list[dict]]) -> str:
    """Markdown: mean ± std per metric, the gap shares (vse0 → best oracle) and each seed's
    group rsum and group mAP (val-selected)."""
    head = "| variant | n | " + " | ".join(METRICS)
    head += " | gap share vse0→oracle (group rsum) | (group mAP) | group rsum / mAP per seed |"
    lines = [head, "|" + "---|" * (len(METRICS) + 5)]
    for name in runs:
        cells = [str(len(runs[name]))]
        for key in METRICS:
            m, sd = mean_std(_col(runs, name, key))
            scale = 100.0 if key.startswith(("fn_", "frac_")) else 1.0
            digits = 3 if key == "staleness" else 1  # cosines close to 1
            cells.append(
                "n/a" if math.isnan(m) else f"{scale * m:.{digits}f} ± {scale * sd:.{digits}f}"
            )
        for key in ("group_rsum", "group_map"):
            cells.append(f"{100 * gap_share(runs, name, key):.0f}%")
        seeds = " / ".join(
            f"{a:.1f}, {b:.1f}"
            for a, b in zip(
                _col(runs, name, "group_rsum"), _col(runs, name, "group_map"), strict=True
            )
        )
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {seeds} |")
    return "\n".join(lines)


def differences(runs: dict[str, list[dict]]) -> list[str]:
    """Paired bootstrap 95 % interval of each variant minus fne (group rsum, group mAP)."""
    if "fne" not in runs:
        return []
    out = []
    for name in runs:
        if name != "fne":
            parts = []
            for key in ("group_rsum", "group_map"):
                lo, hi = paired_bootstrap(_col(runs, name, key), _col(runs, "fne", key))
                parts.append(f"{key} [{lo:+.1f}, {hi:+.1f}]")
            out.append(f"{name} − fne: " + ", ".join(parts))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny data, 1 seed, 5 variants")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    p.add_argument("--epochs", type=int, default=Setup.epochs)
    p.add_argument("--classes", type=int, default=Setup.classes, help="FN rate ≈ 1/classes")
    p.add_argument("--images", type=int, default=Setup.images)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--features",
        type=Path,
        help="train on a feature cache (data.cache_dir of a default run, e.g. .cache/features: "
        "the embedded emoji with the default encoders) instead of the generator",
    )
    p.add_argument(
        "--from-runs",
        type=Path,
        nargs="+",
        help="no training: render the table, goals and chart from runs.json files (merged in "
        "order; a later file's variant replaces an earlier one's)",
    )
    p.add_argument("--out", type=Path, default=Path("results/quality"))
    # memory diagnosis (bench/results/quality_emoji.md, round 3): override the setup
    p.add_argument("--memory", type=int, help="memory size K (default: the setup's)")
    p.add_argument("--momentum", type=float, help="EMA momentum (default: the setup's)")
    p.add_argument(
        "--fresh-memory",
        action="store_true",
        help="re-encode the memory with the current momentum model every step (no staleness)",
    )
    p.add_argument(
        "--memory-encoder",
        choices=("momentum", "online"),
        default="momentum",
        help="memory.encoder: the momentum (EMA) copy fills the memory, or the online model's "
        "detached embeddings (XBM-style); name the rows apart with --suffix",
    )
    p.add_argument("--suffix", default="", help="appended to each variant's row name")
    p.add_argument(
        "--loop",
        action="store_true",
        help="train each run through the CLI (python -m fne_dist.train, a child process per "
        "run, on the packaged default config: its shards, encoders and feature cache, one "
        "rank, global batch 32) instead of the benchmark's own loop; end-of-run test only",
    )
    p.add_argument(
        "--warmup-epochs",
        type=float,
        help="train.warmup_epochs of the run (default: the packaged default config's)",
    )
    return p.parse_args(argv)


# The default run's head settings on cached features (configs/default.yaml).
FEATURE_SETUP = dict(embed_dim=256, memory=1024, momentum=0.99, lr=1e-3)


def chart(runs: dict[str, list[dict]], path: Path, title: str) -> None:
    """Bar chart of group rsum and group mAP (mean ± std over seeds) per variant (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(runs)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key in zip(axes, ("group_rsum", "group_map"), strict=True):
        stats = [mean_std(_col(runs, n, key)) for n in names]
        ax.bar(range(len(names)), [m for m, _ in stats], yerr=[sd for _, sd in stats], capsize=3)
        lo = min(m - sd for m, sd in stats)
        ax.set_ylim(lo - 0.1 * abs(lo) - 1, None)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
        ax.set_title(key)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(runs: dict[str, list[dict]], title: str, out: Path) -> str:
    """Table, differences and goals as markdown; written with runs.json and chart.png."""
    report = "\n".join([title, "", table(runs), "", *differences(runs), "", *goals(runs)])
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(report + "\n")
    (out / "runs.json").write_text(json.dumps(runs, indent=1))
    chart(runs, out / "chart.png", title.removeprefix("# "))
    return report


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    args = parse_args(argv)
    if args.from_runs:
        runs = {}
        for path in args.from_runs:
            runs |= json.loads(path.read_text())
        print(
            render(
                runs, f"# FNE quality benchmark (from {len(args.from_runs)} run file(s))", args.out
            )
        )
        return runs
    torch.set_num_threads(args.threads)
    s = Setup(epochs=args.epochs, classes=args.classes, images=args.images, **cli_schedule())
    variants, seeds = args.variants, args.seeds
    if args.smoke:
        s = replace(s, images=240, epochs=3, memory=64, batch=16)
        variants, seeds = list(SMOKE_VARIANTS), seeds[:1]
    if args.features:
        data = load_cached_features(args.features)
        dims = dict(
            img_dim=data["train"]["img_feat"].shape[1], txt_dim=data["train"]["txt_feat"].shape[1]
        )
        s = replace(s, **FEATURE_SETUP, **dims, images=0, classes=0)
    else:
        data = make_data(s)
    overrides = {"memory": args.memory, "momentum": args.momentum}
    s = replace(s, **{k: v for k, v in overrides.items() if v is not None})
    s = replace(s, fresh_memory=args.fresh_memory, memory_encoder=args.memory_encoder)
    if args.warmup_epochs is not None:
        s = replace(s, warmup_epochs=args.warmup_epochs)
    runs: dict[str, list[dict]] = {}
    for variant in variants:
        cfg = FneConfig(**VARIANTS[variant])
        name = variant + args.suffix
        runs[name] = []
        for seed in seeds:  # runs.json after each seed: a slow set survives an interruption
            if args.loop:
                runs[name].append(loop_run(variant, seed, args))
            else:
                runs[name].append(train_run(cfg, data, s, seed))
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "runs.json").write_text(json.dumps(runs, indent=1))
        m = runs[name]
        per_seed = " / ".join(f"{r.get('group_rsum', math.nan):.1f}" for r in m)
        wall = sum(r["wall_s"] for r in m)
        print(f"{name:<18} group rsum {per_seed}  ({wall:.1f} s)", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)  # partial results survive an interruption
        (args.out / "runs.json").write_text(json.dumps(runs, indent=1))
    source = f"features {args.features}" if args.features else "generator"
    title = f"# FNE quality benchmark ({source}; {len(seeds)} seed(s): {seeds}; {s})"
    print(render(runs, title, args.out))
    return runs


if __name__ == "__main__":
    main()

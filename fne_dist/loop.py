"""The one training loop, for every launcher (fne-algorithm.md "Step order").

Legend: B local batch, G = W·B global batch, K memory, D embedding dim, W world size.

One step, in phases (only 3 and 4 communicate; both are identities at W = 1):
  1. online embeddings (DeepSpeed engine)      2. momentum embeddings (no grad)
  3. all-gather momentum embeddings + ids        4. local statistics → all-reduce (6 float64)
  5. loss: warm-up in-batch vse_pp, then the configured loss over [gathered batch ; memory]
  6. backward + optimizer step (DeepSpeed: clipping, schedule, ZeRO)
  7. EMA of the momentum model (every optimizer step)
  8. enqueue the gathered block (identical on every rank), report.
The loop never learns which launcher started it: it reads ranks from torch.distributed.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import Tensor

from . import distributed as D
from .config import Config, save_config
from .data.pairs import PairTable, load_pairs, resolve_shards
from .distributed.device import backend_for, select_device
from .distributed.launch import init_process_group, rank_env
from .encoders import (
    ImageBackbone,
    TextBackbone,
    build_image_backbone,
    build_text_backbone,
    check_available,
)
from .engine import build_engine, gathered_parameters
from .fne import SimilarityStats
from .memory import MomentumMemory
from .model import DualEncoder, build_dual_encoder, cached_features
from .momentum import ema_update, make_momentum_copy
from .reporting import ConsoleReporter, FanOut, JsonLinesReporter, Reporter
from .retrieval_metrics import retrieval_metrics
from .step import forward_step
from .timing import NullTimer, PhaseTimer

SPLITS = ("train", "val", "test")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Split:
    """A split ready for the loop: its table plus either cached features or raw inputs."""

    table: PairTable
    inputs: dict[str, Tensor]  # img_feat/txt_feat (frozen towers) or pixels/input_ids/mask

    def batch(self, caption_idx_B: Tensor) -> dict[str, Tensor]:
        """The training pairs of the given captions: each with its image."""
        image_idx_B = self.table.text_to_image_T[caption_idx_B]
        out = {
            "ids": self.table.image_ids_I[image_idx_B],
            "groups": self.table.groups_I[image_idx_B],
        }
        for key, value in self.inputs.items():
            out[key] = value[image_idx_B] if key in ("img_feat", "pixels") else value[caption_idx_B]
        return out


def prepare_splits(
    cfg: Config,
    image_backbone: ImageBackbone,
    text_backbone: TextBackbone,
    only: tuple[str, ...] = SPLITS,
) -> dict[str, Split]:
    """Load splits and cache the features of frozen towers (fail fast on bad paths)."""
    for split in only:  # every path is checked before any heavy work starts
        resolve_shards(getattr(cfg.data, split), f"data.{split}")
    splits = {}
    for split in only:
        shards = resolve_shards(getattr(cfg.data, split), f"data.{split}")
        table = load_pairs(
            getattr(cfg.data, split),
            f"data.{split}",
            image_backbone.preprocess,
            cfg.data.caption_key,
        )
        identity = {
            "format": 1,  # bump when preprocessing or pooling changes what a feature means
            "shards": [(Path(p).name, Path(p).stat().st_size) for p in shards],
            "caption_key": cfg.data.caption_key,
            "image": [
                cfg.model.image.type,
                cfg.model.image.name_or_path,
                cfg.model.image.image_size,
            ],
            "text": [cfg.model.text.type, cfg.model.text.name_or_path, cfg.model.text.max_length],
        }
        inputs = cached_features(
            table,
            image_backbone if cfg.model.image.frozen else None,
            text_backbone if cfg.model.text.frozen else None,
            Path(cfg.data.cache_dir),
            identity,
        )
        if not cfg.model.image.frozen:
            inputs["pixels"] = table.images_I
        if not cfg.model.text.frozen:
            tokens = text_backbone.tokenize(table.captions)
            inputs.update(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        splits[split] = Split(table, inputs)
    return splits


@torch.no_grad()
def embed_split(model: DualEncoder, split: Split, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """Online embeddings of a split's images (I×D) and captions (T×D), in eval mode."""
    was_training = model.training
    model.eval()
    t = split.table
    device = next(model.parameters()).device
    img_parts, txt_parts = [], []
    for start in range(0, t.num_images, batch_size):
        idx = torch.arange(start, min(start + batch_size, t.num_images))
        batch = {
            k: v[idx].to(device) for k, v in split.inputs.items() if k in ("img_feat", "pixels")
        }
        img_parts.append(model.encode_image(batch).float().cpu())
    for start in range(0, t.num_captions, batch_size):
        idx = torch.arange(start, min(start + batch_size, t.num_captions))
        batch = {
            k: v[idx].to(device)
            for k, v in split.inputs.items()
            if k in ("txt_feat", "input_ids", "attention_mask")
        }
        txt_parts.append(model.encode_text(batch).float().cpu())
    model.train(was_training)
    return torch.cat(img_parts), torch.cat(txt_parts)


def evaluate(model: DualEncoder, split: Split) -> dict[str, float]:
    """Strict and group-aware R@K both ways on a whole split, with the online encoders."""
    img_ID, txt_TD = embed_split(model, split)
    t = split.table
    return retrieval_metrics(img_ID @ txt_TD.T, t.text_to_image_T, t.groups_I)


def evaluate_in_run(engine, split: Split, is_main: bool) -> dict[str, float] | None:
    """Evaluate the engine's model during a run: on rank 0, or under ZeRO-3 on every rank
    (each forward gathers partitioned parameters collectively, so all ranks must take part)."""
    if engine.zero_optimization_stage() == 3:
        metrics = evaluate(engine.module, split)
        return metrics if is_main else None
    metrics = evaluate(engine.module, split) if is_main else None
    D.barrier()
    return metrics


def _model_inputs(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def preflight(cfg: Config) -> None:
    """Checks that need no process group: every shard pattern matches, every encoder is here.
    Launchers call it before starting workers."""
    for split in SPLITS:
        resolve_shards(getattr(cfg.data, split), f"data.{split}")
    check_available(cfg.model.image, cfg.model.text)


def train(cfg: Config, extra_reporter: Reporter | None = None) -> dict:
    """Train and evaluate as configured; returns the metrics written to metrics.json.

    extra_reporter receives the logged metrics on every rank (e.g. Ray's); rank 0 also reports
    to the console and to the run's train_log.jsonl.
    """
    t_start = time.perf_counter()
    # 1. fail fast on what a user can get wrong: every shard path, every encoder name
    preflight(cfg)
    image_backbone = build_image_backbone(cfg.model.image)
    text_backbone = build_text_backbone(cfg.model.text)

    # 2. process: ranks, device, threads, seeds (identical model init on every rank)
    env = rank_env()
    device = select_device(cfg.engine.device, env.local_rank)
    torch.set_num_threads(cfg.run.threads)
    seed_everything(cfg.run.seed)
    created_group = init_process_group(env, backend_for(device), cfg.engine.init_timeout_s)
    try:
        result = _train(cfg, extra_reporter, image_backbone, text_backbone, device, t_start)
        if created_group:
            D.barrier()  # no rank tears the group down while another still uses it
        return result
    finally:
        if created_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(
    cfg: Config,
    reporter: Reporter | None,
    image_backbone: ImageBackbone,
    text_backbone: TextBackbone,
    device: torch.device,
    t_start: float,
) -> dict:
    """Phases 2-5 of ``train`` inside an initialised process group."""
    rank, world = D.rank(), D.world_size()
    is_main = rank == 0
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    splits = prepare_splits(cfg, image_backbone, text_backbone)  # frozen towers: cached
    train_split = splits["train"]

    # 3. model, momentum model, engine, memory, statistics
    B, G = cfg.train.batch_size, cfg.train.batch_size * world
    n_train = train_split.table.num_captions
    micro_per_epoch = n_train // G
    if micro_per_epoch == 0:
        raise ValueError(f"train.batch_size × world size = {G} exceeds the {n_train} train pairs")
    total_micro = max(1, math.ceil(cfg.train.epochs * micro_per_epoch))
    total_steps = max(1, total_micro // cfg.engine.grad_accum)
    model = build_dual_encoder(cfg.model, image_backbone, text_backbone, cfg.fne.temperature)
    momentum = make_momentum_copy(model).to(device)
    engine = build_engine(model, cfg, total_steps)
    memory = MomentumMemory(cfg.memory.size, cfg.model.embed_dim, seed=cfg.run.seed, device=device)
    stats = SimilarityStats(cfg.fne.stats_reset, cfg.fne.no_pos_mu, device=device)
    reporters = [reporter or Reporter()]
    if is_main:
        reporters += [
            ConsoleReporter(total_steps, G * cfg.engine.grad_accum, cfg.train.log_every),
            JsonLinesReporter(run_dir / "train_log.jsonl"),
        ]
    reporter = FanOut(*reporters)
    reporter.message(
        f"rank {rank}/{world} on {device}: {n_train} train pairs, {total_steps} steps of "
        f"{G} pairs, loss={cfg.fne.loss} after {cfg.train.warmup_steps} warm-up steps, "
        f"K={memory.capacity}"
    )

    # 4. the loop
    sums: dict[str, Tensor] = {}
    history: list[dict] = []
    last_logged: dict[str, float] = {}
    stale = torch.zeros(2, dtype=torch.float64, device=device)
    epoch = -1
    order = torch.empty(0, dtype=torch.long)
    opt_step = 0
    timer = PhaseTimer(device) if cfg.train.profile_phases else NullTimer()
    t_loop = time.perf_counter()
    for micro in range(total_micro):
        if micro // micro_per_epoch != epoch:
            epoch = micro // micro_per_epoch
            stats.new_epoch()
            gen = torch.Generator().manual_seed(cfg.run.seed * 1000 + epoch)
            order = torch.randperm(n_train, generator=gen)  # the same on every rank
        first = (micro % micro_per_epoch) * G + rank * B
        with timer.phase("data"):
            batch = _model_inputs(train_split.batch(order[first : first + B]), device)
        warm = opt_step < cfg.train.warmup_steps
        out = forward_step(  # phases 1-5
            engine, momentum, batch, memory, stats, cfg.fne, cfg.run.seed, micro, warm, timer
        )
        with timer.phase("backward_step"):
            engine.backward(out.loss)  # 6
            engine.step()  # DeepSpeed steps the optimizer only at accumulation boundaries
        boundary = (micro + 1) % cfg.engine.grad_accum == 0
        if boundary:
            with timer.phase("ema"), gathered_parameters(engine):  # ZeRO-3: full parameters
                ema_update(momentum, engine.module, cfg.memory.momentum)  # 7
            opt_step += 1
        if not warm:  # 8: the reference fills the memory only after the warm-up
            g = out.gathered
            with timer.phase("enqueue"):
                memory.enqueue(g.img_ND, g.txt_ND, g.ids_N, g.groups_N)
        stale += out.staleness

        for key, value in {"loss": out.loss.detach(), **out.diagnostics}.items():
            sums[key] = sums.get(key, 0.0) + value.detach().to(torch.float64)
        sums["_n"] = sums.get("_n", 0.0) + 1.0
        log_now = (micro + 1) % cfg.train.log_every == 0 or micro + 1 == total_micro
        if log_now:
            n = float(sums.pop("_n"))
            metrics = {k: float(v) / n for k, v in sums.items()}
            metrics.update(epoch=epoch, lr=engine.get_lr()[0], warmup=float(warm))
            if float(stale[1]) > 0:
                metrics["staleness"] = float(stale[0] / stale[1])
            history.append({"step": opt_step, **metrics})
            last_logged = metrics
            reporter.step(micro, metrics)
            sums = {}
        if boundary and cfg.train.eval_every and opt_step % cfg.train.eval_every == 0:
            val = evaluate_in_run(engine, splits["val"], is_main)
            if is_main:
                reporter.message(
                    f"step {opt_step}: val rsum {val['rsum']:.2f} "
                    f"group rsum {val['group_rsum']:.2f}"
                )
                history.append({"step": opt_step, "val": val})

    # 5. final evaluation, summary and run directory
    loop_time = time.perf_counter() - t_loop
    D.barrier()
    result: dict = {}
    final_val = evaluate_in_run(engine, splits["val"], is_main)
    final_test = evaluate_in_run(engine, splits["test"], is_main)
    with gathered_parameters(engine):  # ZeRO-3: whole tensors, on every rank (collective)
        weights = {
            k: v.detach().float().cpu().clone().contiguous()
            for k, v in engine.module.state_dict().items()
        }
    if is_main:
        result = {
            "val": final_val,
            "test": final_test,
            "diagnostics": last_logged,
            "staleness": float(stale[0] / stale[1]) if float(stale[1]) > 0 else None,
            "steps": opt_step,
            "loop_time_s": loop_time,
            "samples_per_s": total_micro * G / max(loop_time, 1e-9),
            "phase_seconds": timer.totals(),
            "world_size": world,
            "wall_time_s": time.perf_counter() - t_start,
        }
        save_file(weights, str(run_dir / "model.safetensors"))
        (run_dir / "metrics.json").write_text(json.dumps({**result, "history": history}, indent=1))
        reporter.message(format_summary(result, run_dir))
    reporter.finish(result)
    reporter.close()
    return result


def build_engine_for(model, cfg: Config, total_steps: int):
    from .engine import build_engine

    return build_engine(model, cfg, total_steps)


def format_summary(result: dict, run_dir: Path) -> str:
    """The printed summary: strict and group-aware retrieval, FNE diagnostics, wall time."""
    t, d = result["test"], result["diagnostics"]
    staleness = float("nan") if result["staleness"] is None else result["staleness"]
    lines = [
        "=" * 72,
        f"test  i2t R@1/5/10 {t['i2t_r1']:.1f}/{t['i2t_r5']:.1f}/{t['i2t_r10']:.1f}   "
        f"t2i R@1/5/10 {t['t2i_r1']:.1f}/{t['t2i_r5']:.1f}/{t['t2i_r10']:.1f}   "
        f"rsum {t['rsum']:.1f}",
        f"test  group-aware rsum {t['group_rsum']:.1f}   (val rsum {result['val']['rsum']:.1f}, "
        f"group {result['val']['group_rsum']:.1f})",
    ]
    if d:
        gate = "open" if d.get("gate_open", 0) >= 0.5 else "closed"
        lines.append(
            f"FNE   gate {gate}, positives this epoch {d.get('n_pos', float('nan')):.0f}, "
            f"P_fn>eps {100 * d.get('frac_pfn_gt_eps', float('nan')):.2f}% of candidates, "
            f"sampled negatives sharing the anchor's family "
            f"{100 * d.get('frac_neg_same_group', float('nan')):.1f}%"
        )
        lines.append(
            f"FNE   zero-hinge draws {100 * d.get('frac_zero_hinge', float('nan')):.1f}%, "
            f"fallbacks {d.get('fallback', 0):.2f}/step, "
            f"no violator {d.get('no_violator', 0):.2f}/step, staleness {staleness:.3f}"
        )
    lines += [
        f"steps {result['steps']} on {result['world_size']} rank(s), wall time "
        f"{result['wall_time_s']:.1f} s, run directory {run_dir}",
        "=" * 72,
    ]
    return "\n".join(lines)

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
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import Tensor

from . import distributed as D
from .config import Config, save_config
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
from .epochs import DataLog, agreed_batches
from .evaluation import evaluate_table
from .fne import SimilarityStats
from .inputs import SPLITS, eval_table, raw_shards, split_shards, train_stream
from .memory import MomentumMemory
from .model import build_dual_encoder
from .momentum import ema_update, make_momentum_copy
from .reporting import ConsoleReporter, FanOut, JsonLinesReporter, Reporter
from .step import forward_step
from .timing import NullTimer, PhaseTimer


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _model_inputs(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def preflight(cfg: Config) -> None:
    """Checks that need no process group: every shard pattern matches, every encoder is here.
    Launchers call it before starting workers."""
    for split in SPLITS:
        raw_shards(cfg, split)
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
    env = rank_env()
    shards = {
        split: split_shards(
            cfg,
            split,
            image_backbone,
            text_backbone,
            env.local_rank,
            env.local_world_size,
            log=lambda m: print(m, flush=True),
        )
        for split in SPLITS
    }
    stream = train_stream(cfg, shards["train"], image_backbone, text_backbone, rank, world)
    tables = {
        s: eval_table(cfg, s, shards[s], image_backbone, rank, world) for s in ("val", "test")
    }

    # 3. model, momentum model, engine, memory, statistics
    G = cfg.train.batch_size * world
    n_train = stream.samples_per_epoch
    micro_per_epoch = stream.steps_per_epoch
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
    opt_step = 0
    timer = PhaseTimer(device) if cfg.train.profile_phases else NullTimer()
    data_log = DataLog(stream, reporter)
    n_micro, epoch = 0, -1

    def log_window(micro: int, epoch: int, warm: bool) -> dict[str, float]:
        """Mean of the diagnostics since the last log line → reporters and history."""
        n = float(sums.pop("_n"))
        metrics = {k: float(v) / n for k, v in sums.items()}
        metrics.update(epoch=epoch, lr=engine.get_lr()[0], warmup=float(warm))
        if float(stale[1]) > 0:
            metrics["staleness"] = float(stale[0] / stale[1])
        history.append({"step": opt_step, **metrics})
        reporter.step(micro, metrics)
        sums.clear()
        return metrics

    t_loop = time.perf_counter()
    for micro, batch_epoch, batch in agreed_batches(stream, total_micro, data_log, timer, device):
        if batch_epoch != epoch:
            epoch = batch_epoch
            stats.new_epoch()
        n_micro += 1
        batch = _model_inputs(batch, device)
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
        if (micro + 1) % cfg.train.log_every == 0 or micro + 1 == total_micro:
            last_logged = log_window(micro, epoch, warm)
        if boundary and cfg.train.eval_every and opt_step % cfg.train.eval_every == 0:
            val = evaluate_table(engine.module, tables["val"])
            if is_main:
                reporter.message(
                    f"step {opt_step}: val rsum {val['rsum']:.2f} "
                    f"group rsum {val['group_rsum']:.2f}"
                )
                history.append({"step": opt_step, "val": val})

    if sums:  # the last epoch ended early (bad samples): log what is left
        last_logged = log_window(micro, epoch, warm)

    # 5. final evaluation, summary and run directory
    loop_time = time.perf_counter() - t_loop
    D.barrier()
    result: dict = {}
    final_val = evaluate_table(engine.module, tables["val"])
    final_test = evaluate_table(engine.module, tables["test"])
    data_counts = data_log.totals(device)
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
            "samples_per_s": n_micro * G / max(loop_time, 1e-9),
            "phase_seconds": timer.totals(),
            "data": data_counts,
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

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

from . import checkpoint as ckpt
from . import distributed as D
from .config import Config, config_text, save_config
from .data.stream import RankPosition
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

    # 4. resume (Ray's checkpoint after a restart, else checkpoint.resume), then the loop
    sums: dict[str, Tensor] = {}
    history: list[dict] = []
    last_logged: dict[str, float] = {}
    stale = torch.zeros(2, dtype=torch.float64, device=device)
    opt_step = 0
    timer = PhaseTimer(device) if cfg.train.profile_phases else NullTimer()
    data_log = DataLog(stream, reporter)
    n_micro, epoch = 0, -1
    ckpt_root = cfg.checkpoint.dir or str(run_dir / "checkpoints")
    # a URL checkpoint.dir: written here first, then uploaded (and downloaded to resume)
    local_root = run_dir / "checkpoints-local" if ckpt.is_url(ckpt_root) else Path(ckpt_root)
    layout = {
        "world_size": world,
        "loader_workers": stream.opts.consumers,
        "batch_size": cfg.train.batch_size,
        "grad_accum": cfg.engine.grad_accum,
    }
    position = None
    resume_dir = _resume_dir(cfg, reporter, ckpt_root, local_root / f"resume-rank{rank}")
    if resume_dir is not None:
        meta = ckpt.validate(resume_dir)
        restored = ckpt.load_run_checkpoint(
            resume_dir, meta, layout, engine, momentum, memory, stats, rank
        )
        c = restored.counters
        opt_step, n_micro, epoch = c["opt_step"], c["n_micro"], c["epoch"]
        stale = torch.tensor(c["stale"], dtype=torch.float64, device=device)
        sums = {
            k: torch.tensor(v, dtype=torch.float64, device=device) for k, v in c["sums"].items()
        }
        history, last_logged = c["history"], c["last_logged"]
        position = RankPosition.from_dict(restored.data_position)
        if position.step >= stream.steps_per_epoch:
            epoch = -1  # saved at an epoch's end: the next epoch resets the statistics
        reporter.message(
            f"resumed from {resume_dir} (optimizer step {opt_step}, epoch {position.epoch}, "
            f"batch {position.step} of {stream.steps_per_epoch})"
        )

    def save_checkpoint(micro: int) -> None:
        counters = {
            "opt_step": opt_step,
            "n_micro": n_micro,
            "micro": micro,
            "epoch": epoch,
            "stale": stale.tolist(),
            "sums": {k: float(v) for k, v in sums.items()},
            "history": history if is_main else [],
            "last_logged": last_logged,
            "samples_seen": n_micro * G,
        }
        position_dict = data_log.position.to_dict() if data_log.position else None
        path = ckpt.save_run_checkpoint(
            local_root,
            opt_step,
            engine,
            momentum,
            memory,
            stats,
            config_text(cfg),
            ckpt.RankState(counters, position_dict),
            full_weights(engine),
            {
                **layout,
                "run_id": cfg.run.id,
                "step": opt_step,
                "micro": micro,
                "epoch": epoch,
                "samples_seen": n_micro * G,
            },
            1 if ckpt.is_url(ckpt_root) else cfg.checkpoint.keep_last,
            rank,
            D.barrier,
        )
        reporter.checkpoint(path, opt_step, is_main)
        where = str(path)
        if ckpt.is_url(ckpt_root) and is_main:
            where = ckpt.upload(path, ckpt_root, cfg.checkpoint.keep_last)
        D.barrier()  # resuming ranks must never see a half-uploaded newest checkpoint
        reporter.message(f"checkpoint {where}")

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
    micro, saved_at = -1, opt_step
    warm = opt_step < cfg.train.warmup_steps
    batches = agreed_batches(stream, total_micro, data_log, timer, resume=position)
    for micro, batch_epoch, batch in batches:
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
        epoch_end = data_log.position.step == micro_per_epoch
        if boundary and (
            (cfg.checkpoint.every_steps and opt_step % cfg.checkpoint.every_steps == 0)
            or (cfg.checkpoint.at_epoch_end and epoch_end)
        ):
            save_checkpoint(micro)
            saved_at = opt_step
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
    if cfg.checkpoint.at_epoch_end and saved_at != opt_step and micro >= 0:
        save_checkpoint(micro)  # the end of training is an epoch end too

    # 5. final evaluation, summary and run directory
    loop_time = time.perf_counter() - t_loop
    D.barrier()
    result: dict = {}
    final_val = evaluate_table(engine.module, tables["val"])
    final_test = evaluate_table(engine.module, tables["test"])
    data_counts = data_log.totals(device)
    weights = full_weights(engine)
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


def _resume_dir(cfg: Config, reporter: Reporter, root: str, local_root: Path) -> Path | None:
    """Where to resume from: after a Ray worker-group restart, the newer of the checkpoint Ray
    registered and the newest valid one this run (``run.id``) wrote to checkpoint.dir — a
    worker can die between writing a checkpoint and Ray registering it; otherwise
    ``checkpoint.resume`` (``latest`` or a path), else nothing. A checkpoint.dir URL is read
    through fsspec (downloaded to ``local_root``)."""

    def newest(run_id: str | None) -> tuple[Path, dict]:
        if ckpt.is_url(root):
            return ckpt.find_resumable_remote(root, local_root, reporter.message, run_id)
        return ckpt.find_resumable("latest", Path(root), reporter.message, run_id)

    candidates = []
    registered = reporter.resume_source()
    if registered is not None:
        candidates.append((ckpt.validate(registered)["step"], registered))
    if cfg.run.id:
        try:
            path, meta = newest(cfg.run.id)
            candidates.append((meta["step"], path))
        except ckpt.CheckpointError:
            pass  # nothing of this run yet: a first attempt
    if candidates:
        return max(candidates)[1]
    spec = cfg.checkpoint.resume
    if not spec:
        return None
    if spec == "latest":
        return newest(None)[0]
    if ckpt.is_url(spec):
        parent, name = spec.rstrip("/").rsplit("/", 1)
        return ckpt.download(parent, name, local_root)
    return Path(spec)


def full_weights(engine) -> dict[str, Tensor]:
    """The model's fp32 weights, whole (ZeRO-3 gathers them: a collective on every rank)."""
    with gathered_parameters(engine):
        return {
            k: v.detach().float().cpu().clone().contiguous()
            for k, v in engine.module.state_dict().items()
        }


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
            f"in the hard-cut window {100 * d.get('frac_in_window', float('nan')):.2f}%, "
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

"""The one training loop, for every launcher (docs/algorithm.md "Step order").

Legend: B local batch, G = W·B global batch, K memory, D embedding dim, W world size.

One step, in phases (only 3 and 4 communicate; both are identities at W = 1):
  1. online embeddings (DeepSpeed engine)      2. momentum embeddings (no grad)
  3. all-gather momentum embeddings + ids (+ the next step's data vote, on the host)
  4. local statistics → all-reduce (6 float64)
  5. loss: warm-up in-batch vse_pp, then the configured loss over [gathered batch ; memory]
  6. backward + optimizer step (DeepSpeed: clipping, schedule, ZeRO)
  7. EMA of the momentum model (every optimizer step)
  8. enqueue the gathered block (identical on every rank), report.
The loop never learns which launcher started it: it reads ranks from torch.distributed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from . import distributed as dist_ops
from .checkpoint.collective import Parts
from .checkpoint.format import CheckpointError, write_error
from .checkpointer import (
    Checkpointer,
    LauncherCheckpoints,
    check_checkpoint_dir,
    checkpoint_root,
    local_checkpoint_dir,
)
from .config import Config, resolve_batch, save_config
from .data.splits import PairTable
from .data.stream import TrainStream
from .distributed.device import backend_for, select_device, threads_per_rank
from .distributed.launch import Timeouts, init_process_group, rank_env
from .encoders import check_available
from .engine import (
    build_engine,
    checked_grads_finite,
    full_weights,
    gathered_parameters,
    partitioned_optimizer,
    time_gradient_reduction,
)
from .epochs import DataLog, Lookahead, agreed_batches
from .export import write_sidecar
from .fne import SimilarityStats
from .interrupt import Interrupted, StopRequest, handle_signals
from .loop_inputs import (
    SPLITS,
    eval_table,
    raw_shards,
    split_shards,
    towers_to_load,
    train_stream,
)
from .memory import build_memory
from .momentum import ema_update, make_momentum_copy
from .monitoring import build_monitor, last_grad_norm, process_launcher
from .nonfinite import check_in_row, finite_everywhere, poisoned
from .plot import NoPictures, RunPictures
from .reporters import (
    ConsoleReporter,
    FanOut,
    JsonLinesReporter,
    Progress,
    Reporter,
    TensorBoardReporter,
    format_summary,
    json_safe,
    setup_logging,
)
from .run_lock import owned
from .run_summary import group_rsum_text
from .running_stats import PendingRunningStats, deferred_running_stats
from .sharded_eval import evaluate_table
from .shared_prefix import OnlineMemory, SharedPrefix
from .sizing import check_fits, launch_warnings
from .state import TrainState
from .step import StepOutput, StepPosition, forward_step
from .timing import NullTimer, PhaseTimer, Timeline
from .towers import Towers

log = logging.getLogger("fne_dist")


def train(
    cfg: Config,
    extra_reporter: Reporter | None = None,
    launcher_checkpoints: LauncherCheckpoints | None = None,
) -> dict:
    """Train and evaluate as configured; returns the metrics written to metrics.json.

    extra_reporter receives the logged metrics on every rank (e.g. Ray's); rank 0 also reports
    to the console and to the run's train_log.jsonl. launcher_checkpoints: a launcher's own
    record of the run's checkpoints (Ray Train's), told of each one and asked on resume.
    """
    timeline = Timeline()
    setup_logging()  # every launcher's process passes here: "[rank r] ..." on stdout
    # 1. fail fast on what a user can get wrong: every shard path, every encoder name
    preflight(cfg)
    towers = Towers(cfg.model)  # a frozen tower with a complete feature cache is never loaded
    towers.build(towers_to_load(cfg))
    timeline.mark("towers_built")

    # 2. process: ranks, device, threads, seeds (identical model init on every rank)
    env, launcher = rank_env(), process_launcher()  # before the group sets RANK & co.
    cfg = resolve_batch(cfg, env.world_size)  # train.global_batch_size as a per-rank batch
    device = select_device(cfg.engine.device, env.local_rank)
    check_fits(cfg, device, env.world_size, env.local_world_size)  # before anything allocates
    torch.set_num_threads(threads_per_rank(cfg.run.threads, env.local_world_size))
    seed_everything(cfg.run.seed)
    created_group = init_process_group(env, backend_for(device), Timeouts.from_config(cfg))
    timeline.mark("group_ready")
    try:
        # one live run per run directory and per checkpoint.dir; a signal stops the run
        # between steps
        run_dir = run_directory(cfg)
        owner = owned(run_dir, dist_ops.rank(), local_checkpoint_dir(cfg, run_dir), cfg.run.name)
        with owner, handle_signals() as stop:
            hooks = Hooks(extra_reporter, launcher_checkpoints, stop)
            result = _train(cfg, hooks, towers, device, launcher, timeline)
        if created_group:
            dist_ops.barrier()  # no rank tears the group down while another still uses it
        return result
    finally:
        if created_group and dist.is_initialized():
            dist.destroy_process_group()


def run_directory(cfg: Config) -> Path:
    return Path(cfg.run.output_dir) / cfg.run.name


def preflight(cfg: Config) -> None:
    """Checks that need no process group: every shard pattern matches, every encoder is here.
    Launchers call it before starting workers."""
    for split in SPLITS:
        raw_shards(cfg, split)
    check_available(cfg.model.image, cfg.model.text)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _train(
    cfg: Config,
    hooks: Hooks,
    towers: Towers,
    device: torch.device,
    launcher: str,
    timeline: Timeline,
) -> dict:
    """Phases 3-5 of ``train`` inside an initialised process group."""
    # 3. run directory, data, model, momentum model, engine, memory, statistics, reporters
    run = setup_run(cfg, hooks, towers, device, launcher, timeline)
    timeline.mark("engine_ready")
    # 4. resume (a launcher's checkpoint after a restart, else checkpoint.resume), the loop
    state = resume_or_start(run)
    run.reporter.progress(progress(run, state))  # the metrics' baseline
    timeline.mark("loop_start")
    t_loop = time.perf_counter()
    stop = hooks.stop
    batches = agreed_batches(
        run.stream,
        run.total_micro,
        run.data_log,
        run.timer,
        resume=state.position,
        stop=stop,
        ahead=run.ahead,
    )
    for micro, epoch, batch in batches:
        boundary = train_step(run, state, micro, epoch, batch)
        if (micro + 1) % cfg.train.log_every == 0 or micro + 1 == run.total_micro:
            with run.timer.phase("log"):
                log_window(run, state)
        if boundary:
            epoch_end = run.data_log.position.step == run.stream.steps_per_epoch
            with run.timer.phase("checkpoint"):
                run.checkpointer.maybe_save(state, epoch_end)
            with run.timer.phase("evaluate"):
                maybe_evaluate(run, state)
    if stop is not None and stop.agreed:
        stop_on_signal(run, state, stop)
    timeline.mark("loop_end")
    end_of_training(run, state)
    loop_time = time.perf_counter() - t_loop  # the last checkpoint included, as always
    timeline.mark("last_checkpoint")
    # 5. final evaluation, summary and run directory
    return finish(run, state, loop_time, timeline)


@dataclass
class Hooks:
    """What the launcher and the process hand the loop: a reporter of the launcher's own (Ray
    Train's metrics), the launcher's record of checkpoints (Ray Train's), and the stop request
    a signal sets."""

    reporter: Reporter | None = None
    checkpoints: LauncherCheckpoints | None = None
    stop: StopRequest | None = None


@dataclass
class Run:
    """What stays fixed during a run: the config, this rank's place, the data, the stateful
    parts a checkpoint holds, where checkpoints go, and where reports go."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    run_dir: Path
    stream: TrainStream
    tables: dict[str, PairTable]  # val and test, evaluated during and after training
    total_micro: int
    parts: Parts  # engine, momentum model, memory, statistics
    checkpointer: Checkpointer  # resume, and when and where to save
    reporter: Reporter
    timer: PhaseTimer | NullTimer
    data_log: DataLog
    pictures: RunPictures  # rank 0's (plots/); a null object elsewhere
    encoders: SharedPrefix | OnlineMemory  # the step's online and momentum forwards
    # the next step's data agreement, voted during a step (``epochs.Lookahead``)
    ahead: Lookahead = field(default_factory=Lookahead)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def vote_rides(self) -> bool:
        """Whether the next step's data vote rides on a step's gather: with ranks to agree,
        and on the host, where reading the agreed value back waits for nothing (a device's
        gather would have to finish first: there the vote is a gloo all-reduce of its own)."""
        return self.world > 1 and self.device.type == "cpu"

    @property
    def global_batch(self) -> int:
        return self.cfg.train.batch_size * self.world


def setup_run(
    cfg: Config,
    hooks: Hooks,
    towers: Towers,
    device: torch.device,
    launcher: str,
    timeline: Timeline | None = None,
) -> Run:
    """Everything a run builds before its first step, in the order the seeded initialisation
    relies on; rank 0 also writes the run directory's config (resolved: the checkpoints' copy
    is the same text) and reports to the console."""
    rank, world = dist_ops.rank(), dist_ops.world_size()
    run_dir = run_directory(cfg)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    check_checkpoint_dir(checkpoint_root(cfg, run_dir), rank, world)  # one dir for every node
    # the metrics endpoint first: the feature-cache build in open_data can take minutes, and
    # its progress (fne_task_progress{task="feature_cache"}) is exported while it runs
    monitor = build_monitor(cfg, run_dir, launcher, device)
    stop = hooks.stop
    stop_reason = (lambda: stop.signal_name) if stop is not None else (lambda: None)
    stream, tables = open_data(cfg, towers, rank, world, stop_reason)
    if timeline is not None:
        timeline.mark("data_ready")
    cfg = resolve_warmup(cfg, stream.steps_per_epoch)
    if rank == 0:  # once, resolved: what the checkpoints hold and a resume compares
        save_config(cfg, run_dir / "config.yaml")
    total_micro = max(1, math.ceil(cfg.train.epochs * stream.steps_per_epoch))
    total_steps = max(1, total_micro // cfg.engine.grad_accum)
    model = towers.dual_encoder(cfg.fne.temperature)
    momentum = make_momentum_copy(model).to(device)  # before the engine: the order seeds use
    parts = Parts(
        engine=build_engine(model, cfg, total_steps),
        momentum=momentum,
        memory=build_memory(cfg, device, rank, world),
        stats=SimilarityStats(cfg.fne.stats_reset, cfg.fne.no_pos_mu, device=device),
    )
    if timeline is not None:
        timeline.mark("engine_built")
    G = cfg.train.batch_size * world
    fan_out = build_reporters(cfg, hooks.reporter, monitor, run_dir, total_micro)
    fan_out.message(
        f"rank {rank}/{world} on {device}: {stream.samples_per_epoch} train pairs, "
        f"{total_steps} steps of {G} pairs, loss={cfg.fne.loss} after "
        f"{cfg.train.warmup_steps} warm-up steps, K={parts.memory.capacity}"
    )
    for line in launch_warnings(cfg, stream.samples_per_epoch, stream.steps_per_epoch, total_steps):
        fan_out.message(line)
    timer = PhaseTimer(device) if cfg.train.profile_phases else NullTimer()
    if cfg.train.profile_phases:
        time_gradient_reduction(parts.engine, timer)
    layout = {  # a checkpoint resumes with the same values, or at another world size
        "world_size": world,
        "loader_workers": stream.opts.consumers,
        "batch_size": cfg.train.batch_size,
        "grad_accum": cfg.engine.grad_accum,
        "steps_per_epoch": stream.steps_per_epoch,  # what a change of global batch drops
    }
    return Run(
        cfg=cfg,
        rank=rank,
        world=world,
        device=device,
        run_dir=run_dir,
        stream=stream,
        tables=tables,
        total_micro=total_micro,
        parts=parts,
        checkpointer=Checkpointer(cfg, run_dir, parts, layout, fan_out, hooks.checkpoints),
        reporter=fan_out,
        timer=timer,
        data_log=DataLog(stream, fan_out),
        pictures=RunPictures(run_dir, cfg) if rank == 0 and cfg.run.pictures else NoPictures(),
        encoders=(
            OnlineMemory(parts.engine)
            if cfg.memory.encoder == "online"
            else SharedPrefix(parts.engine, parts.engine.module, momentum)
        ),
    )


def build_reporters(
    cfg: Config,
    extra: Reporter | None,
    monitor: Reporter | None,
    run_dir: Path,
    total_micro: int,
) -> FanOut:
    """The launcher's reporter (Ray's), the metrics reporter (``build_monitor``'s, built before
    the data), and on rank 0 the console and train_log.jsonl."""
    rank, world = dist_ops.rank(), dist_ops.world_size()
    reporters = [extra or Reporter()]
    if monitor is not None:
        reporters.append(monitor)
    if rank == 0:
        # the console counts micro steps, as train_log.jsonl's "step" does
        samples_per_step = cfg.train.batch_size * world
        full = cfg.report.console == "full"
        reporters += [
            ConsoleReporter(total_micro, samples_per_step, cfg.train.log_every, full),
            JsonLinesReporter(run_dir / "train_log.jsonl"),
        ]
        if cfg.report.tensorboard:
            reporters.append(TensorBoardReporter(run_dir / "tensorboard"))
    return FanOut(*reporters)


def open_data(
    cfg: Config,
    towers: Towers,
    rank: int,
    world: int,
    stop_reason: Callable[[], str | None] = lambda: None,
) -> tuple[TrainStream, dict[str, PairTable]]:
    """The training stream of this rank and the val/test tables (feature caches built first
    when a tower is frozen; a stop signal ends their build, ``stop_reason`` names it)."""
    env = rank_env()
    shards = {
        split: split_shards(
            cfg,
            split,
            towers,
            env.local_rank,
            env.local_world_size,
            log=log.info,
            stop_reason=stop_reason,
        )
        for split in SPLITS
    }
    image = None if cfg.model.image.frozen else towers.image  # frozen: cached features
    text = None if cfg.model.text.frozen else towers.text
    stream = train_stream(cfg, shards["train"], image, text, rank, world)
    tables = {s: eval_table(cfg, s, shards[s], image, rank, world) for s in ("val", "test")}
    return stream, tables


def resolve_warmup(cfg: Config, steps_per_epoch: int) -> Config:
    """``train.warmup_epochs`` as optimizer steps of this data (``train.warmup_steps``)."""
    if cfg.train.warmup_epochs is None:
        return cfg
    per_epoch = max(1, steps_per_epoch // cfg.engine.grad_accum)
    steps = round(cfg.train.warmup_epochs * per_epoch)
    return dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, warmup_steps=steps, warmup_epochs=None)
    )


def resume_or_start(run: Run) -> TrainState:
    """The state restored from the checkpoint the checkpointer resumes from (the engine,
    memory, statistics and RNG states restored with it), or a fresh one."""
    warmup = run.cfg.train.warmup_steps
    restored = run.checkpointer.resume()
    if restored is None:
        run.reporter.resumed(0)  # an earlier attempt's log lines (no checkpoint) are redone
        return TrainState.fresh(run.device, warm=warmup > 0)
    directory = restored.directory
    source = str(directory / f"rank-{run.rank:05d}.json")
    state = TrainState.from_rank_state(
        restored.state, run.device, run.stream.steps_per_epoch, warmup, source
    )
    position = state.position
    run.reporter.resumed(state.micro + 1)  # train_log.jsonl's steps stay increasing
    run.reporter.message(
        f"resumed from {directory} (optimizer step {state.opt_step}, epoch {position.epoch}, "
        f"batch {position.step} of {run.stream.steps_per_epoch})"
    )
    return state


def log_sample_ids(run: Run, micro: int, epoch: int, ids: torch.Tensor, loss: torch.Tensor) -> None:
    """One line per micro step in ``sample_ids-rank<r>.jsonl``: which samples this rank
    trained on and its loss over them (a host sync each step: for checking a data order
    and comparing runs, not for production), ``repr`` of the float: exact."""
    doc = {"step": micro + 1, "epoch": epoch, "ids": ids.tolist(), "loss": loss.item()}
    line = json.dumps(doc)
    # rank 0 makes the run directory; on another node (node-local run.output_dir) nobody has
    run.run_dir.mkdir(parents=True, exist_ok=True)
    with open(run.run_dir / f"sample_ids-rank{run.rank:05d}.jsonl", "a") as f:
        f.write(line + "\n")


def train_step(run: Run, state: TrainState, micro: int, epoch: int, batch: dict) -> bool:
    """Phases 1-8 of one micro step; True when it ended with an optimizer step."""
    cfg, engine, timer = run.cfg, run.parts.engine, run.timer
    if epoch != state.epoch:
        state.close_epoch()  # the summary and metrics.json report whole epochs
        state.epoch = epoch
        run.parts.stats.new_epoch()
    state.n_micro += 1
    state.micro, state.position = micro, run.data_log.position
    ids = batch["ids"]  # the loader's CPU tensor
    batch = {k: v.to(run.device, non_blocking=True) for k, v in batch.items()}
    state.warm = state.opt_step < cfg.train.warmup_steps
    vote = run.ahead.vote() if run.vote_rides else None  # reads the next batch now
    # phases 1-5 compute; the statistics' sums and the batch-norm running statistics they
    # saw are applied only by commit_step, once the step is known finite
    with deferred_running_stats(engine.module, run.parts.momentum) as running:
        out = forward_step(
            run.encoders.online,
            run.encoders.momentum,
            batch,
            run.parts.memory,
            run.parts.stats,
            cfg.fne,
            StepPosition(cfg.run.seed, micro, state.warm, vote),
            timer,
        )
    if out.agreed is not None:
        run.ahead.agreed(out.agreed)
    if cfg.train.log_sample_ids:
        log_sample_ids(run, micro, epoch, ids, out.loss)
    if micro + 1 == cfg.debug.nan_at_step:  # fault injection (tests): a non-finite loss
        out.loss = out.loss + float("nan")
    loss = out.loss
    if cfg.engine.grad_accum == 1 and not partitioned_optimizer(engine):
        loss = poisoned(out.loss)  # the flag rides on the gradient all-reduce (nonfinite.py)
    else:
        with timer.phase("finite_check"):  # an all-reduce and a host read
            finite = finite_everywhere(out.loss)
        if not finite:
            return skip_nonfinite(run, state, micro, out.loss)
    with timer.phase("backward_step"):
        with timer.part("backward"):  # with the gradient reduction (its own part, inside)
            engine.backward(loss)  # 6
        with timer.part("grad_check"):
            finite_grads = cfg.engine.grad_accum > 1 or checked_grads_finite(engine)
        if not finite_grads:  # skip the step
            engine.module.zero_grad(set_to_none=True)
            # the skip path only: whether a loss was the cause, for its log window
            shown = out.loss if loss is not out.loss and not finite_everywhere(out.loss) else None
            return skip_nonfinite(run, state, micro, shown)
        with timer.part("optimizer_step"):
            engine.step()  # DeepSpeed steps the optimizer only at accumulation boundaries
    state.nonfinite_in_row = 0
    run.pictures.offer(out.gathered)  # a reference; sampled at log windows
    boundary = (micro + 1) % cfg.engine.grad_accum == 0
    commit_step(run, state, out, running, boundary)
    return boundary


def commit_step(
    run: Run, state: TrainState, out: StepOutput, running: PendingRunningStats, boundary: bool
) -> None:
    """A finite step's state, applied together: the FNE statistics' sums, the batch-norm
    running statistics, the EMA (at an optimizer step) and the memory's enqueue. A skipped
    step applies none of them, so nothing of it needs undoing."""
    cfg, engine, timer = run.cfg, run.parts.engine, run.timer
    run.parts.stats.add_step(out.stat_sums, cfg.fne.mixture_decay)
    running.commit()  # before the EMA, which copies the online model's buffers
    if boundary:
        if cfg.memory.encoder == "momentum":  # online: the momentum copy is never read
            # ZeRO-3: the trained parameters whole (ema_update leaves frozen ones alone)
            with timer.phase("ema"), gathered_parameters(engine, trained_only=True):
                ema_update(run.parts.momentum, engine.module, cfg.memory.momentum)  # 7
        state.opt_step += 1
    if not state.warm:  # 8: the reference fills the memory only after the warm-up
        g = out.gathered
        with timer.phase("enqueue"):
            run.parts.memory.enqueue(g.img_ND, g.txt_ND, g.ids_N, g.groups_N)
    state.stale += out.staleness
    state.add_diagnostics(out.loss, out.diagnostics)


def skip_nonfinite(run: Run, state: TrainState, micro: int, loss: torch.Tensor | None) -> bool:
    """A micro step whose loss (given) or gradient is non-finite: no update, no EMA, no
    enqueue, no statistics (none of it was committed); counted, and a non-finite loss shows in
    its log window. True when it was the optimizer step's boundary (as ``train_step``)."""
    accum = run.cfg.engine.grad_accum
    if accum > 1:  # the engine counts micro steps: the window's finite ones still apply
        run.parts.engine.step()
    boundary = (micro + 1) % accum == 0
    state.opt_step += int(boundary)
    state.skipped_nonfinite += 1
    state.nonfinite_in_row += 1
    if loss is not None:
        state.sums["loss"] = state.sums.get("loss", 0.0) + loss.detach().to(torch.float64)
        state.sums.setdefault("_n", 1.0)
    check_in_row(
        state.nonfinite_in_row, run.cfg.optim.max_nonfinite_steps, micro, state.skipped_nonfinite
    )
    return boundary


def log_window(run: Run, state: TrainState) -> None:
    """Mean of the diagnostics since the last log line → reporters and history."""
    metrics = state.take_window()
    metrics.update(epoch=state.epoch, lr=run.parts.engine.get_lr()[0], warmup=float(state.warm))
    metrics["skipped_nonfinite"] = state.skipped_nonfinite
    grad_norm = last_grad_norm(run.parts.engine)
    if grad_norm is not None:
        metrics["grad_norm"] = grad_norm
    staleness = state.staleness()
    if staleness is not None:
        metrics["staleness"] = staleness
    state.history.append({"step": state.opt_step, **metrics})
    run.pictures.sample()  # the device is idle here: take_window waited for it
    run.reporter.step(state.micro, metrics)
    run.reporter.progress(progress(run, state))
    state.last_logged = metrics


def progress(run: Run, state: TrainState) -> Progress:
    """This rank's cumulative counts, from host values (no device sync)."""
    memory = run.parts.memory
    return Progress(
        opt_step=state.opt_step,
        micro_steps=state.n_micro,
        samples=state.n_micro * run.cfg.train.batch_size,
        bad_samples=dict(run.data_log.bad_so_far()),
        shard_errors=dict(run.data_log.shard_errors_so_far()),
        dropped={"plan": run.data_log.dropped_by_plan, "cut_short": run.data_log.dropped},
        phase_seconds=run.timer.totals(),
        skipped_steps=int(getattr(run.parts.engine, "skipped_steps", 0)) + state.skipped_nonfinite,
        memory_fill=min(memory.writes, memory.capacity) / memory.capacity if memory.capacity else 0,
    )


def stop_on_signal(run: Run, state: TrainState, stop: StopRequest) -> None:
    """Every rank agreed to stop before the next step: the checkpointer writes a last
    checkpoint if one is due and fits the grace period, then ``Interrupted``."""
    kept = run.checkpointer.save_on_stop(state, stop)
    run.reporter.close()
    raise Interrupted(
        f"{stop.signal_name or 'a signal on another rank'} at optimizer step {state.opt_step}: "
        f"{kept}"
    )


def maybe_evaluate(run: Run, state: TrainState) -> None:
    """After an optimizer step: the val retrieval metrics every train.eval_every steps."""
    every = run.cfg.train.eval_every
    if not every or state.opt_step % every:
        return
    val = evaluate_table(run.parts.engine.module, run.tables["val"])  # every rank
    run.reporter.evaluation(state.opt_step, "val", val)
    run.pictures.evaluation(state.opt_step, run.parts.stats)
    if run.is_main:
        run.reporter.message(
            f"step {state.opt_step}: val rsum {val['rsum']:.2f}, {group_rsum_text(val)}"
        )
        state.history.append({"step": state.opt_step, "val": val})


def end_of_training(run: Run, state: TrainState) -> None:
    """The last log window and the last checkpoint, where the loop's own did not fall."""
    if state.sums:  # the last epoch ended early (bad samples): log what is left
        log_window(run, state)
    state.close_epoch()
    run.checkpointer.save_at_end(state)


def finish(run: Run, state: TrainState, loop_time: float, timeline: Timeline) -> dict:
    """Final val/test evaluation and data counts (collectives); rank 0 writes metrics.json, then
    the weights, and reports the summary. Returns the metrics ({} on other ranks)."""
    dist_ops.barrier()
    final_val = evaluate_table(run.parts.engine.module, run.tables["val"])
    final_test = evaluate_table(run.parts.engine.module, run.tables["test"])
    timeline.mark("evaluated")
    run.reporter.evaluation(state.opt_step, "val", final_val)
    run.reporter.evaluation(state.opt_step, "test", final_test)
    data_counts = run.data_log.totals(run.device)
    weights = full_weights(run.parts.engine)
    result: dict = {}
    error = None
    if run.is_main:
        result = {
            "val": final_val,
            "test": final_test,
            "diagnostics": state.epoch_diag.epochs[-1] if state.epoch_diag.epochs else {},
            "loss": "vse_pp" if state.warm else run.cfg.fne.loss,
            "staleness": state.staleness(),
            "steps": state.opt_step,
            "skipped_nonfinite": state.skipped_nonfinite,
            "loop_time_s": loop_time,
            "samples_per_s": state.n_micro * run.global_batch / max(loop_time, 1e-9),
            "phase_seconds": run.timer.totals(),
            "phase_part_seconds": run.timer.part_totals(),  # inside phases (PhaseTimer)
            "data": data_counts,
            "world_size": run.world,
            "wall_time_s": timeline.elapsed(),
        }
        if run.cfg.train.profile_phases:
            result["timeline"] = timeline.marks
        history = {**result, "epochs": state.epoch_diag.epochs, "history": state.history}
        error = write_results(run.run_dir, history, weights, state.saved_at == state.opt_step)
        run.pictures.evaluation(state.opt_step, run.parts.stats)
        plots = run.pictures.finish(run.run_dir)
        vse_pp_memory = run.cfg.fne.vse_pp_memory
        if error is None:
            run.reporter.message(format_summary(result, run.run_dir, vse_pp_memory, plots))
    run.reporter.finish(result)
    run.reporter.close()
    error = dist_ops.all_gather_json(error)[0]  # every rank ends alike
    if error is not None:
        raise CheckpointError(error)
    return result


def write_results(run_dir: Path, history: dict, weights: dict, checkpointed: bool) -> str | None:
    """metrics.json, then the final weights (``model.safetensors`` + its hash file), each
    written whole or not at all: the results never depend on the larger write succeeding (a
    full disk). Returns a one-line error, or None."""
    metrics = run_dir / "metrics.json"
    text = json.dumps(json_safe(history), indent=1)
    problem = write_error(_write_atomic, metrics, lambda tmp: tmp.write_text(text))
    if problem is not None:
        return f"cannot write {metrics} ({problem}); the run's log is in train_log.jsonl"
    path = run_dir / "model.safetensors"
    problem = write_error(_write_atomic, path, lambda tmp: save_file(weights, str(tmp)))
    if problem is None:
        problem = write_error(write_sidecar, path)  # export and evaluate check it
    if problem is None:
        return None
    where = (
        "the newest checkpoint holds the same weights (python -m fne_dist.export)"
        if checkpointed
        else "no checkpoint holds these weights"
    )
    return f"cannot write the final weights {path} ({problem}): {metrics.name} is written; {where}"


def _write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)``, then rename ``tmp`` to ``path``; no partial file is left either way."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)

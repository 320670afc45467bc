"""When to checkpoint and where to resume from: the one object the training loop asks.

The loop calls ``resume`` once before its first step, ``maybe_save`` after every optimizer
step, ``save_on_stop`` when every rank agreed to stop on a signal and ``save_at_end`` after the
last step; it never reads checkpoint settings itself. How a checkpoint is written, validated
and restored is ``fne_dist.checkpoint``'s. A launcher that keeps checkpoints of its own (Ray
Train registers each one and hands it back after restarting the worker group) plugs in as a
``LauncherCheckpoints``; the reporters only report.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import distributed as dist_ops
from .checkpoint.collective import (
    Parts,
    Target,
    check_shared_dir,
    load_run_checkpoint,
    save_run_checkpoint,
)
from .checkpoint.format import CheckpointError, RankState
from .checkpoint.remote import download, find_resumable_remote, is_url, remote_checkpoints
from .checkpoint.validation import find_resumable, list_checkpoints, validate
from .config import Config, config_text
from .distributed.launch import rank_env
from .interrupt import StopRequest
from .reporters import Reporter
from .run_identity import (
    check_resume_config,
    data_identity,
    deepspeed_identity,
    restart_of_same_run,
    resume_request,
)
from .state import TrainState


class LauncherCheckpoints:
    """A launcher's own record of the run's checkpoints; this null one keeps none (torchrun,
    Slurm, accelerate, a single process: checkpoint.dir is the only record)."""

    def restored(self) -> Path | None:
        """The checkpoint the launcher hands back after restarting this run, if any."""
        return None

    def register(self, path: Path, step: int, is_main: bool) -> None:
        """A checkpoint was written at ``path`` (every rank calls this, same count)."""


def checkpoint_root(cfg: Config, run_dir: Path) -> str:
    """checkpoint.dir, a directory or a URL; by default ``checkpoints`` in the run directory."""
    return cfg.checkpoint.dir or str(run_dir / "checkpoints")


def local_checkpoint_dir(cfg: Config, run_dir: Path) -> Path | None:
    """checkpoint.dir as a local directory (the run's lock covers it); None for a URL."""
    root = checkpoint_root(cfg, run_dir)
    return None if is_url(root) else Path(root)


def check_checkpoint_dir(root: str, rank: int, world: int) -> None:
    """Before any work: a local checkpoint.dir must be one directory every node sees."""
    if world > 1 and not is_url(root):
        check_shared_dir(Path(root), rank, rank_env().node_rank)


@dataclass
class Restored:
    """What ``Checkpointer.resume`` loaded: the directory, and this rank's counters,
    data position (its RNG states are already set, the parts already loaded)."""

    directory: Path
    state: RankState


class Checkpointer:
    """Every rank's checkpoint policy for one run: where to resume from, when to save (every
    ``checkpoint.every_steps``, at epoch ends, on a stop signal if it fits the grace period),
    and where the checkpoints go (a URL checkpoint.dir is written to a local scratch directory
    first and uploaded)."""

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        parts: Parts,
        layout: dict[str, Any],
        reporter: Reporter,
        launcher: LauncherCheckpoints | None = None,
    ) -> None:
        """``cfg`` is the resolved config (its text is each checkpoint's config.yaml);
        ``layout`` the settings a checkpoint resumes only with (world size, loader workers,
        batch size, accumulation)."""
        self.cfg, self.parts, self.reporter = cfg, parts, reporter
        self.launcher = launcher or LauncherCheckpoints()
        self.rank, self.world = dist_ops.rank(), dist_ops.world_size()
        self.root = checkpoint_root(cfg, run_dir)
        url = is_url(self.root)
        self.target = Target(
            root=run_dir / "checkpoints-local" if url else Path(self.root),
            config_yaml=config_text(cfg),  # the run directory's config.yaml too
            layout=layout,
            run_id=cfg.run.id,
            keep_last=cfg.checkpoint.keep_last,  # a URL's; its local scratch keeps 1
            rank=self.rank,
            barrier=dist_ops.barrier,
            url=self.root if url else None,  # every rank uploads its part, rank 0 meta.json last
            data=data_identity(cfg),  # resume reuses the data position only for the same shards
            deepspeed=deepspeed_identity(cfg),  # resume refuses other state-shaping settings
        )

    # ------------------------------------------------------------------------------ resume

    def resume(self) -> Restored | None:
        """Load the checkpoint to resume from into the parts (engine, momentum model, memory,
        statistics, RNG states) after checking it fits this run; None to start afresh."""
        scratch = self.target.root / f"resume-rank{self.rank}"
        say = self.reporter.message
        directory = resume_source(self.cfg, self.root, scratch, self.launcher, say)
        if directory is None:
            return None
        meta = validate(directory)
        # before any state loads
        check_resume_config(directory, self.cfg, meta.get("data"), meta.get("deepspeed"))
        allow = self.cfg.checkpoint.allow_batch_change
        layout = self.target.layout
        saved = load_run_checkpoint(directory, meta, layout, self.parts, self.rank, allow)
        if saved.note is not None:
            say(
                f"resuming on {self.world} rank(s) × {layout['batch_size']} a checkpoint of "
                f"{meta['world_size']} rank(s) × {meta['batch_size']}: {saved.note}"
            )
        return Restored(directory, saved)

    # -------------------------------------------------------------------------------- save

    def maybe_save(self, state: TrainState, epoch_end: bool) -> None:
        """After an optimizer step: a checkpoint every checkpoint.every_steps, and at epoch
        ends (``epoch_end``: this step finished the epoch's data)."""
        every, at_epoch_end = self.cfg.checkpoint.every_steps, self.cfg.checkpoint.at_epoch_end
        if (every and state.opt_step % every == 0) or (at_epoch_end and epoch_end):
            self.save(state)

    def save_at_end(self, state: TrainState) -> None:
        """After the last step: the end of training is an epoch end too."""
        due = state.saved_at != state.opt_step and state.micro >= 0
        if self.cfg.checkpoint.at_epoch_end and due:
            self.save(state)

    def save_on_stop(self, state: TrainState, stop: StopRequest) -> str:
        """Every rank agreed to stop before the next step: a last checkpoint only if one is
        due and fits the grace period (every rank decides alike). Returns what was kept and
        how to go on, for the stop's one line."""
        ck = self.cfg.checkpoint
        due = (
            bool(ck.every_steps or ck.at_epoch_end)
            and state.saved_at != state.opt_step
            and (state.micro + 1) % self.cfg.engine.grad_accum == 0  # at an optimizer step
        )
        fits = stop.fits(ck.stop_grace_s, state.checkpoint_s)
        if dist_ops.all_min_int(int(due and fits)):
            self.save(state)
            kept = f"wrote checkpoint step {state.opt_step}"
        else:
            grace = f"it would not fit checkpoint.stop_grace_s={ck.stop_grace_s:g}"
            why = grace if due else "none due"
            newest = f"step {state.saved_at} stays the newest" if state.saved_at > 0 else "none yet"
            kept = f"no checkpoint written ({why}; {newest})"
        how = (
            "resume with checkpoint.resume=latest (a requeued Slurm job resumes by itself)"
            if state.saved_at > 0
            else "no checkpoint to resume from: run it again (a requeued Slurm job starts "
            "afresh by itself)"
        )
        return f"{kept}; {how}"

    def save(self, state: TrainState) -> None:
        """Every rank writes (and, to a URL checkpoint.dir, uploads) its part (a collective)."""
        t0 = time.perf_counter()
        is_main = self.rank == 0
        global_batch = self.cfg.train.batch_size * self.world
        saved = state.to_rank_state(global_batch, is_main)
        replay = (saved.data_position or {}).get("replay")
        if replay is not None:  # every rank is replaying the same epoch: all take part
            replay["positions"] = merged_replay(dist_ops.all_gather_json(replay))
        path = save_run_checkpoint(self.target, self.parts, saved)
        state.saved_at, state.checkpoint_s = state.opt_step, time.perf_counter() - t0
        self.launcher.register(path, state.opt_step, is_main)
        where = f"{self.root.rstrip('/')}/{path.name}" if self.target.url else path
        self.reporter.checkpoint_done(path, state.opt_step, state.checkpoint_s)
        self.reporter.message(f"checkpoint {where}")


def resume_source(
    cfg: Config,
    root: str,
    local_root: Path,
    launcher: LauncherCheckpoints,
    say: Callable[[str], None],
) -> Path | None:
    """Where to resume from: after a launcher's restart of this run (Ray's worker group), the
    newer of the checkpoint the launcher hands back and the newest valid one this run
    (``run.id``) wrote to checkpoint.dir — a worker can die between writing a checkpoint and
    the launcher registering it; otherwise ``checkpoint.resume`` (``latest`` or a path), else
    nothing. A checkpoint.dir URL is read through fsspec (downloaded to ``local_root``);
    ``say`` receives the warnings and notes."""

    def newest(run_id: str | None) -> tuple[Path, dict]:
        if is_url(root):
            return find_resumable_remote(root, local_root, say, run_id)
        return find_resumable("latest", Path(root), say, run_id)

    candidates = []
    restored = launcher.restored()
    if restored is not None:
        candidates.append((validate(restored)["step"], restored))
    if cfg.run.id:
        try:
            path, meta = newest(cfg.run.id)
            candidates.append((meta["step"], path))
        except CheckpointError:
            pass  # nothing of this run yet: a first attempt
    if candidates:
        return max(candidates)[1]
    spec = resume_request(cfg)  # checkpoint.resume, or "latest" after a Slurm requeue
    if not spec:
        return None
    if spec == "latest":
        if not cfg.checkpoint.resume and not _any_checkpoint(root):
            # a launcher's restart of a run stopped before its first checkpoint: start afresh
            say(
                f"{restart_of_same_run()}: a restart of this run, which wrote no checkpoint "
                f"under {root} yet: starting afresh"
            )
            return None
        return newest(None)[0]
    if is_url(spec):
        parent, name = spec.rstrip("/").rsplit("/", 1)
        return download(parent, name, local_root)
    return Path(spec)


def merged_replay(replays: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every old rank's data position in an epoch replayed on another world size, each from
    a rank that reads it (the ``reads`` of every rank's replay cover every old rank)."""
    positions = list(replays[0]["positions"])
    for replay in replays:
        for q in replay["reads"]:
            positions[q] = replay["positions"][q]
    return positions


def _any_checkpoint(root: str) -> bool:
    """Whether ``root`` (a directory or a URL) holds any ``step-N`` (valid or not)."""
    if is_url(root):
        return bool(remote_checkpoints(root))
    return bool(list_checkpoints(Path(root)))

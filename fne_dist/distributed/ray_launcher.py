"""Run the training loop on Ray Train workers (``launcher: ray``).

The driver only validates, connects to Ray and starts a ``TorchTrainer``; each worker rebuilds
everything from the config dict it receives (never from module globals) and runs the same loop
as every other launcher. Ray Train sets up torch.distributed (gloo or NCCL) before the loop.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any

from ..checkpoint.remote import fetch_missing, is_url
from ..checkpointer import LauncherCheckpoints
from ..config import Config, ConfigError, config_from_dict, config_to_dict
from ..progress import TaskProgress
from ..reporters import Reporter
from ..sizing import check_local_workers


class RayReporter(Reporter):
    """Forwards logged metrics to ``ray.train.report`` (called by every worker, same count)."""

    def step(self, step: int, metrics: dict[str, float]) -> None:
        import ray.train

        ray.train.report({"step": step + 1, **metrics})

    def finish(self, result: dict[str, Any]) -> None:
        import ray.train

        flat = {
            f"{split}_{k}": v for split in ("val", "test") for k, v in result.get(split, {}).items()
        }
        ray.train.report({"final": 1, **flat, "wall_time_s": result.get("wall_time_s", 0.0)})


class RayCheckpoints(LauncherCheckpoints):
    """Ray Train's record of the run's checkpoints: each one is handed to Ray, which copies it
    to its storage path and gives it back through ``get_checkpoint`` when it restarts the
    worker group after a failure. ``checkpoint_url``: a URL checkpoint.dir, from which rank 0
    completes its local copy before handing it to Ray."""

    def __init__(self, checkpoint_url: str | None = None) -> None:
        self.checkpoint_url = checkpoint_url

    def register(self, path: Path, step: int, is_main: bool) -> None:
        """Rank 0 reports the directory (every rank wrote its part of it on the shared
        checkpoint.dir); the others report none, as Ray requires every worker to report.
        With a URL checkpoint.dir rank 0's directory is its node-local scratch copy, which
        lacks the files other nodes wrote: those are fetched first, so that what Ray
        registers (and restores after a failure) is the complete checkpoint."""
        import ray.train

        if is_main and self.checkpoint_url is not None:
            fetch_missing(path, self.checkpoint_url)
        checkpoint = ray.train.Checkpoint.from_directory(str(path)) if is_main else None
        ray.train.report({"checkpoint_step": step}, checkpoint=checkpoint)

    def restored(self) -> Path | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        local = Path(checkpoint.path)
        return local if local.is_dir() else Path(checkpoint.to_directory())


# Read by Ray Train's controller (Ray 2.60: ray.train.v2 constants, propagated to the controller)
PREEMPTION_WATCHER_VAR = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
# Read by the raylet when it starts (Ray's RAY_<config name> convention)
PRESTART_VAR = "RAY_prestart_worker_first_driver"


def local_instance_env() -> dict[str, str]:
    """Environment defaults for a Ray instance this run starts for itself (a user's own values
    win), set before ``ray.init`` so the raylet and Ray Train's controller read them:

    - every port on loopback;
    - no preemption watcher: that actor (one more process, ~2 CPU seconds to start on the
      default run's 2 cores) only logs node drains, which an autoscaler or ``ray drain-node``
      start, and neither acts on an instance this run owns;
    - no prestarted workers: the raylet starts one idle Python worker per CPU for the first
      driver, but every process of the run has a runtime environment (Ray Train's controller
      passes env vars to itself and to the actors it starts: the workers, the placement-group
      cleaner), so none of them can take a prestarted worker, which only imports Ray on the
      cores the starting run needs (~2-3 CPU seconds each on the default run's 2 cores)."""
    return {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        PREEMPTION_WATCHER_VAR: "0",
        PRESTART_VAR: "0",
    }


# Ray Train's INFO lines per ray.train.report that our own console already covers: the whole
# metrics dict (~1,500 characters per log window and rank), and the path of each checkpoint it
# registered (our checkpoint line names it).
RAY_REPORT_LINES = ("Reporting training result", "Checkpoint successfully created")


class RayReportLines(logging.Filter):
    """Drops Ray Train's ``Reporting training result N: TrainingReport(...)`` and
    ``Checkpoint successfully created at: Checkpoint(...)`` lines, which workers log at INFO
    for every ``ray.train.report``: our progress and checkpoint lines say what matters. With
    ``report.console: full`` rank 0 keeps them."""

    def __init__(self, keep: bool) -> None:
        super().__init__()
        self.keep = keep

    def filter(self, record: logging.LogRecord) -> bool:
        return self.keep or not str(record.msg).startswith(RAY_REPORT_LINES)


def quiet_ray_reports(cfg: Config, rank: int) -> None:
    """Install ``RayReportLines`` on the handlers of the worker's root and ``ray.train``
    loggers, which Ray Train configures before the training function starts. The report line
    comes from a logger named after its file (so neither ``ray.train``'s level nor
    ``RunConfig(logging_config=...)`` reaches it) that propagates to the root logger; the
    checkpoint line from a ``ray.train.*`` module logger, which stops at ``ray.train``'s own
    handlers (propagate: false). A handler filter sees both; a logger's own filter would
    not see records propagated from its children."""
    keep = cfg.report.console == "full" and rank == 0
    for logger in (logging.getLogger(), logging.getLogger("ray.train")):
        for handler in logger.handlers:
            if not any(isinstance(f, RayReportLines) for f in handler.filters):
                handler.addFilter(RayReportLines(keep))


def _worker(loop_config: dict[str, Any]) -> None:
    import ray.train

    from ..loop import train

    cfg = config_from_dict(loop_config["config"])
    quiet_ray_reports(cfg, ray.train.get_context().get_world_rank())
    url = cfg.checkpoint.dir if cfg.checkpoint.dir and is_url(cfg.checkpoint.dir) else None
    train(cfg, extra_reporter=RayReporter(), launcher_checkpoints=RayCheckpoints(url))


def _absolute(cfg: Config) -> dict[str, Any]:
    """The config with paths made absolute, so workers find them from any working directory,
    and a run id (a restarted worker group resumes only this run's checkpoints)."""
    data = config_to_dict(cfg)
    data["run"]["id"] = cfg.run.id or uuid.uuid4().hex
    data["run"]["output_dir"] = str(Path(cfg.run.output_dir).resolve())
    data["data"]["cache_dir"] = str(Path(cfg.data.cache_dir).resolve())
    for split in ("train", "val", "test"):
        spec = data["data"][split]
        if "://" not in spec and not Path(spec).is_absolute() and Path(spec).parent.exists():
            data["data"][split] = str(Path(spec).resolve())
    return data


def _local_cpus() -> float:
    """The CPUs a local Ray instance started here would offer: Ray's own count (cgroup and
    affinity limits included), so that too many workers are refused before Ray starts."""
    try:
        from ray._private.utils import get_num_cpus  # what ray.init(num_cpus=None) uses
    except ImportError:  # a Ray without it: the check after the start still refuses
        return float("inf")
    return float(get_num_cpus())


def _too_few_cpus(cfg: Config, needed: float, available: float) -> str:
    return (
        f"dist.workers={cfg.dist.workers} × dist.cpus_per_worker={cfg.dist.cpus_per_worker} "
        f"needs {needed:g} CPUs; the local Ray instance has {available:g}"
    )


def worker_range(cfg: Config) -> int | tuple[int, int]:
    """Ray's ``num_workers``: dist.workers, or (dist.min_workers, dist.workers)."""
    low = cfg.dist.min_workers
    return (low, cfg.dist.workers) if 0 < low < cfg.dist.workers else cfg.dist.workers


def start_retries(cfg: Config) -> int:
    """Ray's ``controller_failure_limit``: how often a worker group that could not be placed
    within dist.worker_start_timeout_s is scheduled again. A fixed group: never (an
    autoscaler that never delivers ends the run). A worker range: up to dist.max_failures
    times, because Ray Train's elastic policy sizes a restart from the AutoscalingCoordinator's
    view of the cluster, refreshed every 20 s (Ray 2.60): right after a node is lost that view
    still counts the node, the restart asks for dist.workers and times out, and only the next
    try sees the smaller cluster and starts the workers that fit (at least dist.min_workers)."""
    return cfg.dist.max_failures if isinstance(worker_range(cfg), tuple) else 0


# Ray Train's default callbacks (class names, Ray 2.60's ray.train.v2) that buy nothing on an
# instance this run starts for itself and that each start one more actor process on the run's
# cores: the placement-group cleaner (removes the workers' placement group should the
# controller die while the driver lives; here the driver's ray.shutdown() ends the whole
# instance then; it also asks the dashboard's state API about the controller every second), and
# the datasets manager (Ray Data's shards: this run passes no Ray Datasets).
NOT_ON_OWN_INSTANCE = ("PlacementGroupCleanerCallback", "DatasetsCallback")


def trainer_class(own_instance: bool) -> type:
    """Ray Train's ``TorchTrainer``; on an instance this run started (``own_instance``) a
    subclass without ``NOT_ON_OWN_INSTANCE``'s callbacks. A Ray whose trainer builds its
    callbacks another way gets the plain trainer."""
    from ray.train.torch import TorchTrainer

    if not own_instance or not hasattr(TorchTrainer, "_create_default_callbacks"):
        return TorchTrainer

    class OwnInstanceTorchTrainer(TorchTrainer):  # type: ignore[misc, valid-type]
        def _create_default_callbacks(self) -> list[Any]:
            callbacks = super()._create_default_callbacks()
            return [c for c in callbacks if type(c).__name__ not in NOT_ON_OWN_INSTANCE]

    return OwnInstanceTorchTrainer


def _elastic_callbacks(cfg: Config) -> list[Any]:
    """Ray Train callbacks for a worker range: the cluster view refreshed after a failure (see
    ray_elastic). A fixed group's restart does not look at that view: none."""
    if not isinstance(worker_range(cfg), tuple):
        return []
    from .ray_elastic import RefreshClusterViewOnFailure

    return [RefreshClusterViewOnFailure()]


def run_with_ray(cfg: Config) -> dict[str, Any]:
    """Start ``cfg.dist.workers`` Ray Train workers and wait for them; returns final metrics."""
    from ..loop import preflight

    preflight(cfg)  # bad paths and missing encoders fail here, before any worker starts
    if not (cfg.dist.ray_address or os.environ.get("RAY_ADDRESS")):
        check_local_workers(cfg, cfg.dist.workers)  # a local instance: workers share this host
    # Read by Ray Train's controller: fail fast when the worker group cannot be scheduled.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(cfg.dist.worker_start_timeout_s)
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    address = cfg.dist.ray_address or os.environ.get("RAY_ADDRESS")
    started_here = not ray.is_initialized() and not address
    needed = cfg.dist.workers * cfg.dist.cpus_per_worker
    if started_here and needed > (local := _local_cpus()):
        raise ConfigError(_too_few_cpus(cfg, needed, local))  # before a local Ray starts (~15 s)
    if not ray.is_initialized():
        with TaskProgress("ray_start", f"ray start ({address or 'local'})", None, "").ticking():
            if address:
                ray.init(address=address, log_to_driver=True)
            else:  # a local Ray instance for this run, on loopback
                for key, value in local_instance_env().items():
                    os.environ.setdefault(key, value)
                ray.init(include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True)
    available = ray.cluster_resources().get("CPU", 0.0)
    if not address and needed > available:
        if started_here:
            ray.shutdown()  # a local instance we started must not outlive the run
        raise ConfigError(_too_few_cpus(cfg, needed, available))
    trainer = trainer_class(started_here)(
        _worker,
        train_loop_config={"config": _absolute(cfg)},
        scaling_config=ScalingConfig(
            # a range: Ray Train starts with what it can get (at least min_workers), restarts
            # a failed group with the workers still there, and grows it back when it can;
            # each start resumes from the latest checkpoint on its world size
            num_workers=worker_range(cfg),
            use_gpu=cfg.dist.use_gpu,
            resources_per_worker={"CPU": cfg.dist.cpus_per_worker},
        ),
        torch_config=TorchConfig(
            backend="nccl" if cfg.dist.use_gpu else "gloo",
            timeout_s=int(cfg.dist.collective_timeout_s),  # per-step collectives
        ),
        run_config=RunConfig(
            name=cfg.run.name,
            # A worker group that cannot start within dist.worker_start_timeout_s (e.g. an
            # autoscaler that never delivers) ends the run, after start_retries(cfg) more
            # tries; Ray's default retries forever. A worker that dies restarts the group
            # (from the latest checkpoint) at most dist.max_failures times.
            failure_config=FailureConfig(
                max_failures=cfg.dist.max_failures, controller_failure_limit=start_retries(cfg)
            ),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last or None),
            # a range: a restart after a failure is sized from a fresh view of the cluster
            callbacks=_elastic_callbacks(cfg),
            storage_path=str((Path(cfg.run.output_dir) / "ray").resolve()),
        ),
    )
    try:
        result = trainer.fit()
    finally:
        if started_here:
            ray.shutdown()  # a local instance we started must not outlive the run
    return dict(result.metrics or {})

"""Prometheus metrics of a run (``monitor.*``): the catalog of series, two sinks
(prometheus_client per rank, Ray's metrics agent under Ray Train) and the reporter feeding them.

``build_monitor`` picks the path: under torchrun / deepspeed / srun / accelerate each rank serves
/metrics on monitor.host:monitor.port + local rank and rank 0 writes the run's file-discovery
JSON; under Ray Train the metrics go through ``ray.util.metrics`` (no extra ports); a plain
single process exports nothing unless monitor.prometheus=always.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import time
from pathlib import Path

import torch

from .. import __version__
from .. import distributed as dist_ops
from ..config import Config, ConfigError, config_text
from ..data.decode import REASONS
from ..distributed.launch import rank_env
from ..paths import check_writable_file
from ..reporters import Reporter
from .metrics_reporter import MetricsReporter
from .serve import (
    advertised_address,
    check_endpoint,
    gather_targets,
    serve_metrics,
    write_targets,
)

TARGETS_FILE = "prometheus_targets.json"  # in the run directory


def last_grad_norm(engine: object) -> float | None:
    """The engine's gradient norm of its last optimizer step (DeepSpeed's
    ``get_global_grad_norm``, the DDP twin's clip norm), or None when it keeps none. Read at a
    log window only: a device tensor becomes a float there, where the loop syncs anyway."""
    get = getattr(engine, "get_global_grad_norm", None)
    norm = get() if get is not None else None
    return None if norm is None else float(norm)


def under_ray() -> bool:
    """Whether this process is a Ray worker (Ray Train's loop runs inside one)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def launcher_name(environ: dict[str, str] | None = None) -> str:
    """The launcher as fne_run_info names it (from the variables each one sets; call it
    before ``init_process_group``, which sets RANK & co. for a plain process too)."""
    env = os.environ if environ is None else environ
    if under_ray():
        return "ray"
    if any(k.startswith("ACCELERATE_") for k in env):
        return "accelerate"
    if "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    source = rank_env(env).source
    return {"slurm": "srun", "torch": "deepspeed", "none": "local"}[source]


@functools.cache
def process_launcher() -> str:
    """``launcher_name()`` of this process, read once: ``init_process_group`` leaves RANK & co.
    in the environment, so a second in-process run (tests) would otherwise look launched."""
    return launcher_name()


def node_rank(environ: dict[str, str] | None = None) -> int:
    """The node's rank: the launcher's (GROUP_RANK, NODE_RANK, SLURM_NODEID), else
    rank // local world size. Never the hostname."""
    env = os.environ if environ is None else environ
    for key in ("GROUP_RANK", "NODE_RANK", "SLURM_NODEID"):
        if env.get(key, "").isdigit():
            return int(env[key])
    r = rank_env(env)
    return r.rank // max(1, r.local_world_size)


def mode(cfg: Config, launcher: str) -> str:
    """off, http (a /metrics server per rank) or ray."""
    if cfg.monitor.prometheus == "never":
        return "off"
    if launcher == "ray":
        return "ray"
    if cfg.monitor.prometheus == "always" or launcher != "local":
        return "http"
    return "off"


class _Lingering(MetricsReporter):
    """The reporter of the Ray path: at close the worker waits monitor.linger_s, so that Ray's
    metrics agent exports the final values before Ray Train ends the worker."""

    linger_s = 0.0

    def close(self) -> None:
        time.sleep(self.linger_s)
        super().close()


class _Served(MetricsReporter):
    """The reporter of the http path, owning its server (stopped at close). Rank 0 empties
    the discovery files at close (a finished run's targets are gone, not down), after
    monitor.linger_s."""

    server = None
    targets: tuple[Path, ...] = ()
    linger_s = 0.0

    def close(self) -> None:
        time.sleep(self.linger_s)  # the final values (test evaluation) get scraped
        for path in self.targets:
            write_targets(path, "", [])
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        super().close()


def check_monitor(cfg: Config, launcher: str, environ: dict[str, str] | None = None) -> None:
    """Before any worker starts (one-line ``ConfigError``s): when this process will serve
    /metrics, ``monitor.host`` is an address of this machine, every local rank's port exists,
    and ``monitor.targets_file`` is a file that can be written. ``launcher``: ray, inplace or
    local (``fne_dist.train.choose_launcher``)."""
    env = os.environ if environ is None else environ
    if mode(cfg, "ray" if launcher == "ray" else launcher_name(env)) != "http":
        return
    local_ranks = max(1, rank_env(env).local_world_size)
    check_endpoint(cfg.monitor.host, cfg.monitor.port, local_ranks)
    if cfg.monitor.targets_file:
        path = Path(cfg.monitor.targets_file)
        check_writable_file(path, f"monitor.targets_file={path}")


def build_monitor(
    cfg: Config, run_dir: Path, launcher: str, device: torch.device
) -> Reporter | None:
    """The metrics reporter of this rank, or None when monitoring is off. ``launcher``:
    ``launcher_name()`` read before the process group set RANK & co. The http path gathers
    every rank's target (a collective: every rank calls this at the same point)."""
    rank, world = dist_ops.rank(), dist_ops.world_size()
    how = mode(cfg, launcher)
    if how == "off":
        return None
    run = cfg.run.id or cfg.run.name
    base = {"run": run, "rank": str(rank), "node": str(node_rank())}
    info = {
        "version": __version__,
        "config_hash": hashlib.sha256(config_text(cfg).encode()).hexdigest()[:12],
        "launcher": launcher,
        "world_size": str(world),
    }
    limits = {
        "stall_after_s": cfg.monitor.stall_after_s,
        "max_bad_fraction": cfg.data.max_bad_fraction,
        "checkpoint_max_age_s": cfg.monitor.checkpoint_max_age_s,
        "checkpoint_every_steps": float(cfg.checkpoint.every_steps),
    }
    cuda = device.type == "cuda"
    if how == "ray":
        from .sinks import RaySink

        lingering = _Lingering(RaySink(base), info, limits, REASONS, cuda)
        lingering.linger_s = cfg.monitor.linger_s
        return lingering
    from .sinks import PromSink

    sink = PromSink(base)
    reporter = _Served(sink, info, limits, REASONS, cuda)
    reporter.linger_s = cfg.monitor.linger_s
    port = cfg.monitor.port + rank_env().local_rank
    error = None
    try:
        reporter.server, port = serve_metrics(sink.registry, cfg.monitor.host, port)
    except ConfigError as err:
        error = err
    # every rank fails together (the next step is a collective a failed rank would never join)
    if dist_ops.all_min_int(0 if error else 1) == 0:
        raise error or ConfigError("monitor: another rank could not serve /metrics (see its line)")
    targets = gather_targets(advertised_address(cfg.monitor.host), port, int(base["node"]), device)
    if rank == 0:
        extra = [Path(cfg.monitor.targets_file)] if cfg.monitor.targets_file else []
        reporter.targets = (run_dir / TARGETS_FILE, *extra)
        for path in reporter.targets:
            write_targets(path, run, targets)
    return reporter

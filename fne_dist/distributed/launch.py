"""The rank environment, whoever launched us, the rendezvous, and the process group.

Launchers announce ranks through the environment: torchrun / the deepspeed launcher / accelerate
set RANK, WORLD_SIZE, LOCAL_RANK (+ MASTER_ADDR/PORT); an ``srun`` step sets SLURM_PROCID,
SLURM_STEP_NUM_TASKS, SLURM_LOCALID and the step's node list, from which the rendezvous is
derived; Ray Train sets up torch.distributed itself. A plain ``python`` run (also the batch
script of an ``sbatch`` job, which is not an srun step) is rank 0 of 1.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache
from typing import Any

import torch.distributed as dist

from ..config import ConfigError
from . import collectives
from .slurm import expand_hostlist, expand_tasks_per_node, job_port, node_address


class RendezvousError(RuntimeError):
    """The ranks did not meet within dist.rendezvous_timeout_s (one line)."""


@dataclass(frozen=True)
class RankEnv:
    rank: int
    world_size: int
    local_rank: int
    source: str  # "torch" (RANK/WORLD_SIZE), "slurm" (an srun step), or "none"
    local_world_size: int = 1  # processes on this node (they share the node's cores and disk)
    node_rank: int = 0  # this node's index, from the launcher (never the host name)

    @property
    def spans_nodes(self) -> bool:
        return self.world_size > self.local_world_size


# Node index as each launcher announces it: torchrun (GROUP_RANK), Ray Train and accelerate
# (NODE_RANK), the deepspeed launcher (CROSS_RANK). Host names are no identity: two "nodes" of
# one machine, and many containers, share one.
NODE_RANK_VARS = ("GROUP_RANK", "NODE_RANK", "CROSS_RANK")


def _torch_node_rank(env: Mapping[str, str], rank: int, local_world: int) -> int:
    for var in NODE_RANK_VARS:
        if env.get(var, "").strip().isdigit():
            return int(env[var])
    return rank // max(1, local_world)  # launchers place ranks node by node


@dataclass(frozen=True)
class Timeouts:
    """The three waits of a distributed run, each its own config field (``dist.*_timeout_s``):
    ranks meeting at start-up, one step's collectives, and barriers around long one-rank work
    (a feature-cache build, a checkpoint upload)."""

    rendezvous_s: float = 600.0
    collective_s: float = 300.0
    barrier_s: float = 3600.0

    @classmethod
    def from_config(cls, cfg: Any) -> Timeouts:
        d = cfg.dist
        return cls(d.rendezvous_timeout_s, d.collective_timeout_s, d.barrier_timeout_s)


@dataclass(frozen=True)
class Rendezvous:
    addr: str
    port: int
    source: str  # "environment", "slurm" (derived from Slurm's variables) or "local"


def _slurm_local_world(env: Mapping[str, str]) -> int:
    """Tasks of this step on this node: the node's entry of the (step's) tasks-per-node list."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1"
    counts = expand_tasks_per_node(spec)
    node = int(env.get("SLURM_NODEID", 0))
    return counts[min(node, len(counts) - 1)]


def rank_env(environ: Mapping[str, str] | None = None) -> RankEnv:
    """Ranks from the launcher's variables (torch-style first, then an srun step's), else 0 of 1.

    Slurm's ranks count only inside an srun step (SLURM_STEP_NUM_TASKS is set): an sbatch
    script's own shell also carries SLURM_PROCID=0 and SLURM_NTASKS=N, and a process started
    there directly is one process, not rank 0 of N waiting for N-1 that never come.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, local_world = int(env["RANK"]), int(env.get("LOCAL_WORLD_SIZE", 1))
        return RankEnv(
            rank,
            int(env["WORLD_SIZE"]),
            int(env.get("LOCAL_RANK", 0)),
            "torch",
            local_world,
            _torch_node_rank(env, rank, local_world),
        )
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        return RankEnv(
            int(env["SLURM_PROCID"]),
            int(env["SLURM_STEP_NUM_TASKS"]),
            int(env.get("SLURM_LOCALID", 0)),
            "slurm",
            _slurm_local_world(env),
            int(env.get("SLURM_NODEID", 0)),
        )
    return RankEnv(0, 1, 0, "none")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@lru_cache(maxsize=8)
def _node_address(host: str) -> str:
    return node_address(host)


def _slurm_rendezvous(env: Mapping[str, str]) -> Rendezvous:
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if not nodes or not job or not job.isdigit():
        raise ConfigError(
            "an srun step without SLURM_STEP_NODELIST/SLURM_JOB_NODELIST or SLURM_JOB_ID: "
            "cannot derive the rendezvous (export MASTER_ADDR and MASTER_PORT)"
        )
    addr = env.get("MASTER_ADDR") or _node_address(expand_hostlist(nodes)[0])
    port = (
        int(env["MASTER_PORT"])
        if env.get("MASTER_PORT")
        else job_port(job, env.get("SLURM_STEP_ID", env.get("SLURM_STEPID")))
    )
    return Rendezvous(addr, port, "slurm")


def rendezvous(rank: RankEnv, environ: Mapping[str, str] | None = None) -> Rendezvous:
    """Where rank 0 listens: MASTER_ADDR/MASTER_PORT when the launcher set them; under srun,
    derived from Slurm's variables (first host of the step's node list at the address Slurm
    gives it, a port from the job id); a single process picks a free loopback port. A
    multi-process launch with none of these is a ConfigError, raised before anything starts."""
    env = os.environ if environ is None else environ
    addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if addr and port:
        return Rendezvous(addr, int(port), "environment")
    if rank.world_size == 1:  # nobody to meet (also a one-task srun step): any free port
        return Rendezvous(addr or "127.0.0.1", int(port) if port else free_port(), "local")
    if rank.source == "slurm":
        return _slurm_rendezvous(env)
    if port and not rank.spans_nodes:  # every rank on this host: loopback is rank 0's host
        return Rendezvous("127.0.0.1", int(port), "environment")
    missing = " and ".join(k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k))
    spans = (
        f" on several nodes (LOCAL_WORLD_SIZE={rank.local_world_size}: no loopback default)"
        if rank.spans_nodes
        else ""
    )
    raise ConfigError(
        f"{rank.world_size} processes{spans} (RANK/WORLD_SIZE set) but {missing} not set: "
        "launch with torchrun, the deepspeed launcher or srun, or export MASTER_ADDR and "
        "MASTER_PORT (the address and a free port of rank 0's host)"
    )


def _long_barrier_group(timeouts: Timeouts) -> None:
    """Every rank, at the same point: a gloo group whose barrier waits ``barrier_s``."""
    group = None
    if dist.get_world_size() > 1:
        group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeouts.barrier_s))
    collectives.set_long_barrier_group(group)


def init_process_group(env: RankEnv, backend: str, timeouts: Timeouts | float) -> bool:
    """Join (or create, at world size 1) the default process group.

    Rank 0 serves a TCPStore at the rendezvous; every rank waits ``rendezvous_s`` for the
    others there, then collectives time out after ``collective_s`` and long barriers after
    ``barrier_s``. A bare number (the old signature) is used for all three. Returns False when
    a group already existed (e.g. Ray Train made it): the caller then must not destroy it.
    """
    if not isinstance(timeouts, Timeouts):
        timeouts = Timeouts(float(timeouts), float(timeouts), float(timeouts))
    if dist.is_initialized():
        _long_barrier_group(timeouts)
        return False
    where = rendezvous(env)
    os.environ.update(
        MASTER_ADDR=where.addr,
        MASTER_PORT=str(where.port),
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_RANK=str(env.local_rank),
    )
    try:
        store = dist.TCPStore(
            where.addr,
            where.port,
            env.world_size,
            is_master=env.rank == 0,
            timeout=timedelta(seconds=timeouts.rendezvous_s),
            wait_for_workers=True,
        )
    except (RuntimeError, dist.DistError) as err:  # DistStoreError/DistNetworkError
        raise RendezvousError(
            f"rank {env.rank}/{env.world_size}: no rendezvous at {where.addr}:{where.port} "
            f"({where.source}) within dist.rendezvous_timeout_s={timeouts.rendezvous_s:g} s: "
            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from None
    dist.init_process_group(
        backend=backend,
        store=store,
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(seconds=timeouts.collective_s),
    )
    _long_barrier_group(timeouts)
    return True

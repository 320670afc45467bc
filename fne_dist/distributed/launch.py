"""The rank environment, whoever launched us, and the process group.

Launchers announce ranks through the environment: torchrun / the deepspeed launcher / accelerate
set RANK, WORLD_SIZE, LOCAL_RANK (+ MASTER_ADDR/PORT); srun sets SLURM_PROCID, SLURM_NTASKS,
SLURM_LOCALID; Ray Train sets up torch.distributed itself. A plain ``python`` run is rank 0 of 1.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist


@dataclass(frozen=True)
class RankEnv:
    rank: int
    world_size: int
    local_rank: int
    source: str  # "torch" (RANK/WORLD_SIZE), "slurm", or "none"
    local_world_size: int = 1  # processes on this node (they share the node's cores and disk)


def rank_env(environ: dict[str, str] | None = None) -> RankEnv:
    """Ranks from the launcher's variables (torch-style first, then Slurm's), else 0 of 1."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return RankEnv(
            int(env["RANK"]),
            int(env["WORLD_SIZE"]),
            int(env.get("LOCAL_RANK", 0)),
            "torch",
            int(env.get("LOCAL_WORLD_SIZE", 1)),
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return RankEnv(
            int(env["SLURM_PROCID"]),
            int(env["SLURM_NTASKS"]),
            int(env.get("SLURM_LOCALID", 0)),
            "slurm",
            # "2(x3)" = 2 tasks on each of 3 nodes; a heterogeneous list starts with ours
            int(env.get("SLURM_TASKS_PER_NODE", "1").split("(")[0].split(",")[0]),
        )
    return RankEnv(0, 1, 0, "none")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(env: RankEnv, backend: str, timeout_s: float) -> bool:
    """Join (or create, at world size 1) the default process group with a short timeout.

    torch.distributed reads RANK/WORLD_SIZE/MASTER_*; Slurm's variables are mapped onto them.
    Returns False when a group already existed (e.g. Ray Train made it): the caller then must
    not destroy it.
    """
    if dist.is_initialized():
        return False
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if env.world_size > 1:
            raise ValueError(
                "MASTER_PORT is not set: multi-process launches need MASTER_ADDR/MASTER_PORT "
                "(torchrun and the deepspeed launcher set them; export them under srun)"
            )
        os.environ["MASTER_PORT"] = str(free_port())
    os.environ.update(
        RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank)
    )
    dist.init_process_group(
        backend=backend,
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    return True

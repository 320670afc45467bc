"""Device choice, in one place: CPU (gloo, DS_ACCELERATOR=cpu) or the local CUDA device (NCCL).

Must run before DeepSpeed is imported: DeepSpeed picks its accelerator at import time.
"""

from __future__ import annotations

import os

import torch


def select_device(requested: str, local_rank: int = 0) -> torch.device:
    """ "auto" → CUDA if available else CPU; "cuda" without a GPU is a user error."""
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"engine.device: {requested!r} is not one of auto, cpu, cuda")
    use_cuda = torch.cuda.is_available() if requested == "auto" else requested == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("engine.device=cuda but no CUDA device is visible (use auto or cpu)")
    if use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cuda")
        index = cuda_index(local_rank, torch.cuda.device_count())
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    os.environ["DS_ACCELERATOR"] = "cpu"
    return torch.device("cpu")


def cuda_index(local_rank: int, visible: int) -> int:
    """This rank's GPU among the ``visible`` ones. One task per GPU under Slurm
    (``--gpus-per-task=1``) sees only its own device, index 0, whatever its local rank; a task
    that sees all of the node's GPUs takes its local rank's; more ranks than GPUs share them
    round-robin rather than fail."""
    if visible < 1:
        raise ValueError("no CUDA device is visible")
    return local_rank % visible


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def threads_per_rank(configured: int | None, local_world_size: int) -> int:
    """torch's intra-op threads for this process: ``run.threads`` when set; else the user's
    OMP_NUM_THREADS; else the cores this process may use split evenly over the node's ranks
    (two ranks of two threads each on two cores would fight over them: every thread of one
    op waits for the slowest, so oversubscription costs far more than it shares)."""
    if configured is not None:
        return configured
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_world_size))

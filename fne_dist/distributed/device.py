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
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    os.environ["DS_ACCELERATOR"] = "cpu"
    return torch.device("cpu")


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"

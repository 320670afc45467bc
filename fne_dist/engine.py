"""The DeepSpeed engine (the project's only DeepSpeed import) and the learning-rate schedules."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import nn

from .config import Config, OptimConfig


def lr_lambda(cfg: OptimConfig, total_steps: int):
    """Multiplier of the peak lr at optimizer step s (0-based)."""

    def step_schedule(s: int) -> float:
        return cfg.gamma ** sum(s >= m for m in (cfg.milestones or []))

    def cosine(s: int) -> float:
        if s < cfg.warmup_steps:
            return (s + 1) / cfg.warmup_steps
        span = max(1, total_steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (s - cfg.warmup_steps) / span)))

    return {"step": step_schedule, "cosine": cosine, "constant": lambda s: 1.0}[cfg.schedule]


def deepspeed_config(cfg: Config) -> dict[str, Any]:
    """The DeepSpeed JSON for this run, derived from the typed config (one source of truth)."""
    return {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": cfg.engine.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        "bf16": {"enabled": cfg.engine.precision == "bf16"},
        "fp16": {"enabled": cfg.engine.precision == "fp16"},
        "steps_per_print": 10**9,  # our own progress reporting
        "wall_clock_breakdown": False,
    }


def build_engine(model: nn.Module, cfg: Config, total_steps: int):
    """Wrap ``model`` in a DeepSpeed engine with Adam(W), the lr schedule and clipping.

    A torch optimizer is passed in (not DeepSpeed's fused ones, which need compiled ops).
    """
    import deepspeed  # imported late: the accelerator must be chosen first (distributed.device)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, total_steps))
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg),
        dist_init_required=False,
    )
    return engine


def gathered_parameters(engine):
    """Context in which ``engine.module``'s parameters are whole on every rank.

    Under ZeRO-3 each rank holds a shard and ``p.data`` is empty outside forward: gather them
    (read-only) for the EMA. Stages 0-2 keep full parameters: nothing to do.
    """
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(
            list(engine.module.parameters()), modifier_rank=None
        )
    return contextlib.nullcontext()

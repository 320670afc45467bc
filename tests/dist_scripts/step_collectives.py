"""One rank of tests/test_step_collectives.py: the training loop with every Python-level
torch.distributed collective counted.

    RANK=r WORLD_SIZE=2 LOCAL_RANK=r ... [NAN_RANK=q NAN_STEP=n] python step_collectives.py OUT
        CONFIG [KEY=VALUE ...]

Runs ``loop.train`` and writes OUT/rank{r}.json: per micro step, the collectives inside
``train_step`` and those since the previous step ended (the data agreement, log windows,
checkpoints), by name. DDP's gradient all-reduce runs in its C++ reducer and is not counted.
With NAN_RANK, that rank's loss of micro step NAN_STEP (1-based) is made NaN, on it alone.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

import fne_dist.loop as loop
from fne_dist.config import load_config

NAMES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "barrier",
    "all_to_all_single", "reduce_scatter_tensor", "gather", "scatter",
)  # fmt: skip
calls: list[str] = []


def counted(name: str, fn):
    def wrapper(*args, **kwargs):
        calls.append(name)
        return fn(*args, **kwargs)

    return wrapper


def main() -> None:
    out, config, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    for name in NAMES:
        setattr(dist, name, counted(name, getattr(dist, name)))
    steps: list[dict] = []
    inner = loop.train_step
    mark = [0]

    def train_step(run, state, micro, epoch, batch):
        start = len(calls)
        result = inner(run, state, micro, epoch, batch)
        module = run.parts.engine.module
        steps.append(
            {
                "micro": micro,
                "between": calls[mark[0] : start],
                "inside": calls[start:],
                "skipped": state.skipped_nonfinite,
                "weights_finite": all(bool(p.isfinite().all()) for p in module.parameters()),
                # the ranks' weights stay equal (DDP's buckets reduce every trained gradient)
                "weights": [float(p.double().sum()) for p in module.parameters()],
                "temperature": float(module.temperature.detach().double().sum()),
            }
        )
        mark[0] = len(calls)
        return result

    loop.train_step = train_step
    if os.environ.get("NAN_RANK") == os.environ["RANK"]:  # a NaN loss on this rank only
        nan_step, inner_forward = int(os.environ["NAN_STEP"]), loop.forward_step

        def forward_step(*args, **kwargs):
            out = inner_forward(*args, **kwargs)
            if args[6].step + 1 == nan_step:  # StepPosition: 0-based micro step
                out.loss = out.loss + float("nan")
            return out

        loop.forward_step = forward_step
    loop.train(load_config(config, overrides))
    (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps(steps))


if __name__ == "__main__":
    main()

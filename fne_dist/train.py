"""``python -m fne_dist.train [--config FILE] [key=value ...]``: the main job.

Without ``--config`` it runs ``configs/default.yaml`` (the run tuned for the embedded emoji data;
its deviations from the paper's values are commented there), or the library defaults when the
package is installed without the repository's configs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from .checkpoint import CheckpointError
from .config import Config, ConfigError, load_config
from .data.sources import DataError
from .distributed.launch import rank_env
from .encoders import EncoderUnavailable

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fne_dist.train", description=__doc__)
    parser.add_argument("--config", help=f"YAML config file (default: {DEFAULT_CONFIG.name})")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. fne.prior=1e-3")
    # The deepspeed launcher (and torch.distributed.launch) append --local_rank=N to the command;
    # LOCAL_RANK in the environment says the same and is what distributed.launch reads.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def choose_launcher(cfg: Config, environ: dict[str, str] | None = None) -> str:
    """ "inplace" when a launcher set rank variables, else "ray" for several workers, else
    "local" (``dist.launcher`` forces local or ray)."""
    if cfg.dist.launcher != "auto":
        return cfg.dist.launcher
    if rank_env(environ).source != "none":
        return "inplace"
    return "ray" if cfg.dist.workers > 1 else "local"


def check_launch(cfg: Config, launcher: str, environ: dict[str, str] | None = None) -> None:
    """What ``Config.check`` cannot know, checked before any worker starts (one-line
    ConfigErrors): the world size an in-place launcher chose, and this machine's devices.

    Devices are not checked for a Ray cluster given by address: its workers may have GPUs that
    the driver lacks.
    """
    world = {"inplace": rank_env(environ).world_size, "ray": cfg.dist.workers}.get(launcher, 1)
    if 0 < cfg.memory.size < cfg.train.batch_size * world:
        raise ConfigError(
            f"memory.size={cfg.memory.size} is smaller than the global batch "
            f"({cfg.train.batch_size} × {world} ranks): one step would overwrite itself"
        )
    env = os.environ if environ is None else environ
    if launcher == "ray" and (cfg.dist.ray_address or env.get("RAY_ADDRESS")):
        return
    cuda = torch.cuda.is_available()
    ray_gpu = launcher == "ray" and cfg.dist.use_gpu
    if not cuda and (cfg.engine.device == "cuda" or ray_gpu):
        key = "dist.use_gpu=true" if ray_gpu else "engine.device=cuda"
        raise ConfigError(f"{key} but no CUDA device is visible (use engine.device=auto or cpu)")
    if cfg.engine.precision == "fp16" and (cfg.engine.device == "cpu" or not cuda):
        raise ConfigError(
            "engine.precision=fp16 is not supported on the CPU and no CUDA device is visible "
            "(use bf16 or fp32)"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    try:
        cfg = load_config(path, args.overrides)
        launcher = choose_launcher(cfg)
        check_launch(cfg, launcher)
        if launcher == "ray":
            from .distributed.ray_launcher import run_with_ray

            run_with_ray(cfg)
        else:  # in place: a plain process, or one rank of torchrun/deepspeed/accelerate/srun
            from .loop import train

            train(cfg)
    except (ConfigError, DataError, EncoderUnavailable, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

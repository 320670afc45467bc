"""``python -m fne_dist.train [--config FILE] [key=value ...]``: the main job.

Without ``--config`` it runs ``configs/default.yaml`` (the run tuned for the embedded emoji data;
its deviations from the paper's values are commented there), or the library defaults when the
package is installed without the repository's configs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import Config, ConfigError, load_config
from .data.pairs import DataError
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    try:
        cfg = load_config(path, args.overrides)
        launcher = choose_launcher(cfg)
        if launcher == "ray":
            from .distributed.ray_launcher import run_with_ray

            run_with_ray(cfg)
        else:  # in place: a plain process, or one rank of torchrun/deepspeed/accelerate/srun
            from .loop import train

            train(cfg)
    except (ConfigError, DataError, EncoderUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

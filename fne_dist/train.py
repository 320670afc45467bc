"""``python -m fne_dist.train [--config FILE] [key=value ...]``: the main job.

Placeholder until the end-to-end issue lands: it validates the configuration and writes the
resolved config into a new run directory, and trains nothing (see README, Quickstart).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import ConfigError, load_config, save_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fne_dist.train", description=__doc__)
    parser.add_argument("--config", help="YAML config file (default: library defaults)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. fne.prior=1e-3")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    print(f"resolved config written to {run_dir / 'config.yaml'}")
    print("placeholder: the training loop arrives with the end-to-end issue; nothing was trained")
    return 0


if __name__ == "__main__":
    sys.exit(main())

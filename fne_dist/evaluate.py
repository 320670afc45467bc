"""``python -m fne_dist.evaluate RUN_DIR [--split test] [--fold-size 1000]``

Evaluates a run directory (its config.yaml + model.safetensors) or an export of
``fne_dist.export`` (its own backbones: no model cache needed), or explicit weights with
``--weights W --config C [--shards PATTERN]``: strict R@1/5/10 both ways + rsum, and the
group-aware recall (a retrieved item of the query's group counts); ``--fold-size 1000`` gives the
COCO 1K protocol (mean over folds of 1,000 images).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .config import ConfigError, load_config
from .data.sources import DataError
from .export import fit_weights, load_weights
from .pretrained import is_export, load_towers
from .reporters import json_safe


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fne_dist.evaluate", description=__doc__)
    ap.add_argument("run_dir", nargs="?", help="a run directory written by fne_dist.train")
    ap.add_argument("--weights", help="model.safetensors (instead of RUN_DIR)")
    ap.add_argument("--config", help="the run's config.yaml (instead of RUN_DIR)")
    ap.add_argument("--split", default="test", choices=("train", "val", "test"))
    ap.add_argument("--shards", help="shard pattern to evaluate instead of the config's split")
    ap.add_argument("--fold-size", type=int, default=0, help="COCO 1K protocol: images per fold")
    args = ap.parse_args(argv)
    try:
        if args.run_dir:
            run = Path(args.run_dir)
            weights, config = run / "model.safetensors", run / "config.yaml"
        elif args.weights and args.config:
            weights, config = Path(args.weights), Path(args.config)
        else:
            raise ConfigError("give a run directory, or --weights and --config")
        tensors = load_weights(weights)  # checked (hash file, safetensors) before any model
        overrides = [f"data.{args.split}={args.shards}"] if args.shards else []
        cfg = load_config(config, overrides)
        towers = None
        if args.run_dir and is_export(Path(args.run_dir)):
            # an export's own backbones, tokenizer and preprocessing: no model cache needed
            _, image_backbone, text_backbone = load_towers(Path(args.run_dir))
            towers = (image_backbone, text_backbone)
        metrics = evaluate_weights(cfg, tensors, args.split, args.fold_size, str(weights), towers)
    except (ConfigError, DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # strict JSON on stdout: a metric that is not measured (NaN) is null, as in the run's logs
    print(json.dumps(json_safe(metrics), indent=1, allow_nan=False))
    return 0


def evaluate_weights(
    cfg,
    weights: dict,
    split: str,
    fold_size: int = 0,
    where: str = "weights",
    towers: tuple | None = None,
) -> dict[str, float]:
    """Rebuild the model from its config (or the given backbones), load weights, and evaluate
    one split (one process)."""
    from .distributed.device import threads_per_rank
    from .encoders import build_image_backbone, build_text_backbone
    from .loop_inputs import eval_table, split_shards
    from .model import build_dual_encoder
    from .sharded_eval import evaluate_table

    torch.set_num_threads(threads_per_rank(cfg.run.threads, 1))  # one process
    if towers is None:
        towers = build_image_backbone(cfg.model.image), build_text_backbone(cfg.model.text)
    image_backbone, text_backbone = towers
    model = build_dual_encoder(cfg.model, image_backbone, text_backbone)
    fit_weights(model, weights, where)
    shards = split_shards(cfg, split, image_backbone, text_backbone, log=lambda m: None)
    table = eval_table(cfg, split, shards, image_backbone, rank=0, world=1)
    return evaluate_table(model, table, fold_size)


if __name__ == "__main__":
    sys.exit(main())

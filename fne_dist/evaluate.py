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
from .export import fit_weights, load_weights, with_tower_weights
from .pretrained import is_export, load_towers
from .reporters import json_safe

HELP = """\
Retrieval recall of a trained model on one split: R@1/5/10 image-to-text and text-to-image,
their sum (rsum), and the group-aware recall (an item of the query's group counts as a hit).
Prints the numbers as JSON."""

EXAMPLES = """\
examples:
  %(prog)s runs/ref-1                        a run directory, its test split
  %(prog)s runs/ref-1 --split val
  %(prog)s runs/coco-1 --fold-size 1000      COCO 1K: mean over folds of 1,000 images
  %(prog)s exports/ref-1                     an export (no model cache needed)
  %(prog)s --weights model.safetensors --config config.yaml --shards 'data/x/{000..009}.tar'

exit status: 0 done; 2 a missing or broken file, config or data (one line says which)."""


def build_parser(prog: str = "python -m fne_dist.evaluate") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=prog,
        description=HELP,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "run_dir",
        nargs="?",
        metavar="RUN_OR_EXPORT",
        help="a run directory (run.output_dir/run.name) or an export directory",
    )
    ap.add_argument("--weights", metavar="FILE", help="model.safetensors (instead of a directory)")
    ap.add_argument("--config", metavar="FILE", help="the run's config.yaml (with --weights)")
    ap.add_argument(
        "--split", default="test", choices=("train", "val", "test"), help="default: test"
    )
    ap.add_argument(
        "--shards", metavar="PATTERN", help="shards to evaluate instead of the config's split"
    )
    ap.add_argument(
        "--fold-size",
        type=int,
        default=0,
        metavar="N",
        help="average over folds of N images (1000: COCO's 1K protocol; default: the whole split)",
    )
    return ap


def main(argv: list[str] | None = None, prog: str = "python -m fne_dist.evaluate") -> int:
    args = build_parser(prog).parse_args(argv)
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
    """Rebuild the model from its config (or the given backbones, holding their weights: an
    export's), load weights, and evaluate one split (one process)."""
    from .distributed.device import threads_per_rank
    from .encoders import build_image_backbone, build_text_backbone
    from .loop_inputs import eval_table, split_shards
    from .model import build_dual_encoder
    from .sharded_eval import evaluate_table
    from .towers import Towers

    torch.set_num_threads(threads_per_rank(cfg.run.threads, 1))  # one process
    given = towers is not None
    if towers is None:
        towers = build_image_backbone(cfg.model.image), build_text_backbone(cfg.model.text)
    image_backbone, text_backbone = towers
    model = build_dual_encoder(cfg.model, image_backbone, text_backbone)
    if given:  # an export's backbones hold their weights, which its weights leave out
        weights = with_tower_weights(model, weights)
    fit_weights(model, weights, where)
    given = Towers.given(cfg.model, image_backbone, text_backbone)
    shards = split_shards(cfg, split, given, log=lambda m: None)
    table = eval_table(cfg, split, shards, image_backbone, rank=0, world=1)
    return evaluate_table(model, table, fold_size)


if __name__ == "__main__":
    sys.exit(main())

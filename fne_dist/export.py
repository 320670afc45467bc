"""``python -m fne_dist.export RUN_OR_CHECKPOINT OUT``

Writes consolidated fp32 weights (``model.safetensors``) and the resolved config
(``config.yaml``) to OUT, loadable without DeepSpeed or Ray by ``python -m fne_dist.evaluate
OUT`` and by ``fne_dist.api.Retriever.load(OUT)``. The source is a run directory (its final
weights) or one checkpoint directory (validated first; every checkpoint holds the gathered
fp32 weights next to DeepSpeed's partitioned state).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from .checkpoint import META, CheckpointError, _sha256, validate


def export(source: Path, out: Path) -> dict:
    """Copy weights + config from a run or checkpoint directory to ``out``; returns its info."""
    if (source / META).is_file():
        meta = validate(source)
        origin = {"checkpoint": str(source), "step": meta.get("step")}
    elif (source / "model.safetensors").is_file():
        origin = {"run": str(source)}
    else:
        raise CheckpointError(f"{source}: neither a run directory nor a checkpoint")
    for name in ("model.safetensors", "config.yaml"):
        if not (source / name).is_file():
            raise CheckpointError(f"{source}: {name} is missing")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "config.yaml"):
        shutil.copyfile(source / name, out / name)
    info = {**origin, "sha256": {n: _sha256(out / n) for n in ("model.safetensors", "config.yaml")}}
    (out / "export.json").write_text(json.dumps(info, indent=1))
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fne_dist.export", description=__doc__)
    ap.add_argument("source", help="a run directory or a checkpoint directory (step-N)")
    ap.add_argument("out", help="output directory")
    args = ap.parse_args(argv)
    try:
        info = export(Path(args.source), Path(args.out))
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

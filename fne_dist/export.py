"""``python -m fne_dist.export RUN_OR_CHECKPOINT OUT``

Writes a self-contained export to OUT: consolidated fp32 weights (``model.safetensors``) and
their hash (``model.safetensors.sha256``, sha256sum's format), the resolved training config
(``config.yaml``), both backbones with the weights they hold (``image_encoder/``,
``text_encoder/``: frozen backbones included, which training kept outside the model), the
tokenizer files, the image preprocessing (``preprocessing.json``) and a small config
(``fne_export.json``). Each tensor is stored once: a trained backbone's tensors live in its
folder (a standard one, that opens on its own), and ``model.safetensors`` leaves out every
tensor that folder gives back bit for bit when read (``load_towers``); the loaders
(``Retriever.from_pretrained``, ``evaluate``) take those from the backbones they read
(``with_tower_weights``). ``fne_dist.api.Retriever.from_pretrained(OUT)`` and
``python -m fne_dist.evaluate OUT`` load it without DeepSpeed, Ray, the Hugging Face cache or
the encoders' weight packages. The source is a run directory (its final weights) or one
checkpoint directory (validated first; every checkpoint holds the gathered fp32 weights next
to DeepSpeed's partitioned state); its encoders must be available on the exporting machine.

Weights are checked before they are copied or used: a ``.sha256`` file next to them must match,
and the file must load as safetensors (a truncated or corrupt file fails with one line naming
it, exit status 2). OUT may not be the source nor an existing file; files are replaced
atomically. ``export.json`` records the source and the sha256 of every file written.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint.format import META, CheckpointError, sha256_of
from .checkpoint.validation import validate
from .config import ConfigError, load_config
from .encoders import build_image_backbone, build_text_backbone
from .model import build_dual_encoder
from .pretrained import load_towers, save_towers

WEIGHTS = "model.safetensors"
TOWERS = ("image_backbone.", "text_backbone.")  # a trained backbone's tensors in the model


def sidecar(weights: Path) -> Path:
    """``model.safetensors`` → ``model.safetensors.sha256``."""
    return weights.with_name(weights.name + ".sha256")


def write_sidecar(weights: Path) -> str:
    """Hash ``weights`` into its ``.sha256`` file (written atomically); returns the hash. Code
    that writes weights (the training loop's run directory) calls this after writing them."""
    digest = sha256_of(weights)
    tmp = sidecar(weights).with_name(sidecar(weights).name + ".tmp")
    tmp.write_text(f"{digest}  {weights.name}\n")
    os.replace(tmp, sidecar(weights))
    return digest


def load_weights(path: Path) -> dict[str, Tensor]:
    """The tensors of a safetensors file, after checking its ``.sha256`` file if there is one;
    a missing, corrupt or truncated file is a CheckpointError naming it (one line)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"weights not found: {path}")
    if sidecar(path).is_file():
        try:
            expected = sidecar(path).read_text().split()[0].lower()
        except (OSError, UnicodeDecodeError, IndexError):
            raise CheckpointError(f"{sidecar(path)}: unreadable hash file") from None
        if sha256_of(path) != expected:
            raise CheckpointError(f"{path}: corrupt (sha256 differs from {sidecar(path).name})")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a readable safetensors file ({first})") from None


def fit_weights(model: nn.Module, weights: dict[str, Tensor], where: str) -> None:
    """Load ``weights`` into ``model``; names or shapes that do not fit fail with one line."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        parts = [
            f"{len(names)} {what} (e.g. {names[0]!r})"
            for names, what in (
                (missing, "missing"),
                (unexpected, "unexpected"),
                (wrong, "of another shape"),
            )
            if names
        ]
        raise CheckpointError(
            f"{where}: the weights do not fit the config's model: {', '.join(parts)} tensors"
        )
    model.load_state_dict(weights)


def with_tower_weights(model: nn.Module, weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """``weights`` with the backbone tensors they lack taken from ``model``, whose backbones
    hold them: an export's ``model.safetensors`` leaves out what its backbone folders hold,
    and ``model`` is built around the backbones ``load_towers`` read from those folders."""
    held = model.state_dict()
    return {**{k: held[k] for k in held if k.startswith(TOWERS) and k not in weights}, **weights}


def _left_to_towers(out: Path, weights: dict[str, Tensor]) -> set[str]:
    """The names of ``weights`` that the backbone folders written to ``out`` give back bit for
    bit when read (``load_towers``, as the loaders read them): stored there, not again."""
    _, image_backbone, text_backbone = load_towers(out)
    held = {
        f"{prefix}{k}": v
        for prefix, backbone in zip(TOWERS, (image_backbone, text_backbone), strict=True)
        for k, v in backbone.state_dict().items()
    }
    return {
        k
        for k, v in weights.items()
        if k in held and held[k].dtype == v.dtype and held[k].shape == v.shape
        and torch.equal(held[k], v)
    }  # fmt: skip


def _write_weights(weights: dict[str, Tensor], path: Path) -> None:
    """``weights`` to ``path`` through a temporary file and a rename."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp))
    os.replace(tmp, path)


def _check_out(source: Path, out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"OUT {out} exists and is not a directory")
    if out.resolve() == source.resolve():
        raise CheckpointError(f"OUT {out} is the source: export into another directory")


def _copy_into(src: Path, out: Path) -> None:
    """Copy ``src`` to ``out/<name>`` through a temporary file and a rename."""
    tmp = out / f".{src.name}.tmp"
    shutil.copyfile(src, tmp)
    os.replace(tmp, out / src.name)


def export(source: Path, out: Path) -> dict:
    """Copy weights + config from a run or checkpoint directory to ``out``; returns its info."""
    if (source / META).is_file():
        meta = validate(source)
        origin = {"checkpoint": str(source), "step": meta.get("step")}
    elif (source / WEIGHTS).is_file():
        origin = {"run": str(source)}
    else:
        raise CheckpointError(f"{source}: neither a run directory nor a checkpoint")
    for name in (WEIGHTS, "config.yaml"):
        if not (source / name).is_file():
            raise CheckpointError(f"{source}: {name} is missing")
    _check_out(source, out)
    weights = load_weights(source / WEIGHTS)  # a run directory's weights have no meta.json hash
    cfg = load_config(source / "config.yaml")
    # The trained model as evaluate builds it: a trainable backbone then holds its trained
    # weights, a frozen one the pretrained weights its cached features came from.
    image_backbone = build_image_backbone(cfg.model.image)
    text_backbone = build_text_backbone(cfg.model.text)
    fit_weights(build_dual_encoder(cfg.model, image_backbone, text_backbone), weights, str(source))
    try:
        out.mkdir(parents=True, exist_ok=True)
        _copy_into(source / "config.yaml", out)
        save_towers(cfg.model, image_backbone, text_backbone, out)
        stored = _left_to_towers(out, weights)  # each tensor once: not again in WEIGHTS
        _write_weights({k: v for k, v in weights.items() if k not in stored}, out / WEIGHTS)
        write_sidecar(out / WEIGHTS)
        files = sorted(
            p.relative_to(out).as_posix()
            for p in out.rglob("*")
            if p.is_file() and p.name != "export.json" and not p.name.startswith(".")
        )
        info = {**origin, "sha256": {n: sha256_of(out / n) for n in files}}
        (out / "export.json").write_text(json.dumps(info, indent=1))
    except OSError as err:
        raise CheckpointError(f"{out}: cannot write the export ({err.strerror or err})") from None
    return info


HELP = """\
Write a trained model to a directory that holds everything inference needs: the weights
(frozen backbones included), the tokenizer, the image preprocessing and a small config.
Load it with fne_dist.api.Retriever.from_pretrained(OUT), or evaluate it with
`fne-dist evaluate OUT`: no DeepSpeed, Ray or model cache is needed where it is loaded.
The encoders must be available on the machine that exports."""

EXAMPLES = """\
examples:
  %(prog)s runs/ref-1 exports/ref-1                              the run's final weights
  %(prog)s runs/ref-1/checkpoints/step-00002000 exports/ref-1-2k  one checkpoint

Weights are checked (their .sha256, then as safetensors) before they are used; OUT/export.json
records the source and the sha256 of every file written.
exit status: 0 done; 2 a missing, truncated or mismatched file (one line says which)."""


def build_parser(prog: str = "python -m fne_dist.export") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=prog,
        description=HELP,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "source",
        metavar="RUN_OR_CHECKPOINT",
        help="a run directory, or one of its checkpoints (checkpoints/step-N)",
    )
    ap.add_argument(
        "out", metavar="OUT", help="output directory (created; an earlier export there is replaced)"
    )
    return ap


def main(argv: list[str] | None = None, prog: str = "python -m fne_dist.export") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        info = export(Path(args.source), Path(args.out))
    except (CheckpointError, ConfigError, ValueError) as err:
        # ValueError: an encoder of the config that is not on this machine (one line)
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``fne-dist COMMAND ...`` (also ``python -m fne_dist``): one entry point for every tool.

Each command hands its arguments to the module that implements it (``fne_dist.train``,
``fne_dist.evaluate``, ``fne_dist.export``, ``fne_dist.shards``, ``fne_dist.plot``), so
``fne-dist train ARGS`` and ``python -m fne_dist.train ARGS`` are the same run with the same
exit status. Modules are imported only for the command that needs them, so ``fne-dist --help``
answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PROG = "fne-dist"


@dataclass(frozen=True)
class Command:
    name: str
    module: str  # its main(argv) parses the rest of the command line
    summary: str  # one line in `fne-dist --help`


COMMANDS = (
    Command("train", "fne_dist.train", "train a model (locally, under a launcher, or on Ray)"),
    Command("evaluate", "fne_dist.evaluate", "retrieval recall of a run directory or weights"),
    Command("export", "fne_dist.export", "write a trained model to a directory for inference"),
    Command("shards", "fne_dist.shards.__main__", "turn image-text data into WebDataset shards"),
    Command("plot", "fne_dist.plot", "draw the pictures of a run directory"),
    Command("config", "fne_dist.cli", "list the config keys, or print a resolved config"),
)

DESCRIPTION = """\
Distributed image-text matching with False Negative Elimination (FNE).

Run `fne-dist COMMAND --help` for the options of a command."""

EPILOG = """\
examples:
  fne-dist train                                  the default run (emoji data, 2 Ray workers)
  fne-dist train --config configs/reference.yaml run.name=ref-1
  fne-dist evaluate runs/ref-1 --fold-size 1000   COCO's 1K protocol
  fne-dist config keys                            every config key, default and valid range
  fne-dist config show --config configs/reference.yaml optim.lr=3e-5

`fne-dist train` is `python -m fne_dist.train`: torchrun, deepspeed, srun and accelerate
launch start either (docs/launching.md)."""


def top_parser() -> argparse.ArgumentParser:
    """The top-level parser: what ``fne-dist --help`` shows. It never parses a command's own
    arguments: those go to the command's module untouched."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for command in COMMANDS:
        sub.add_parser(command.name, help=command.summary, add_help=False)
    return parser


def _call(main: Callable[..., int], argv: list[str], prog: str) -> int:
    """``main(argv)``, with ``prog`` for its usage line when it takes one."""
    if "prog" in inspect.signature(main).parameters:
        return int(main(argv, prog=prog) or 0)
    return int(main(argv) or 0)


# ------------------------------------------------------------------------------ fne-dist config


def config_parser(prog: str = f"{PROG} config") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Inspect the run configuration: every key with its meaning, default and "
        "valid values, or the config a run would use.",
    )
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    keys = sub.add_parser(
        "keys",
        help="list every config key with its meaning, default and valid values",
        description="List every config key with its type, default, valid values and meaning.",
    )
    keys.add_argument(
        "--format",
        choices=("text", "markdown"),
        default="text",
        help="text (default) or markdown: the reference page docs/configuration.md",
    )
    show = sub.add_parser(
        "show",
        help="print the resolved config of a run (file + overrides, every default filled in)",
        description="Print the config a run would use, as YAML that --config reads back: the "
        "file, then the overrides, every default filled in. A bad key or value exits with "
        "status 2 and one line naming it.",
    )
    show.add_argument(
        "--config",
        metavar="FILE",
        help="YAML config file (default: the one `fne-dist train` uses without --config)",
    )
    show.add_argument(
        "overrides", nargs="*", metavar="key=value", help="overrides, e.g. fne.prior=1e-3"
    )
    return parser


def config_main(argv: list[str] | None = None, prog: str = f"{PROG} config") -> int:
    """``fne-dist config keys|show``; returns the exit status."""
    from .config import ConfigError
    from .config_reference import reference_markdown, reference_text, resolved_config

    args = config_parser(prog).parse_args(argv)
    if args.action == "keys":
        sys.stdout.write(reference_markdown() if args.format == "markdown" else reference_text())
        return 0
    path = Path(args.config) if args.config else _default_config()
    try:
        text = resolved_config(path, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    overrides = " ".join(args.overrides)
    source = str(path) if path is not None else "library defaults"
    sys.stdout.write(f"# resolved: {source}{' + ' + overrides if overrides else ''}\n{text}")
    return 0


def _default_config() -> Path | None:
    """The packaged default.yaml, read without importing fne_dist.train (and so torch)."""
    path = Path(__file__).resolve().parent / "configs" / "default.yaml"
    return path if path.is_file() else None


# ------------------------------------------------------------------------------------- dispatch


def main(argv: list[str] | None = None) -> int:
    """``fne-dist COMMAND ARGS``: runs the command's module with ARGS; returns its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    by_name = {c.name: c for c in COMMANDS}
    if not argv or argv[0] not in by_name:
        parser = top_parser()
        if not argv:
            parser.print_help(sys.stderr)
            return 2
        parser.parse_args(argv)  # --help, --version, or an unknown command (exit 2)
        return 2
    command, rest = by_name[argv[0]], argv[1:]
    prog = f"{PROG} {command.name}"
    if command.name == "config":
        return config_main(rest, prog)
    return _call(entry_point(command.module), rest, prog)


def entry_point(name: str) -> Callable[..., int]:
    """The ``main`` that ``python -m name`` runs: the module's own, or for a package whose
    command line lives in its ``__main__`` module, that one's."""
    module = importlib.import_module(name)
    if not hasattr(module, "main"):
        module = importlib.import_module(f"{name}.__main__")
    return module.main


if __name__ == "__main__":
    sys.exit(main())

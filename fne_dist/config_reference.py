"""Every config key with its doc, default and valid range, read from the typed config classes.

    fne-dist config keys [--format markdown]      # the reference (text, or docs/configuration.md)
    fne-dist config show [--config FILE] [key=value ...]
    python -m fne_dist.config_reference [--write FILE | --resolved ...]   # the same, older form

The reference is generated, never written by hand: ``config_keys`` walks the dataclasses of
``fne_dist.config`` (the ``fne`` section is ``fne_dist.fne.params.FneConfig``) and reads each
field's doc, default, bounds and choices wherever the field states them (``setting(...)``
metadata, a ``Literal`` type, or ``Annotated`` bounds), so fields added, removed or retyped show
up without touching this module. ``tests/test_config_reference.py`` fails when
docs/configuration.md differs from what this module prints.

``--resolved`` prints the config a run would use (file + overrides, every default filled in) as
YAML that ``--config`` reads back; a bad key or value exits 2 with one line, as training does.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import operator
import sys
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .config import Config, ConfigError, config_text, load_config

BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
REGENERATE = "fne-dist config keys --format markdown > docs/configuration.md"


@dataclass(frozen=True)
class KeyDoc:
    """One config key: what a user sets, what it means, and what is valid."""

    key: str  # dotted, e.g. "fne.prior"
    type: str  # as YAML sees it: int, float, bool, str, list[int], ... | null
    default: Any
    doc: str
    bounds: tuple[tuple[str, Any], ...]  # (">=", 0.0), ("<", 1.0): every one must hold
    choices: tuple[Any, ...]  # empty: any value of the type


def _strip_annotated(tp: Any) -> tuple[Any, list[Any]]:
    """``Annotated[T, m1, m2]`` → (T, [m1, m2]); any other type → (tp, [])."""
    extras: list[Any] = []
    while typing.get_origin(tp) is typing.Annotated:
        tp, *more = typing.get_args(tp)
        extras.extend(more)
    return tp, extras


def _non_null(tp: Any) -> tuple[Any, bool]:
    """The type without ``None`` of an optional ``T | None``, and whether ``None`` was there."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        nullable = len(args) < len(typing.get_args(tp))
        return functools.reduce(operator.or_, args), nullable
    return tp, False


def _scalar(tp: Any) -> tuple[Any, list[Any]]:
    """The scalar a field holds (inside ``| None``, ``list[...]`` and ``Annotated``), with
    every ``Annotated`` extra met on the way (they may carry bounds)."""
    tp, extras = _strip_annotated(tp)
    tp, _ = _non_null(tp)
    tp, more = _strip_annotated(tp)
    extras += more
    if typing.get_origin(tp) is list:
        inner, more = _scalar(typing.get_args(tp)[0])
        return inner, extras + more
    return tp, extras


def _type_name(tp: Any) -> str:
    tp, _ = _strip_annotated(tp)
    tp, nullable = _non_null(tp)
    tp, _ = _strip_annotated(tp)
    if typing.get_origin(tp) is list:
        name = f"list[{_type_name(typing.get_args(tp)[0])}]"
    elif typing.get_origin(tp) is Literal:
        kinds = sorted({type(a).__name__ for a in typing.get_args(tp)})
        name = " | ".join(kinds)
    elif typing.get_origin(tp) in (typing.Union, types.UnionType):
        name = " | ".join(_type_name(a) for a in typing.get_args(tp))
    else:
        name = getattr(tp, "__name__", str(tp))
    return f"{name} | null" if nullable else name


def _bounds_of(meta: typing.Mapping[str, Any], extras: list[Any]) -> tuple[tuple[str, Any], ...]:
    """Bounds from the field's metadata and from ``Annotated`` extras (annotated_types'
    ``Ge``/``Gt``/..., ``pydantic.Field(ge=...)``, whose constraints sit in ``.metadata``)."""
    found: dict[str, Any] = {name: meta[name] for name, _ in BOUNDS if name in meta}
    pending = list(extras)
    while pending:
        extra = pending.pop(0)
        pending.extend(getattr(extra, "metadata", None) or [])
        for name, _ in BOUNDS:
            value = getattr(extra, name, None)
            if value is not None and not callable(value):
                found.setdefault(name, value)
    return tuple((sign, found[name]) for name, sign in BOUNDS if name in found)


def _doc_of(meta: typing.Mapping[str, Any], extras: list[Any]) -> str:
    if meta.get("doc"):
        return str(meta["doc"])
    for extra in extras:  # Annotated[T, pydantic.Field(description=...)]
        if getattr(extra, "description", None):
            return str(extra.description)
    return ""


def _default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _section_type(tp: Any) -> type | None:
    """The dataclass a field holds when it is a section (possibly ``Annotated``), else None."""
    tp, _ = _strip_annotated(tp)
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def config_keys(cls: type = Config, prefix: str = "") -> list[KeyDoc]:
    """Every leaf key of the config dataclass ``cls``, in declaration order, sections walked."""
    hints = typing.get_type_hints(cls, include_extras=True)
    keys: list[KeyDoc] = []
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        section = _section_type(tp)
        if section is not None:
            keys.extend(config_keys(section, f"{key}."))
            continue
        scalar, extras = _scalar(tp)
        _, own = _strip_annotated(tp)
        extras = own + extras
        choices = typing.get_args(scalar) if typing.get_origin(scalar) is Literal else ()
        keys.append(
            KeyDoc(
                key=key,
                type=_type_name(tp),
                default=_default_of(f),
                doc=_doc_of(f.metadata, extras),
                bounds=_bounds_of(f.metadata, extras),
                choices=choices,
            )
        )
    return keys


def sections(cls: type = Config) -> Iterator[tuple[str, type]]:
    """The (dotted name, dataclass) of every section below ``cls``, in declaration order."""
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        section = _section_type(hints[f.name])
        if section is not None:
            yield f.name, section
            for name, inner in sections(section):
                yield f"{f.name}.{name}", inner


def yaml_value(value: Any) -> str:
    """A default as it would be written in a config file (``null``, ``true``, ``[5, 15]``)."""
    if value is dataclasses.MISSING:
        return "(required)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    return repr(value) if isinstance(value, float) else str(value)


def _bound_text(value: Any) -> str:
    """A bound as a reader checks it: 2^63 rather than 9223372036854775808."""
    big_power = isinstance(value, int) and value >= 2**20 and value & (value - 1) == 0
    return f"2^{value.bit_length() - 1}" if big_power else yaml_value(value)


def _range_text(item: KeyDoc) -> str:
    if item.choices:
        return " \\| ".join(f"`{yaml_value(c)}`" for c in item.choices)
    if not item.bounds:
        return "any"
    return ", ".join(f"{sign} {_bound_text(v)}" for sign, v in item.bounds)


def valid_text(item: KeyDoc) -> str:
    """What values a key takes, as plain text: ``auto | cpu | cuda``, ``>= 0, < 1.0``, ``any``."""
    if item.choices:
        return " | ".join(yaml_value(c) for c in item.choices)
    if item.type.startswith("bool"):
        return "true | false"
    if not item.bounds:
        return "any"
    return ", ".join(f"{sign} {_bound_text(v)}" for sign, v in item.bounds)


def reference_text() -> str:
    """Every key as a terminal reads it (``fne-dist config keys``): a line with the key, its
    type, default and valid values, then its meaning, indented."""
    lines = []
    for item in config_keys():
        lines.append(
            f"{item.key} ({item.type}) = {yaml_value(item.default)}    valid: {valid_text(item)}"
        )
        lines.append(f"    {item.doc}")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell (a '|' would split it, '<x>' read as HTML)."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace("\n", " ")


def _section_doc(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    # dataclasses give a class without a docstring its signature as __doc__: not a doc.
    return "" if doc.startswith(f"{cls.__name__}(") else doc.split("\n\n")[0].replace("\n", " ")


def reference_markdown() -> str:
    """docs/configuration.md: every key of every section with its doc, default and range."""
    keys = config_keys()
    lines = [
        "# Configuration reference",
        "",
        f"<!-- Generated from the code by `{REGENERATE}`; do not edit by hand. -->",
        "",
        "Every key of a run's config, read from the typed config classes (`fne_dist/config.py`; "
        "the `fne` section is `fne_dist/fne/params.py`). Set keys in a YAML file "
        "(`fne-dist train --config FILE`) or on the command line as "
        "`section.key=value` (`fne.prior=1e-3 optim.lr=3e-5`; overrides win over the file). A "
        "file may build on another with `base: other.yaml` (relative to it). An unknown key or "
        "a bad value stops the run at start-up with one line naming the key, e.g. "
        "`config key 'fne.prior': must be < 1.0, got 3.0` (exit 2).",
        "",
        "Types are strict (text is not a number, a number is not text: quote it); floats must be "
        "finite and ints fit int64 unless a tighter range is listed. YAML reads `1e-3` as a "
        'float and a quoted `"2024"` as text; anchors, aliases and repeated keys are refused. '
        "The defaults below are the paper's reference values, as is `configs/reference.yaml`; "
        "`configs/default.yaml` (the default run) deviates where its comments say why. To see "
        "the config a run would use, every default filled in:",
        "",
        "```bash",
        "fne-dist config show --config configs/default.yaml fne.eps=0.3",
        "```",
        "",
        f"{len(keys)} keys in {sum(1 for _ in sections())} sections.",
    ]
    for name, cls in sections():
        own = [k for k in keys if k.key.rpartition(".")[0] == name]
        if not own:
            continue
        lines += ["", f"## `{name}`", ""]
        doc = _section_doc(cls)
        if doc:
            lines += [_cell(doc), ""]
        lines += ["| key | type | default | valid | meaning |", "|---|---|---|---|---|"]
        for item in own:
            default = yaml_value(item.default).replace("|", "\\|")  # a code span: no &lt;
            lines.append(
                f"| `{item.key}` | {_cell(item.type)} | `{default}` | {_range_text(item)} "
                f"| {_cell(item.doc)} |"
            )
    return "\n".join(lines) + "\n"


def resolved_config(path: str | Path | None = None, overrides: list[str] | None = None) -> str:
    """The config a run would use, as YAML: ``path`` (None: the library defaults) with the
    ``key=value`` overrides, validated, every default filled in. Raises ``ConfigError``."""
    return config_text(load_config(path, overrides))


def _default_config_path() -> Path | None:
    """The file ``python -m fne_dist.train`` reads without --config, when it exists."""
    from . import train  # lazily: it imports torch, which the reference does not need

    path = getattr(train, "DEFAULT_CONFIG", None)
    return Path(path) if path is not None and Path(path).is_file() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fne_dist.config_reference",
        description="Print every config key with its doc, default and range (Markdown), or "
        "the resolved config of a run (YAML).",
    )
    parser.add_argument("--write", metavar="FILE", help="write the reference to FILE")
    parser.add_argument(
        "--resolved",
        action="store_true",
        help="print the resolved config (file + overrides, defaults filled in) as YAML",
    )
    parser.add_argument(
        "--config", help="with --resolved: YAML config file (default: the training default)"
    )
    parser.add_argument("overrides", nargs="*", help="with --resolved: key=value overrides")
    args = parser.parse_args(argv)
    if not args.resolved and (args.config or args.overrides):
        parser.error("--config and key=value overrides need --resolved")
    if args.resolved:
        path = args.config if args.config else _default_config_path()
        try:
            text = resolved_config(path, args.overrides)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        source = path if path is not None else "library defaults"
        overrides = " ".join(args.overrides)
        sys.stdout.write(f"# resolved: {source}{' + ' + overrides if overrides else ''}\n{text}")
        return 0
    text = reference_markdown()
    if args.write:
        Path(args.write).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

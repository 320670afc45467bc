"""The configuration reference is generated from the config classes and kept current.

docs/configuration.md is what ``python -m fne_dist.config_reference`` prints; it lists every
key with its doc, default and valid range as the loader enforces them, and ``--resolved``
prints the config a run would use. No process is started: the CLI is called in-process.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import pytest
import yaml

from fne_dist.config import Config, ConfigError, load_config
from fne_dist.config_reference import (
    REGENERATE,
    config_keys,
    main,
    reference_markdown,
    resolved_config,
    yaml_value,
)
from fne_dist.fne.params import setting

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "configuration.md"


def _leaves(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Every leaf value of a config instance by dotted key (walked by values, not types)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_leaves(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return out


def test_configuration_md_is_current() -> None:
    """Invariant: docs/configuration.md equals what the code generates, so a config field added,
    removed, re-documented or re-ranged without regenerating the page fails here."""
    actual = DOC.read_text() if DOC.is_file() else "(missing)"
    assert actual == reference_markdown(), (
        f"docs/configuration.md is stale: regenerate it with `{REGENERATE}`"
    )


def test_every_key_once_with_its_default_and_doc() -> None:
    """Invariant: the reference lists every leaf key of ``Config`` exactly once, in declaration
    order, with the default a default-constructed config holds and a non-empty doc."""
    keys = config_keys()
    expected = _leaves(Config())
    assert [k.key for k in keys] == list(expected)
    assert {k.key: k.default for k in keys} == expected
    undocumented = [k.key for k in keys if not k.doc.strip()]
    assert not undocumented, f"config keys without a doc: {undocumented}"


def _outside(bound: tuple[str, Any]) -> Any:
    """A value that violates one listed bound."""
    sign, limit = bound
    step = 1 if isinstance(limit, int) else 1.0
    return {">": limit, ">=": limit - step, "<": limit, "<=": limit + step}[sign]


def test_listed_ranges_and_choices_are_enforced() -> None:
    """Invariant: every bound and choice list the reference states is one the loader enforces:
    a value just outside a listed bound, or not among the listed choices, is refused with a
    one-line error naming the key. (The page never promises a check the code does not make.)"""
    checked = 0
    for item in config_keys():
        bad: list[Any] = [_outside(b) for b in item.bounds]
        if item.choices:
            bad.append("not-a-listed-choice")
        for value in bad:
            text = yaml_value(value)
            if item.type.startswith("list"):
                text = f"[{text}]"
            with pytest.raises(ConfigError, match=item.key.replace(".", r"\.")):
                load_config(None, [f"{item.key}={text}"])
            checked += 1
    assert checked > 50  # the walk found the ranges at all


@dataclass
class _TypedSection:
    mode: Literal["fast", "exact"] = setting("fast", "how to run")
    count: Annotated[int, pydantic.Field(ge=1, lt=10)] = setting(3, "how many")
    scale: float | None = setting(None, "optional scale", gt=0.0)
    names: list[str] = field(default_factory=list, metadata={"doc": "names"})


@dataclass
class _TypedConfig:
    section: _TypedSection = field(default_factory=_TypedSection)
    flag: bool = setting(False, "a top-level flag")


def test_choices_and_bounds_are_read_from_types_too() -> None:
    """Invariant: choices given as a ``Literal`` type and bounds given through ``Annotated`` are
    documented like ``setting(...)`` metadata, so retyping the config classes keeps the page
    complete without touching the generator."""
    keys = {k.key: k for k in config_keys(_TypedConfig)}
    assert list(keys) == ["section.mode", "section.count", "section.scale", "section.names", "flag"]
    assert keys["section.mode"].choices == ("fast", "exact")
    assert keys["section.mode"].type == "str"
    assert keys["section.count"].bounds == ((">=", 1), ("<", 10))
    assert keys["section.scale"].bounds == ((">", 0.0),)
    assert keys["section.scale"].type == "float | null"
    assert keys["section.names"].default == [] and keys["section.names"].type == "list[str]"
    assert keys["flag"].doc == "a top-level flag"


def test_resolved_config_reads_back(tmp_path: Path) -> None:
    """Invariant: the resolved YAML holds the file's values, the overrides and every default,
    and reading it back as a config file gives the same config."""
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 1.0e-3\n")
    text = resolved_config(path, ["fne.eps=0.3"])
    data = yaml.safe_load(text)
    flat = {f"{s}.{k}" for s, keys in data.items() for k in keys}
    sections = {k.key.split(".")[0] for k in config_keys()}
    assert sections == set(data)
    assert {k.key for k in config_keys() if k.key.count(".") == 1} <= flat
    back = tmp_path / "resolved.yaml"
    back.write_text(text)
    assert load_config(back) == load_config(path, ["fne.eps=0.3"])
    assert load_config(back).optim.lr == 1e-3 and load_config(back).fne.eps == 0.3


def test_cli_resolved_prints_yaml_and_refuses_bad_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Invariant: ``--resolved`` prints the config as YAML; a bad key is one ``error:`` line on
    stderr and exit 2, as in training, never a traceback."""
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  epochs: 2.0\n")
    assert main(["--resolved", "--config", str(path), "memory.size=64"]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out)["memory"]["size"] == 64
    assert yaml.safe_load(out)["train"]["epochs"] == 2.0
    assert main(["--resolved", "--config", str(path), "fne.nope=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown config key 'fne.nope'") and err.count("\n") == 1


def test_cli_write(tmp_path: Path) -> None:
    """Invariant: ``--write FILE`` writes exactly the reference the test above compares."""
    target = tmp_path / "configuration.md"
    assert main(["--write", str(target)]) == 0
    assert target.read_text() == reference_markdown()

"""Typed run configuration: YAML files plus ``key=value`` overrides, validated once at load.

    python -m fne_dist.train --config configs/x.yaml fne.prior=1e-3 optim.lr=3e-5

Every section is a dataclass; a field's metadata carries its doc string and valid range
(``ge``/``gt``/``le``/``lt``/``choices``). An unknown key or a wrong type or range raises
``ConfigError`` (a ``ValueError``) with one line naming the key and what is valid. Library
defaults are the paper's reference values (fne-algorithm.md §1); config files state deviations.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .fne.params import FneConfig, setting


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message is one line naming the key."""


@dataclass
class RunConfig:
    name: str = setting("fne", "run name: the run directory is output_dir/name")
    output_dir: str = setting("runs", "where run directories are written")
    seed: int = setting(3407, "seed of every generator (reference: 3407)", ge=0)
    threads: int = setting(
        2, "torch intra-op threads per process (pinned: results depend on it)", ge=1
    )


@dataclass
class MemoryConfig:
    size: int = setting(
        8224, "K: momentum memory slots (reference 8224; ≤ half the train split)", ge=0
    )
    momentum: float = setting(0.995, "EMA coefficient m of the momentum encoders", ge=0.0, le=1.0)


@dataclass
class OptimConfig:
    lr: float = setting(2e-5, "peak learning rate (reference Adam 2e-5)", gt=0.0)
    weight_decay: float = setting(0.0, "decoupled weight decay", ge=0.0)
    grad_clip: float = setting(2.0, "gradient-norm clip (0 = off)", ge=0.0)
    schedule: str = setting(
        "step", "learning-rate schedule", choices=("step", "cosine", "constant")
    )
    milestones: list[int] | None = setting(
        None, "step schedule: steps where lr is multiplied by gamma (null = none)"
    )
    gamma: float = setting(0.1, "step schedule: factor at each milestone", gt=0.0)
    warmup_steps: int = setting(0, "cosine schedule: linear warm-up steps", ge=0)


@dataclass
class TrainConfig:
    batch_size: int = setting(32, "local batch per rank (reference 32)", ge=1)
    steps: int = setting(0, "optimizer steps to run (0: nothing is trained yet, see README)", ge=0)
    warmup_steps: int = setting(0, "steps of in-batch vse_pp before the configured loss", ge=0)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    fne: FneConfig = field(default_factory=FneConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def check(self) -> None:
        """Rules that span fields or sections."""
        self.fne.check()


def _describe(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(key: str, tp: Any, value: Any, meta: dict[str, Any]) -> Any:
    """Check ``value`` against the annotation ``tp`` and the field's range; return it."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(key, inner, value, meta)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(
                f"config key '{key}': expected a list of {_describe(inner)}, got {value!r}"
            )
        return [_coerce(f"{key}[{i}]", inner, v, meta) for i, v in enumerate(value)]
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    else:
        raise TypeError(f"unsupported config type {tp} for {key}")
    if not ok:
        raise ConfigError(f"config key '{key}': expected {_describe(tp)}, got {value!r}")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(
            f"config key '{key}': {value!r} is not one of {', '.join(map(str, meta['choices']))}"
        )
    for bound, test, word in (
        ("ge", lambda v, b: v >= b, ">="),
        ("gt", lambda v, b: v > b, ">"),
        ("le", lambda v, b: v <= b, "<="),
        ("lt", lambda v, b: v < b, "<"),
    ):
        if bound in meta and not test(value, meta[bound]):
            raise ConfigError(f"config key '{key}': must be {word} {meta[bound]}, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.')}' must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(
                f"unknown config key '{prefix}{key}'{hint}; valid keys: {', '.join(fields)}"
            )
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name], f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(f"{prefix}{name}", tp, data[name], dict(f.metadata))
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Validated ``Config`` from a nested mapping (missing keys take the defaults)."""
    cfg = _build(Config, data or {}, "")
    try:
        cfg.check()
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one ``a.b=value`` (value parsed as YAML: 1e-3, true, [5, 15], null, text)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: '{part}' is not a section")
    try:
        value = _fix_yaml_floats(yaml.safe_load(raw)) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (or defaults), apply overrides, validate once."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {p} is not valid YAML: {err}".splitlines()[0]) from None
        data = _fix_yaml_floats(data)
    for override in overrides or []:
        apply_override(data, override)
    return config_from_dict(data)


_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _fix_yaml_floats(node: Any) -> Any:
    """PyYAML (YAML 1.1) reads 1e-3 as a string: convert such strings back to floats."""
    if isinstance(node, dict):
        return {k: _fix_yaml_floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_fix_yaml_floats(v) for v in node]
    if isinstance(node, str) and _FLOAT.match(node):
        return float(node)
    return node


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config (every field, defaults included) as YAML."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))

"""Config: YAML + overrides, validated once; every error names the bad key."""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import tracemalloc
import typing
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from fne_dist.config import (
    Config,
    ConfigError,
    _Dumper,
    _Loader,
    _validate_fields,
    apply_override,
    config_to_dict,
    load_config,
    save_config,
)
from fne_dist.fne.params import setting

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "override, names",
    [
        ("fne.priorr=0.1", ["fne.priorr", "fne.prior"]),  # unknown key, with the close match
        ("fne.prior=2", ["fne.prior", "< 1.0"]),  # out of range
        ("fne.loss=triplet", ["fne.loss", "fne, window, vse_pp, vse0, infonce"]),  # choices
        ("memory.size=big", ["memory.size", "int"]),  # wrong type
        ("optim.milestones=[5, x]", ["optim.milestones[1]"]),
        ("fne.hard_cut=1", ["fne.hard_cut", "bool"]),
        ("nosection.x=1", ["nosection"]),
        ("fne.temperature=0.9", ["fne.temperature"]),  # cross-field rule
    ],
)
def test_errors_name_the_key(override: str, names: list[str]) -> None:
    """Invariant: a bad key, type or range fails at load with one line naming the key and the
    valid choices."""
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert "\n" not in message
    for name in names:
        assert name in message


def test_overrides_and_yaml(tmp_path: Path) -> None:
    """Invariant: file values override defaults, command-line overrides override the file,
    scientific notation is a float, and the saved resolved config loads back identically."""
    path = tmp_path / "x.yaml"
    path.write_text("fne:\n  prior: 1e-3\n  loss: window\noptim:\n  milestones: [5, 15]\n")
    cfg = load_config(path, ["fne.loss=vse_pp", "optim.lr=3e-5", "fne.hard_cut_margin=null"])
    assert cfg.fne.prior == 1e-3 and cfg.fne.loss == "vse_pp" and cfg.optim.lr == 3e-5
    assert cfg.optim.milestones == [5, 15] and cfg.fne.hard_cut_margin is None
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert config_to_dict(again) == config_to_dict(cfg)


def test_defaults_are_the_paper_values() -> None:
    """Invariant: library defaults are the reference values of docs/algorithm.md §1-4."""
    cfg = load_config()
    assert (cfg.fne.margin, cfg.fne.prior, cfg.fne.eps) == (0.2, 1e-4, 1e-3)
    assert (cfg.fne.tau_kernel, cfg.fne.tau_fn, cfg.fne.gate_size) == (0.5, 0.5, 200)
    assert cfg.fne.cut_margin == cfg.fne.margin and cfg.fne.negatives == 1
    assert (cfg.memory.size, cfg.memory.momentum) == (8224, 0.995)
    assert (cfg.optim.lr, cfg.optim.grad_clip, cfg.run.seed) == (2e-5, 2.0, 3407)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("fne: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path) -> None:
    """Invariant: every config file in configs/ loads and validates."""
    load_config(path)


# ---- the validator follows the fields' declared metadata --------------------------------


def _leaves(cls: type = Config, prefix: str = "") -> list[tuple[str, Any, dict[str, Any]]]:
    """(dotted key, annotation, metadata) of every non-section field of a config dataclass."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _leaves(hints[f.name], f"{prefix}{f.name}.")
        else:
            tp, meta = hints[f.name], dict(f.metadata)
            if typing.get_origin(tp) is Literal:  # a choice: its values, typed as their type
                meta["choices"] = typing.get_args(tp)
                tp = type(meta["choices"][0])
            out.append((f"{prefix}{f.name}", tp, meta))
    return out


def _scalar(tp: Any) -> tuple[Any, bool, bool]:
    """(scalar type, optional?, list?) of an annotation such as ``list[int] | None``."""
    optional = type(None) in typing.get_args(tp)
    if optional:
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
    is_list = typing.get_origin(tp) is list
    return (typing.get_args(tp)[0] if is_list else tp), optional, is_list


def _nested(key: str, value: Any) -> dict[str, Any]:
    *sections, name = key.split(".")
    data: dict[str, Any] = {name: value}
    for section in reversed(sections):
        data = {section: data}
    return data


def _accepts(key: str, tp: Any, value: Any) -> bool:
    """Whether the field-level validator takes ``value`` (wrapped in a list for list fields)."""
    try:
        cfg = _validate_fields(_nested(key, [value] if _scalar(tp)[2] else value))
    except ConfigError as err:
        assert "\n" not in str(err) and key in str(err), str(err)
        return False
    got = functools.reduce(getattr, key.split("."), cfg)
    assert got == ([value] if _scalar(tp)[2] else value)
    return True


def _bound_cases() -> list[tuple[str, Any, Any, bool]]:
    """(key, annotation, value, accepted?) at and just beyond every declared or implied bound."""
    cases = []
    for key, tp, meta in _leaves():
        scalar = _scalar(tp)[0]
        if scalar not in (int, float):
            continue
        if scalar is int and "le" not in meta and "lt" not in meta:
            meta["lt"] = 2**63  # every int is int64 unless declared tighter
        for bound, side in (("ge", -1), ("gt", -1), ("le", 1), ("lt", 1)):
            if bound not in meta:
                continue
            at = meta[bound]
            past = at + side if scalar is int else math.nextafter(at, side * math.inf)
            inside = at - side if scalar is int else math.nextafter(at, -side * math.inf)
            strict = bound in ("gt", "lt")
            cases += [(key, tp, at, not strict), (key, tp, past, False), (key, tp, inside, True)]
    return cases


@pytest.mark.parametrize(
    "key, tp, value, accepted", _bound_cases(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_every_declared_bound_is_enforced(key: str, tp: Any, value: Any, accepted: bool) -> None:
    """Invariant: each field's ge/gt/le/lt metadata (and the int64 cap of int fields) is what
    the validator enforces: the bound itself passes for ge/le and fails for gt/lt, the next
    representable value outside fails, the next one inside passes, and the error names the key."""
    assert _accepts(key, tp, value) is accepted


def test_every_declared_choice_is_enforced() -> None:
    """Invariant: a field with ``choices`` takes each of them and nothing else."""
    with_choices = [(k, tp, m["choices"]) for k, tp, m in _leaves() if "choices" in m]
    assert len(with_choices) >= 10  # fne.loss, optim.schedule, data.mode, engine.*, ...
    for key, tp, choices in with_choices:
        for choice in choices:
            assert _accepts(key, tp, choice), (key, choice)
        with pytest.raises(ConfigError, match=re.escape(", ".join(map(str, choices)))):
            _validate_fields(_nested(key, "not-a-choice"))


# A value of each wrong kind per field type; bools are not ints here, ints are floats.
_WRONG = {
    int: [1.0, 1e23, True, "1"],
    float: [True, "1.0", [1.0]],
    bool: [1, 0, "true", None],
    str: [2024, 1e3, True, ["a"]],
}


@pytest.mark.parametrize("key, tp, meta", _leaves(), ids=lambda v: v if isinstance(v, str) else "")
def test_types_are_strict(key: str, tp: Any, meta: dict[str, Any]) -> None:
    """Invariant: no field converts a value of another type (an int field given 1e23 is refused,
    not truncated; a bool field given 1 is refused), and the error names the expected type;
    a choice field names its choices instead; null is accepted exactly by the fields typed
    ``X | None``."""
    scalar, optional, is_list = _scalar(tp)
    for wrong in _WRONG[scalar]:
        if wrong is None:
            continue
        with pytest.raises(ConfigError) as err:
            _validate_fields(_nested(key, [wrong] if is_list else wrong))
        assert key in str(err.value) and "\n" not in str(err.value)
        if not isinstance(wrong, list):
            expected = "is not one of" if "choices" in meta else f"expected {scalar.__name__}"
            assert expected in str(err.value), str(err.value)
    assert _accepts(key, tp, None) is optional if not is_list else True


# ---- the cross-field and range rules, one by one -----------------------------------------


@pytest.mark.parametrize(
    "override",
    [
        "optim.lr=.inf",
        "optim.lr=1e999",
        "optim.lr=-.inf",
        "optim.weight_decay=.inf",
        "train.epochs=.inf",
        "dist.rendezvous_timeout_s=.inf",
        "fne.prior=.nan",
        "fne.hard_cut_margin=.inf",
        "data.train_weights=[1, .inf]",
    ],
)
def test_non_finite_floats_are_refused(override: str) -> None:
    """Invariant: no float field, in any section or inside a list, takes inf or nan (nor a
    literal that overflows to inf such as 1e999); the error names the key."""
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"'{re.escape(key)}(\[1\])?': must be a finite number"):
        load_config(None, [override])


@pytest.mark.parametrize(
    "override, names",
    [
        ("run.seed=1e23", ["run.seed", "expected int", "1e+23"]),
        ("memory.size=1e3", ["memory.size", "expected int"]),
        ("run.seed=9223372036854775808", ["run.seed", "< 9223372036854775808"]),
        ("fne.gate_size=9223372036854775808", ["fne.gate_size", "< 9223372036854775808"]),
        ("dist.rendezvous_timeout_s=604801", ["dist.rendezvous_timeout_s", "<= 604800.0"]),
        ("dist.worker_start_timeout_s=1e9", ["dist.worker_start_timeout_s", "<= 604800.0"]),
        ("data.cache_wait_s=1e9", ["data.cache_wait_s", "<= 604800.0"]),
        ("train.epochs=1e6", ["train.epochs", "<= 10000.0"]),
        ("memory.size=100000000", ["memory.size", "<= 16777216"]),
        ("data.loader_workers=100000", ["data.loader_workers", "<= 256"]),
    ],
)
def test_named_values_are_bounded(override: str, names: list[str]) -> None:
    """Invariant: the values once accepted (seed 1e23, unbounded timeouts and epochs)
    and the resource-sized ones are refused with one line naming the key and the bound."""
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert "\n" not in str(err.value)
    for name in names:
        assert name in str(err.value)


def test_bounds_take_their_largest_value() -> None:
    """Invariant: the upper bounds exclude nothing legitimate: a week-long timeout, the largest
    int64 seed and 10,000 epochs load."""
    cfg = load_config(
        None,
        [
            "run.seed=9223372036854775807",
            "dist.rendezvous_timeout_s=604800",
            "dist.worker_start_timeout_s=604800.0",
            "train.epochs=10000",
        ],
    )
    assert cfg.run.seed == 2**63 - 1 and cfg.dist.rendezvous_timeout_s == 604800.0
    assert isinstance(cfg.train.epochs, float) and cfg.train.epochs == 10_000.0


def test_quoted_numbers_stay_text(tmp_path: Path) -> None:
    """Invariant: a quoted scalar is text whatever it looks like (run.name "2024" was once
    turned into 2024.0 and refused); an unquoted one is a number, and a str field given a
    number is refused with a hint to quote it."""
    path = tmp_path / "q.yaml"
    path.write_text('run:\n  name: "2024"\n  output_dir: \'1e3\'\ndata:\n  caption_key: "1.5"\n')
    cfg = load_config(path)
    assert (cfg.run.name, cfg.run.output_dir, cfg.data.caption_key) == ("2024", "1e3", "1.5")
    assert load_config(None, ['run.name="1e-3"']).run.name == "1e-3"
    with pytest.raises(ConfigError, match=r"'run.name': expected str, got 2024 \(quote it"):
        load_config(None, ["run.name=2024"])


@pytest.mark.parametrize(
    "text, value",
    [
        ("1e3", 1e3),
        ("1e-4", 1e-4),
        ("-2E+5", -2e5),
        (".5e3", 500.0),
        ("2.e-1", 0.2),
        ("1.0e-3", 1e-3),
        ("3.5", 3.5),
        ("7", 7),
    ],
)
def test_exponents_are_floats(text: str, value: float) -> None:
    """Invariant: scientific notation without a dot or a sign (1e3, 1e-4), which PyYAML's
    YAML 1.1 rules read as text, is a float in files and overrides alike."""
    data: dict[str, Any] = {}
    apply_override(data, f"x={text}")
    assert data["x"] == value and type(data["x"]) is type(value)


@settings(max_examples=300, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_any_python_float_reads_back(x: float) -> None:
    """Invariant: the YAML resolver agrees with Python's float(): every finite float written as
    Python prints it (1e-05, 1.5e+16, 0.1) reads back as the same float."""
    data: dict[str, Any] = {}
    apply_override(data, f"x={x!r}")
    assert data["x"] == x and isinstance(data["x"], float)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="0123456789eE+-._:abyn ", min_size=1, max_size=10))
def test_saved_text_loads_back_as_text(name: str) -> None:
    """Invariant: the writer of saved configs quotes every text the reader would take for
    something else ('1e3', '1_0', 'y', '12:30'), so text saved is text loaded."""
    assert yaml.load(yaml.dump({"name": name}, Dumper=_Dumper), Loader=_Loader) == {"name": name}


def test_saved_config_loads_back(tmp_path: Path) -> None:
    """Invariant: a resolved config saved with a number-like name loads back identically."""
    cfg = load_config(None, ['run.name="1e3"', 'data.caption_key="2024"'])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert config_to_dict(load_config(tmp_path / "resolved.yaml")) == config_to_dict(cfg)


# ---- YAML hardening -------------------------------------------------------------------------


def test_self_referencing_alias_is_refused(tmp_path: Path) -> None:
    """Invariant: a self-referencing alias is one ConfigError naming the file (it was a
    RecursionError), and so is any anchor: config files share values through base:."""
    loop = tmp_path / "loop.yaml"
    loop.write_text("optim:\n  milestones: &m [1, *m]\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(loop))}: anchors and aliases"):
        load_config(loop)
    plain = tmp_path / "plain.yaml"
    plain.write_text("fne:\n  margin: &m 0.3\n  hard_cut_margin: *m\n")
    with pytest.raises(ConfigError, match=r"anchors and aliases .* \(line 2\)"):
        load_config(plain)


@pytest.mark.timeout(30)
def test_alias_bomb_fails_fast(tmp_path: Path) -> None:
    """Invariant: a ~350-byte "billion laughs" file (9^9 strings once expanded) is refused at its
    first anchor, before anything is expanded: the whole load allocates under 4 MiB."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [{','.join([f'*{prev}'] * 9)}]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    assert bomb.stat().st_size < 400
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError, match=r"bomb.yaml: anchors and aliases .* \(line 1\)"):
            load_config(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20


def test_deep_nesting_is_refused(tmp_path: Path) -> None:
    """Invariant: 1,000 nested sequences are one ConfigError naming the file and line, not the
    RecursionError plain PyYAML's recursive composer raises; a shipped config's depth is 5."""
    text = "optim:\n  milestones:\n    " + "- " * 1000 + "1\n"
    with pytest.raises(RecursionError):
        yaml.safe_load(text)  # the failure the loader guards against
    deep = tmp_path / "deep.yaml"
    deep.write_text(text)
    with pytest.raises(ConfigError, match=r"deep.yaml: nested deeper than 16 levels \(line 3\)"):
        load_config(deep)
    data: dict[str, Any] = {}
    apply_override(data, "optim.lr=" + "[" * 100 + "]" * 100)  # an override: taken as text
    assert data["optim"]["lr"].startswith("[[[")


def test_duplicate_keys_are_refused(tmp_path: Path) -> None:
    """Invariant: a key given twice in one mapping is an error naming it and its line (YAML
    readers silently keep the last one, dropping the first section)."""
    dup = tmp_path / "dup.yaml"
    dup.write_text("fne:\n  prior: 0.1\noptim:\n  lr: 0.1\nfne:\n  eps: 0.01\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: duplicate key 'fne' \(line 5\)"):
        load_config(dup)
    dup.write_text("? [a]\n: 1\n? [a]\n: 2\n")  # keys that are lists: refused, not a crash
    with pytest.raises(ConfigError, match=r"dup.yaml is not valid YAML: .*unhashable key"):
        load_config(dup)


def test_base_inheritance_and_errors_one_line(tmp_path: Path) -> None:
    """Invariant: base: merges the named file underneath section by section (the child wins
    key by key), overrides win over both, and a non-mapping section or a non-text key is one
    line naming it."""
    (tmp_path / "base.yaml").write_text("fne:\n  prior: 0.01\n  eps: 0.02\nrun:\n  seed: 5\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nfne:\n  eps: 0.03\n")
    cfg = load_config(tmp_path / "child.yaml", ["run.seed=6"])
    assert (cfg.fne.prior, cfg.fne.eps, cfg.run.seed) == (0.01, 0.03, 6)
    for override, message in [
        ("fne=3", "config section 'fne' must be a mapping, got 3"),
        ("model.image=[1]", "config section 'model.image' must be a mapping, got [1]"),
        ("fne={1: 2}", "config key 1 in section 'fne' is not text"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(None, [override])


def test_setting_refuses_unknown_limits() -> None:
    """Invariant: a misspelt limit (``lte=1``) in ``setting()`` fails at import time instead of
    leaving the field silently unchecked."""
    with pytest.raises(TypeError, match="lte"):
        setting(1, "doc", lte=1)

"""The shape of the package's code: short parameter lists, one way to print."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fne_dist"
# At most this many parameters per function or method (self/cls not counted, *args and **kwargs
# counted as one each). Values that travel together go in one object (a config section, a
# dataclass), not in longer lists.
MAX_PARAMETERS = 8

# (module, function): why it may take more, for now. An entry that no longer needs its place
# fails the test below, so the list only shrinks.
OVER_THE_LIMIT: dict[tuple[str, str], str] = {}

# Command-line entry points: their stdout is their output (JSON, a summary), and their error
# line goes to stderr. Everything else reports through logging (fne_dist.reporters).
PRINTING_MODULES = {
    "train.py",
    "evaluate.py",
    "export.py",
    "shards/__main__.py",
    "config_reference.py",
    "cli.py",
}


def _modules() -> list[tuple[str, ast.Module]]:
    return [
        (path.relative_to(PACKAGE).as_posix(), ast.parse(path.read_text(), str(path)))
        for path in sorted(PACKAGE.rglob("*.py"))
    ]


def _parameter_counts(modules: list[tuple[str, ast.Module]]) -> dict[tuple[str, str], int]:
    """(module, function) -> the most parameters any function of that name in the module takes
    (methods and nested functions included; ``self``/``cls`` not counted)."""
    counts: dict[tuple[str, str], int] = {}
    for name, tree in modules:
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                args = node.args
                named = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
                if named and named[0] in ("self", "cls"):
                    named = named[1:]
                n = len(named) + (args.vararg is not None) + (args.kwarg is not None)
                key = (name, node.name)
                counts[key] = max(n, counts.get(key, 0))
    return counts


def _over_the_limit(modules: list[tuple[str, ast.Module]]) -> dict[tuple[str, str], int]:
    return {k: n for k, n in _parameter_counts(modules).items() if n > MAX_PARAMETERS}


def test_no_function_takes_more_than_8_parameters() -> None:
    """Invariant: no function in fne_dist/ takes more than MAX_PARAMETERS parameters unless it
    is listed with its reason: long parameter lists are where a reader loses track of what a
    call passes, and an object carrying what travels together reads better."""
    over = _over_the_limit(_modules())
    new = {k: n for k, n in over.items() if k not in OVER_THE_LIMIT}
    assert not new, (
        f"functions over {MAX_PARAMETERS} parameters (pass an object carrying what travels "
        f"together): {sorted(new.items())}"
    )
    stale = sorted(set(OVER_THE_LIMIT) - set(over))
    assert not stale, f"remove from OVER_THE_LIMIT (now within the limit or gone): {stale}"


def test_the_check_counts_every_kind_of_parameter() -> None:
    """Invariant: positional-only, keyword-only, *args and **kwargs all count, ``self`` does
    not, and methods and nested functions are seen, so the test above can fail."""
    nine = "a, /, b, c, *d, e, f, g, **h"  # 8 named or starred + 1 = 9 below
    source = (
        f"class A:\n  def m(self, x, {nine}):\n    def inner(x, {nine}): pass\n"
        "def ok(a, b, c, d, e, f, g, h): pass\n"
    )
    modules = [("m.py", ast.parse(source))]
    assert _over_the_limit(modules) == {("m.py", "m"): 9, ("m.py", "inner"): 9}


def test_only_entry_points_print() -> None:
    """Invariant: one logging path: outside the command-line entry points no module calls
    print (the loop, the reporters and the data stream log through ``logging``)."""
    printing = sorted(
        name
        for name, tree in _modules()
        if name not in PRINTING_MODULES
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "print"
    )
    assert not printing, f"print outside the entry points: {printing}"


# The config's cross-field rules: one named check per section, each short enough to read whole.
MAX_CHECK_LINES = 40


def test_config_rules_are_named_checks_by_section() -> None:
    """Invariant: ``Config.check`` and every ``check*`` function of fne_dist/config.py are at
    most MAX_CHECK_LINES lines: the cross-field rules live in one named check per section
    (``SECTION_CHECKS``), so a new rule goes into its section's check, not into one growing
    function."""
    tree = ast.parse((PACKAGE / "config.py").read_text())
    long = sorted(
        (node.name, node.end_lineno - node.lineno + 1)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef)
        and node.name.startswith("check")
        and node.end_lineno - node.lineno + 1 > MAX_CHECK_LINES
    )
    assert not long, f"rule checks over {MAX_CHECK_LINES} lines (split them by section): {long}"


def test_config_checks_run_in_section_order() -> None:
    """Invariant: a config that breaks rules of several sections is refused with the first
    section's message, in the order ``Config.check`` always had (train, memory, engine,
    model, dist, run, data): splitting the rules did not change which message a user sees."""
    import pytest

    from fne_dist.config import load_config

    broken = [
        "data.train_weights=[1.0]",  # data (needs data.mode=resampled)
        "run.name=..",  # run
        "dist.use_gpu=true",  # dist (with engine.device=cpu)
        "model.image.frozen=true", "model.image.train_blocks=1",  # model
        "engine.kind=ddp", "engine.precision=bf16",  # engine
        "memory.sharded=true", "fne.loss=infonce",  # memory
        "train.warmup_epochs=1", "train.warmup_steps=5",  # train
    ]  # fmt: skip
    tiny = PACKAGE.parent / "tests" / "configs" / "tiny.yaml"
    expected = [
        "train.warmup_steps=5 and train.warmup_epochs=1",
        "memory.sharded=true with fne.loss=infonce",
        "engine.kind=ddp supports neither ZeRO nor bf16/fp16",
        "model.image.train_blocks=1 trains blocks of a frozen backbone",
        "dist.use_gpu=true contradicts engine.device=cpu",
        "run.name",
        "data.train_weights needs data.mode=resampled",
    ]
    # drop the sections' breaks from the last one (train) on: each time the next is reported
    cut = [len(broken), 9, 7, 5, 3, 2, 1]
    for n, want in zip(cut, expected, strict=True):
        with pytest.raises(ValueError, match=re.escape(want)):
            load_config(tiny, broken[:n])

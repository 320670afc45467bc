"""The shape of the package's code: short functions, one way to print."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fne_dist"
MAX_LINES = 80

# Command-line entry points: their stdout is their output (JSON, a summary), and their error
# line goes to stderr. Everything else reports through logging (fne_dist.reporting).
PRINTING_MODULES = {
    "train.py",
    "evaluate.py",
    "export.py",
    "shards/__main__.py",
    "config_reference.py",
}


def _modules() -> list[tuple[str, ast.Module]]:
    return [
        (path.relative_to(PACKAGE).as_posix(), ast.parse(path.read_text(), str(path)))
        for path in sorted(PACKAGE.rglob("*.py"))
    ]


def _long_functions(modules: list[tuple[str, ast.Module]]) -> set[tuple[str, str, int]]:
    """(module, function, lines) of every function or method over MAX_LINES lines (its whole
    span: signature, docstring and body), argument parsers (name containing "parser")
    excepted."""
    found = set()
    for name, tree in modules:
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES and "parser" not in node.name:
                    found.add((name, node.name, lines))
    return found


def test_no_function_is_over_80_lines() -> None:
    """Invariant: no function in fne_dist/ spans more than 80 lines (argument parsers
    excepted): a reader follows each on one screen (issue "The core in one sitting")."""
    long = sorted(_long_functions(_modules()))
    assert not long, f"functions over {MAX_LINES} lines: {long}"


def test_the_check_sees_a_long_function() -> None:
    """Invariant: the walk counts a function's full span (nested ones too) and exempts parsers
    only by name, so the test above can fail."""
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    source = f"class A:\n  def f(self):\n{body}\ndef build_parser():\n{body}\n"
    assert _long_functions([("m.py", ast.parse(source))]) == {("m.py", "f", MAX_LINES + 1)}


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

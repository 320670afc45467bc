"""The package's modules import in layers: no import circle, lazy imports inside functions
included (a circle hidden in a function still means two modules that need each other). Imports
under ``if TYPE_CHECKING:`` never run and only name types, so they do not count."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fne_dist"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(root: Path) -> dict[str, tuple[Path, ast.Module]]:
    return {
        _module_name(p, root): (p, ast.parse(p.read_text(), str(p)))
        for p in sorted(root.rglob("*.py"))
    }


def _ancestors(name: str) -> list[str]:
    """``a.b.c`` → ``a``, ``a.b``: importing a module runs its packages' ``__init__`` first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _run_time_nodes(tree: ast.Module) -> list[ast.AST]:
    """Every node of ``tree`` outside ``if TYPE_CHECKING:`` blocks."""
    found, todo = [], [tree]
    while todo:
        node = todo.pop()
        found.append(node)
        todo += [child for child in ast.iter_child_nodes(node) if not _type_checking(child)]
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module → the package's modules it imports when it runs (module level or inside
    functions), each with the packages whose ``__init__`` runs first (but not its own
    packages': they ran before it)."""
    modules = _modules(root)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, (path, tree) in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _run_time_nodes(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                # ``from pkg import sub``: sub may be a module of its own
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            own = {name, *_ancestors(name)}  # already run when this module runs
            for target in targets:
                for mod in [*_ancestors(target), target]:
                    if mod in modules and mod not in own:
                        graph[name].add(mod)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycle() -> None:
    """Invariant: no two modules of fne_dist import each other, directly or through others,
    not even lazily inside a function: the checkpoint's file format sits below the engine
    (which writes its state in that format) and the collective save above it; the loop's
    policy object (checkpointer) above both."""
    graph = import_graph(PACKAGE)
    assert "fne_dist.checkpoint.format" in graph["fne_dist.engine"]
    assert "fne_dist.engine" in graph["fne_dist.checkpoint.collective"]
    assert not cycles(graph), cycles(graph)


def test_the_format_imports_nothing_of_the_project() -> None:
    """Invariant: the checkpoint's file format is the bottom of the house (the engine, the
    export and the state import it; it imports none of them)."""
    graph = import_graph(PACKAGE)
    assert graph["fne_dist.checkpoint.format"] == set()
    assert graph["fne_dist.checkpoint"] == set()  # the package's __init__ imports no module


def test_the_check_sees_a_lazy_cycle(tmp_path: Path) -> None:
    """Invariant: the walk finds an import inside a function, a ``from . import sub`` and a
    package's ``__init__`` run by importing its submodule, so the test above can fail; an
    import only a type checker sees is no edge."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .sub import c\n")
    (pkg / "sub" / "__init__.py").write_text("from . import c\n")
    (pkg / "sub" / "c.py").write_text("from .. import a\n")
    graph = import_graph(pkg)
    assert graph["pkg.a"] >= {"pkg.sub", "pkg.sub.c"}
    assert graph["pkg.sub"] >= {"pkg.sub.c"}
    assert cycles(graph) == [["pkg.a", "pkg.sub", "pkg.sub.c"]]
    (pkg / "sub" / "c.py").write_text("")
    assert cycles(import_graph(pkg)) == []
    typing_only = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .. import a\n"
    (pkg / "sub" / "c.py").write_text(typing_only)
    assert cycles(import_graph(pkg)) == []

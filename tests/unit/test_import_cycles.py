"""No module of the package imports one that imports it back, directly or through others:
every ``import`` / ``from ... import`` between its modules counts, also one inside a function
(the import graph is read with ``ast``, nothing is imported)."""

from __future__ import annotations

import ast
from pathlib import Path

import lavender_checks

PACKAGE = Path(lavender_checks.__file__).parent


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports (the longest known module of each name)."""
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            # a package's own submodules, and the packages above a module, are not edges
            if name and name != me and not me.startswith(name + ".") and not name.startswith(me + "."):
                found.add(name)
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    files = [p for p in root.rglob("*.py") if "__pycache__" not in p.parts]
    modules = {module_name(p, root) for p in files}
    return {module_name(p, root): imported_modules(p, root, modules) for p in files}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "lavender_checks.engines.fast.engine" in graph and "lavender_checks.model" in graph
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_a_cycle_is_found(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "__init__.py").write_text("from . import b  # a package importing its own part\n")
    (package / "sub" / "b.py").write_text("def f():\n    from ..a import x  # inside a function counts\n")
    (package / "c.py").write_text("import pkg.a\n")
    graph = import_graph(package)
    assert set(graph) == {"pkg", "pkg.a", "pkg.c", "pkg.sub", "pkg.sub.b"}
    assert graph["pkg.sub.b"] == {"pkg.a"} and graph["pkg.sub"] == set()
    assert cycles(graph) == [["pkg.a", "pkg.sub.b"]]

"""Package boundaries: ``common/`` and ``client/`` never import ``server``; ``common/`` is
framework-free (no ``flwr``, no ``ray``). Checked statically with ``ast`` over every file."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(source: str, module: str) -> set[str]:
    """Absolute names of every module ``source`` imports (at any depth, inside functions too).

    ``module`` is the dotted name of the file itself, used to resolve relative imports.
    ``importlib.import_module("x")`` and ``__import__("x")`` with a literal name count too.
    """
    package = module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.add(node.args[0].value)
    return found


def top_levels(modules: set[str]) -> set[str]:
    return {m.split(".")[0] for m in modules if m}


def python_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def offenders(package: str, forbidden: set[str]) -> list[str]:
    bad = []
    for path in python_files(package):
        hit = top_levels(imported_modules(path.read_text(encoding="utf-8"), module_name(path))) & forbidden
        if hit:
            bad.append(f"{path.relative_to(ROOT)} imports {', '.join(sorted(hit))}")
    return bad


def test_common_is_not_empty():
    # guards against the walk silently finding nothing (a moved package would pass vacuously)
    assert len(python_files("common")) >= 5


@pytest.mark.parametrize("package", ["common", "client"])
def test_no_server_import(package):
    assert offenders(package, {"server"}) == []


def test_common_imports_no_framework():
    assert offenders("common", {"flwr", "ray", "server", "client"}) == []


# ---------------------------------------------------------------- the checker itself

@pytest.mark.parametrize("source", [
    "import server",
    "import server.app as app",
    "from server import app",
    "from server.strategy import Strategy",
    "def f():\n    from server.app import app\n",
    "try:\n    import server.cli\nexcept ImportError:\n    pass\n",
    "import importlib\nimportlib.import_module('server.app')",
    "__import__('server')",
])
def test_checker_flags_server_imports(source):
    assert "server" in top_levels(imported_modules(source, "client.sub.mod"))


@pytest.mark.parametrize("source", [
    "import serverless",
    "from common.server_keys import KEY",
    "from . import server",  # client.sub.server, a sibling module, not the package
    "from ..server import app",  # client.server (a relative import cannot leave its top package)
    "x = 'server'",
])
def test_checker_ignores_lookalikes(source):
    assert "server" not in top_levels(imported_modules(source, "client.sub.mod"))


def test_checker_resolves_relative_imports():
    assert imported_modules("from ..data import splits", "common.data.splits") >= {"common.data", "common.data.splits"}
    assert imported_modules("from . import mf", "common.central") >= {"common", "common.mf"}


def _module_level_imports(root: Path, packages=("common", "client", "server")) -> dict[str, set[str]]:
    """module → the project modules it imports at module level (lazy imports inside functions
    are how a cycle is avoided, so they are not edges)."""
    import ast

    modules = {}
    for pkg in packages:
        for path in (root / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in tree.body:
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                subs = [f"{base}.{a.name}" for a in node.names]
                # `from pkg import submodule` depends on the submodule; a name defined in the
                # package's __init__ makes the package itself the dependency.
                targets = [t for t in subs if t in modules] + ([base] if any(t not in modules for t in subs) else [])
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    edges.add(t)
        graph[name] = edges
    return graph


def test_no_import_circle_among_the_projects_modules():
    graph = _module_level_imports(ROOT)
    state: dict[str, int] = {}
    circles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                circles.append(" → ".join(trail[trail.index(nxt):] + [nxt]) if nxt in trail else f"{node} → {nxt}")
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, "import circles:\n" + "\n".join(circles)

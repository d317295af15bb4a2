"""The house's layers: each imports only the ones below it, no import circle, no private name across modules.

From the bottom: base (errors, configuration, statistics, the results schema), contracts (what plugins
implement), the engine (caches, eviction, attention, timing), inputs (models, corpus, tasks; a model is checked
against what the engine reproduces), analysis (numbers from a results folder), then report (formats the
analysis) and run (measures and writes results), which never import each other, and the front (the command
line, test helpers). ``kvcompare.engine`` never imports run, analysis or report; analysis never run or report.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kvcompare"

#: Top-level modules by layer; a subpackage is a layer of its own name.
TOP_LEVEL = {
    "base": {"errors", "config", "logs", "stats", "schema", "protocol", "environment"},
    "contracts": {
        "kvcompare",
        "parameters",
        "policy",
        "signals",
        "task",
        "hookspecs",
        "registry",
        "plugins",
        "core",
        "failure",
    },
    "inputs": {"models", "corpus", "fetch", "gguf_metadata", "words", "ruler"},
    "front": {"cli", "testing"},
}
#: Lower ranks are imported by higher ones, never the other way; two layers of one rank never import each other.
RANK = {"base": 0, "contracts": 1, "engine": 2, "inputs": 3, "analysis": 4, "report": 5, "run": 5, "front": 6}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    """The layer of ``kvcompare[.x[.y]]``."""
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and parts[1] in RANK and (PACKAGE / parts[1]).is_dir()):
        return parts[1]
    name = parts[-1]
    found = [layer for layer, names in TOP_LEVEL.items() if name in names]
    assert found, f"{module} is in no layer: add it to TOP_LEVEL in {__file__}"
    return found[0]


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(tree: ast.AST) -> Iterator[ast.ImportFrom | ast.Import]:
    """Every import of a module, at any depth, except those only for type checkers."""
    for node in ast.iter_child_nodes(tree):
        if _type_checking(node):
            continue
        if isinstance(node, ast.ImportFrom | ast.Import):
            yield node
        yield from imports(node)


def imported(node: ast.ImportFrom | ast.Import) -> list[str]:
    """The kvcompare modules an import statement loads (``from kvcompare.engine import cache`` loads both)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == "kvcompare"]
    if not node.module or node.module.split(".")[0] != "kvcompare":
        return []
    found = [node.module]
    for alias in node.names:
        candidate = f"{node.module}.{alias.name}"
        if (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py").exists():
            found.append(candidate)
    return found


MODULES = {module_name(path): ast.parse(path.read_text()) for path in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {
    module: {dep for node in imports(tree) for dep in imported(node) if dep != module and dep in MODULES}
    for module, tree in MODULES.items()
}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_a_module_imports_only_lower_layers_or_its_own(module: str) -> None:
    mine = layer(module)
    wrong = {
        dep: layer(dep)
        for dep in GRAPH[module]
        if layer(dep) != mine and RANK[layer(dep)] >= RANK[mine] and dep != "kvcompare"
    }
    assert not wrong, f"{module} ({mine}) imports from a layer above or beside it: {wrong}"


def test_the_layers_of_the_issue() -> None:
    """Issue 22's rules, stated on their own: the engine never imports run, analysis or report; analysis never
    run or report; report never run."""
    forbidden = {"engine": {"run", "analysis", "report"}, "analysis": {"run", "report"}, "report": {"run"}}
    for module, deps in GRAPH.items():
        for dep in deps:
            assert layer(dep) not in forbidden.get(layer(module), set()), (module, dep)


def test_no_import_circle() -> None:
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import circle: " + " -> ".join([*path[path.index(module) :], module]))
        if module in done:
            return
        for dep in sorted(GRAPH[module]):
            if dep != "kvcompare":  # the package's lazy public face (loaded on first use, not on import)
                visit(dep, [*path, module])
        done.add(module)

    for module in sorted(GRAPH):
        visit(module, [])


def test_no_private_name_is_imported_from_another_module() -> None:
    private = {
        f"{module}: {node.module}.{alias.name}"
        for module, tree in MODULES.items()
        for node in imports(tree)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
        if alias.name.startswith("_") and not alias.name.startswith("__")
    }
    assert not private, sorted(private)


def test_every_subpackage_is_packaged() -> None:
    """A subpackage missing from pyproject.toml's list would be left out of the wheel (an editable install
    hides it)."""
    import tomllib

    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {module_name(path.parent / "__init__.py") for path in PACKAGE.rglob("__init__.py")}
    assert packages <= listed, sorted(packages - listed)

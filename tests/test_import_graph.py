"""No import loop between prunekit's packages, function-level imports included.

A package here is what follows ``prunekit.``: ``prunekit.compact.graph`` belongs to ``compact``,
``prunekit.plans`` is ``plans``. Importing ``prunekit.compact.graph`` runs ``compact/__init__``
too, so every file of a package speaks for it. An import inside a function counts like one at
the top: it only hides the loop until the function runs.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set

import pytest

import prunekit

ROOT = Path(prunekit.__file__).parent


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package(module: str, top: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else top


def package_imports(root: Path) -> Dict[str, Dict[str, Set[str]]]:
    """``{package: {imported package: {files that import it}}}`` for the package at ``root``."""
    top = root.name
    edges: Dict[str, Dict[str, Set[str]]] = {}
    for path in sorted(root.rglob("*.py")):
        module = _module_name(path, root)
        here = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[: len(here.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                # `from prunekit import compact` imports the package compact
                targets = [target] if target != top else [f"{top}.{alias.name}" for alias in node.names]
            else:
                continue
            source = _package(module, "__init__")
            for target in targets:
                if target.split(".")[0] != top:
                    continue
                imported = _package(target, "__init__")
                if imported != source:
                    edges.setdefault(source, {}).setdefault(imported, set()).add(str(path.relative_to(root.parent)))
    return edges


def find_cycle(edges: Dict[str, Dict[str, Set[str]]]) -> Optional[List[str]]:
    """One import loop as ``[a, b, ..., a]``, or None (depth-first search)."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, {})):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def _describe(cycle: List[str], edges: Dict[str, Dict[str, Set[str]]]) -> str:
    return "; ".join(f"{a} -> {b} ({', '.join(sorted(edges[a][b]))})" for a, b in zip(cycle, cycle[1:]))


def test_prunekit_has_no_import_loop_between_packages():
    edges = package_imports(ROOT)
    cycle = find_cycle(edges)
    assert cycle is None, f"import loop: {_describe(cycle, edges)}"
    # the walk saw the package's real layering (so an empty graph cannot pass)
    assert "dependency" in edges["compact"] and "dependency" in edges["methods"]
    assert "compact" in edges["planning"] and "sensitivity" in edges["planning"]


def test_the_dependency_package_reads_no_higher_layer():
    edges = package_imports(ROOT)
    higher = {"compact", "methods", "plans", "planning", "sensitivity", "training", "cli", "models", "io"}
    assert not higher & set(edges.get("dependency", {})), edges.get("dependency")


def _runtime_imports(tree: ast.Module) -> List[ast.ImportFrom]:
    """Every ``from ... import`` of a file, in functions too, leaving out ``if TYPE_CHECKING:`` blocks."""
    typing_only = {id(inner) for node in ast.walk(tree)
                   if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
                   for inner in ast.walk(node)}
    return [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and id(node) not in typing_only]


def module_imports(package: Path) -> Dict[str, Dict[str, Set[str]]]:
    """``{module: {module of the same package it imports: {file}}}`` for one package's files."""
    dotted = f"{package.parent.name}.{package.name}"
    modules = {path.stem for path in package.glob("*.py")}
    edges: Dict[str, Dict[str, Set[str]]] = {}
    for path in sorted(package.glob("*.py")):
        for node in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if not (node.module or "").startswith(dotted):
                continue
            tail = node.module[len(dotted):].lstrip(".")
            for target in [tail.split(".")[0]] if tail else [alias.name for alias in node.names]:
                if target in modules and target not in (path.stem, "__init__"):
                    edges.setdefault(path.stem, {}).setdefault(target, set()).add(path.name)
    return edges


@pytest.mark.parametrize("package", ["sensitivity", "planning"])
def test_the_scan_and_the_plan_fit_have_no_import_loop_between_their_modules(package):
    edges = module_imports(ROOT / package)
    cycle = find_cycle(edges)
    assert cycle is None, f"import loop: {_describe(cycle, edges)}"
    assert edges, "the walk saw no import at all"


def test_planning_sits_above_the_scanner():
    edges = package_imports(ROOT)
    assert "planning" not in edges["sensitivity"], edges["sensitivity"].get("planning")
    assert {"scanner", "scoring", "guard"} <= set(module_imports(ROOT / "sensitivity")) | {
        target for targets in module_imports(ROOT / "sensitivity").values() for target in targets}


@pytest.mark.parametrize("package", ["sensitivity", "planning"])
def test_no_file_of_the_scan_or_the_plan_fit_is_over_600_lines(package):
    sizes = {path.name: len(path.read_text(encoding="utf-8").splitlines()) for path in (ROOT / package).glob("*.py")}
    assert sizes and max(sizes.values()) <= 600, sorted(sizes.items(), key=lambda item: -item[1])[:3]


def test_a_name_that_moved_to_planning_says_where_it_went():
    import prunekit.planning
    import prunekit.sensitivity

    for name in prunekit.sensitivity.MOVED_TO_PLANNING:
        with pytest.raises(ImportError, match=rf"moved to prunekit\.planning\.{name}"):
            getattr(prunekit.sensitivity, name)
        assert getattr(prunekit.planning, name) is not None
    with pytest.raises(ImportError, match="moved to prunekit.planning"):
        from prunekit.sensitivity import fit_plan  # noqa: F401
    assert prunekit.fit_plan is prunekit.planning.fit_plan and prunekit.run_scan is prunekit.planning.run_scan


def test_a_loop_hidden_in_a_function_is_found(tmp_path):
    root = tmp_path / "pkg"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "a" / "x.py").write_text("from pkg.b import y\n")
    (root / "b" / "y.py").write_text("def late():\n    from ..a import x\n    return x\n")
    edges = package_imports(root)
    assert find_cycle(edges) == ["a", "b", "a"]
    assert "pkg/b/y.py" in _describe(["a", "b", "a"], edges)

"""The one-way dependency of DESIGN.md: solvers <- routelab <- analysis."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"solvers": {"routelab", "analysis"}, "routelab": {"analysis"}}
# ``python -m routelab`` runs the command line, which lives in analysis: the entry point
# is not part of the library, and nothing imports it.
ENTRY_POINTS = {"routelab/__main__.py"}


def _imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_import_only_downstream(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no sources found for {package}"
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imported_packages(path) & FORBIDDEN[package])
        for path in files
        if _imported_packages(path) & FORBIDDEN[package]
        and str(path.relative_to(ROOT)) not in ENTRY_POINTS
    }
    assert not offenders, f"{package} must not import {sorted(FORBIDDEN[package])}: {offenders}"


# Issue 16: combinatorics on arrays live in solvers; routers keep tables and routing.
COMBINATORIAL = {"kmeans", "balanced_partition", "greedy_partition", "improve_partition"}


def test_routers_hold_no_table_building_combinatorics():
    offenders = {}
    for path in sorted((ROOT / "routelab" / "routers").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        imported = {
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith("solvers")
            for alias in node.names
        }
        builders = {
            node.name
            for node in tree.body
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_table")
        }
        if imported & COMBINATORIAL or builders:
            offenders[str(path.relative_to(ROOT))] = sorted((imported & COMBINATORIAL) | builders)
    assert not offenders, f"table builders belong in solvers.tables: {offenders}"
    import solvers.tables

    for name in ("random_table", "balanced_table", "clustered_table", "dispersed_table"):
        assert callable(getattr(solvers.tables, name))

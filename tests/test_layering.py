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

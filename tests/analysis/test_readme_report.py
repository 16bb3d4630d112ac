"""The README's compare tables come from the committed report of the current code.

If a test here fails after a change to the rows, the routers or compare itself,
regenerate the report and the README block:

    routelab compare --out docs/report --overwrite
    python -m analysis.report docs/report
"""

import json
from pathlib import Path

import pytest

from analysis.compare import MANIFEST, CompareSettings, plan_jobs
from analysis.data import DATASETS
from analysis.registry import default_rows
from analysis.report import README_BEGIN, README_END, readme_block, report_markdown

ROOT = Path(__file__).resolve().parents[2]
REPORT = ROOT / "docs" / "report"
REGENERATE = (
    "regenerate: routelab compare --out docs/report --overwrite && "
    "python -m analysis.report docs/report"
)


@pytest.fixture(scope="module")
def metrics():
    return json.loads((REPORT / "metrics.json").read_text())


def test_readme_tables_equal_the_committed_report(metrics):
    text = (ROOT / "README.md").read_text()
    block = README_BEGIN + text.split(README_BEGIN, 1)[1].split(README_END, 1)[0] + README_END
    assert block == readme_block(metrics), REGENERATE


def test_the_report_is_its_metrics_rendered(metrics):
    assert (REPORT / "report.md").read_text() == report_markdown(metrics), REGENERATE
    manifest = json.loads((REPORT / MANIFEST).read_text())
    assert sorted(manifest["files"]) == sorted(
        ["metrics.json", "report.md", *[p for ps in metrics["plots"].values() for p in ps]]
    )
    for name in manifest["files"]:
        assert (REPORT / name).is_file(), name


def test_the_report_is_of_the_current_default_run(metrics):
    """Same settings, same rows in the same order, same configurations as today's code."""
    assert metrics["settings"] == CompareSettings().to_dict(), REGENERATE
    expected = {
        name: [j.router for j in plan_jobs(default_rows(), DATASETS) if j.dataset == name]
        for name in DATASETS
    }
    got = {name: [r["router"] for r in d["results"]] for name, d in metrics["datasets"].items()}
    assert got == expected, REGENERATE
    for row in default_rows():
        assert metrics["rows"][row.name]["configuration"] == row.configuration(), REGENERATE

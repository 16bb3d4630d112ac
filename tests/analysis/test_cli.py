import json

import pytest
import torch
from PIL import Image

from analysis.cli import main
from analysis.compare import CompareSettings, train_and_measure
from analysis.data import load_dataset
from analysis.registry import REGISTRY, available_routers

PNG = b"\x89PNG\r\n\x1a\n"
pytestmark = pytest.mark.slow


def test_compare_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["compare", "--quick", "--out", str(out), "--no-progress"]) == 0
    report = (out / "report.md").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    names = [c.name for c in available_routers()]
    assert len(names) >= 13  # the foundation's and the gates' routers at least
    for dataset in ("tokens", "digits"):
        section = report.split(f"## {dataset}")[1].split("## ")[0]
        rows = [line for line in section.splitlines() if line.startswith("| ")][1:]
        assert [row.split("|")[1].strip() for row in rows] == names
        results = metrics["datasets"][dataset]["results"]
        assert [r["router"] for r in results] == names
        for r in results:
            assert all(v == v for v in (r["metric"], r["train"]["cv_load"]))  # no NaN
        for name in metrics["plots"][dataset]:
            path = out / name
            assert path.read_bytes()[:8] == PNG
            with Image.open(path) as image:
                image.verify()
        assert f"{dataset}_load.png" in metrics["plots"][dataset]
        assert f"{dataset}_cv_load.png" in metrics["plots"][dataset]
    assert "digits_coactivation.png" in metrics["plots"]["digits"]
    assert "tokens_experts_x_labels.png" in metrics["plots"]["tokens"]
    assert "| router |" in capsys.readouterr().out


def test_quick_runs_are_seeded_and_repeat():
    settings = CompareSettings.quick_settings()
    data = load_dataset("digits", quick=True)
    a = train_and_measure(REGISTRY["noisy-top2"], data, settings)
    b = train_and_measure(REGISTRY["noisy-top2"], data, settings)
    assert a.metric == b.metric and a.cv_history == b.cv_history
    assert torch.equal(a.table, b.table)


def test_sweep_quick(tmp_path):
    out = tmp_path / "sweep"
    argv = ["sweep", "--quick", "--steps", "3", "--out", str(out), "--no-progress"]
    argv += ["--grid", "importance_weight=0,0.1", "--grid", "load_weight=0,1"]
    assert main(argv) == 0
    cells = json.loads((out / "sweep.json").read_text())["cells"]
    assert len(cells) == 4
    assert {tuple(c["options"].values()) for c in cells} == {(0, 0), (0, 1), (0.1, 0), (0.1, 1)}
    text = (out / "sweep.md").read_text()
    assert "## cv_load" in text and "importance_weight \\ load_weight" in text


def test_bad_command_line():
    with pytest.raises(SystemExit):
        main(["compare", "--dataset", "imagenet"])
    with pytest.raises(ValueError, match="unknown router"):
        main(["compare", "--quick", "--routers", "nope", "--no-progress"])
    with pytest.raises(SystemExit):
        main(["sweep", "--grid", "importance_weight"])

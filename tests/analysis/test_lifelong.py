"""``routelab lifelong``: the forgetting metrics, the streams and the report."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import pytest
import torch
from PIL import Image

from analysis.cli import main
from analysis.lifelong import (
    FAMILIES,
    METHODS,
    LifelongSettings,
    load_stream,
    run_method,
    summarise,
)


def test_summary_metrics_follow_their_definitions_on_a_hand_made_matrix():
    # accuracy: R[i][j] after phase i on distribution j
    matrix = [[0.9, 0.1, 0.0], [0.7, 0.8, 0.2], [0.5, 0.6, 0.9]]
    initial = [0.1, 0.05, 0.1]
    s = summarise(matrix, initial, higher_is_better=True)
    assert s["final"] == pytest.approx((0.5 + 0.6 + 0.9) / 3)
    # best earlier minus final: distribution 0 peaked at 0.9, distribution 1 at 0.8
    assert s["forgetting"] == pytest.approx(((0.9 - 0.5) + (0.8 - 0.6)) / 2)
    assert s["backward_transfer"] == pytest.approx(((0.5 - 0.9) + (0.6 - 0.8)) / 2)
    assert s["forward_transfer"] == pytest.approx(((0.1 - 0.05) + (0.2 - 0.1)) / 2)
    assert s["plasticity"] == pytest.approx((0.9 + 0.8 + 0.9) / 3)


def test_perplexity_is_compared_in_nats():
    matrix = [[10.0, 50.0], [20.0, 5.0]]
    s = summarise(matrix, [100.0, 100.0], higher_is_better=False)
    assert s["forgetting"] == pytest.approx(math.log(20.0) - math.log(10.0))
    assert s["forward_transfer"] == pytest.approx(math.log(100.0) - math.log(50.0))
    assert s["final"] == pytest.approx(math.sqrt(20.0 * 5.0))  # geometric mean


def test_the_stdlib_stream_has_one_held_out_distribution_per_family():
    settings = LifelongSettings.quick_settings()
    stream = load_stream("stdlib", settings)
    assert [p.name for p in stream.phases] == list(FAMILIES)
    assert stream.info["vocab_size"] <= settings.vocab_size
    for phase in stream.phases:
        assert sum(b.targets.shape[0] for b in phase.evaluation) > 0
    # the families are different distributions: total variation between their unigrams
    gen = torch.Generator().manual_seed(0)
    hists = []
    for phase in stream.phases:
        ids = phase.train(gen, 4000).token_ids
        hists.append(torch.bincount(ids, minlength=stream.info["vocab_size"]) / ids.numel())
    assert 0.5 * float((hists[0] - hists[3]).abs().sum()) > 0.15  # text vs gui
    with pytest.raises(ValueError, match="stream must be one of"):
        load_stream("wiki", settings)


def test_lifelong_moe_grows_its_layers_between_phases():
    settings = LifelongSettings.quick_settings()
    stream = load_stream("digits", settings)
    result = run_method(stream, "lifelong-moe", settings)
    assert len(result.matrix) == 2 and all(len(row) == 2 for row in result.matrix)
    assert result.parameters[1] > result.parameters[0]  # experts were added
    assert all(0.0 <= v <= 1.0 for row in result.matrix for v in row)
    with pytest.raises(ValueError, match="method must be one of"):
        run_method(stream, "ewc", settings)


@pytest.mark.slow
def test_cli_writes_the_report_for_both_streams(tmp_path):
    out = tmp_path / "lifelong"
    assert main(["lifelong", "--quick", "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["streams"]) == {"stdlib", "digits"}
    for name, stream in metrics["streams"].items():
        assert [r["method"] for r in stream["results"]] == list(METHODS)
        phases = len(stream["phases"])
        for r in stream["results"]:
            assert len(r["matrix"]) == phases and len(r["matrix"][0]) == phases
        with Image.open(out / metrics["plots"][name]) as image:
            assert image.size[0] > 100
    report = (out / "report.md").read_text()
    assert "forgetting" in report and "lifelong-moe-replay" in report
    assert "prune least used" in report and "merge MC-SMoE" in report
    assert [s["dataset"] for s in metrics["prune_merge"]] == ["tokens", "digits"]
    for study in metrics["prune_merge"]:
        assert [r["experts"] for r in study["rows"]] == [8, 4, 4, 4, 4]
        assert all(math.isfinite(r["after_recovery"]) for r in study["rows"])
    for study in metrics["upcycling"]:  # upcycling preserves the dense model's function
        dense, upcycled = study["rows"][0]["metric"], study["rows"][1]["metric"]
        assert upcycled == pytest.approx(dense, rel=1e-4)
        assert study["rows"][1]["experts"] == 8


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit) as err:
        main(["lifelong", "--steps", "0"])
    assert err.value.code == 2
    assert "routelab: error" in capsys.readouterr().err
    assert main(["lifelong", "--methods", "dense,ewc"]) == 2
    assert "unknown ewc" in capsys.readouterr().err


def test_a_seeded_run_repeats_exactly_and_one_method_runs_alone(tmp_path):
    settings = LifelongSettings.quick_settings(seed=3)
    stream = load_stream("digits", settings)
    first = run_method(stream, "lifelong-moe-replay", settings)
    again = run_method(load_stream("digits", settings), "lifelong-moe-replay", settings)
    assert first.matrix == again.matrix and first.initial == again.initial
    out = tmp_path / "one"
    argv = ["lifelong", "--quick", "--stream", "digits", "--methods", "moe-finetune"]
    assert main([*argv, "--no-prune", "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["method"] for r in metrics["streams"]["digits"]["results"]] == ["moe-finetune"]


def test_the_readme_forgetting_tables_are_the_committed_run():
    """README rows come from docs/lifelong/metrics.json (regenerate both together:
    routelab lifelong --out docs/lifelong, then update the README tables)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    metrics = json.loads((root / "docs" / "lifelong" / "metrics.json").read_text())
    readme = (root / "README.md").read_text()
    for stream, with_forward in (("stdlib", True), ("digits", False)):
        for r in metrics["streams"][stream]["results"]:
            s = r["summary"]
            cells = [r["method"], f"{s['final']:.3f}", f"{s['forgetting']:.3f}"]
            if with_forward:
                cells.append(f"{s['forward_transfer']:+.3f}")
            cells.append(str(r["parameters"][-1]))
            assert "| " + " | ".join(cells) + " |" in readme, (stream, r["method"])
    assert metrics["settings"] == asdict(LifelongSettings())  # the default run

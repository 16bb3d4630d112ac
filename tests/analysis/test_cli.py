"""The routelab command: end to end in --quick form, conventions, and every mistake as
one line "routelab: error: ..." with exit status 2 before any training."""

import json
import re
import subprocess
import sys

import pytest
from PIL import Image

from analysis import cli
from analysis.cli import build_parser, main
from analysis.data import DATASETS
from analysis.registry import REGISTRY, default_rows

PNG = b"\x89PNG\r\n\x1a\n"


def run_cli(argv, capsys):
    """``(exit status, stdout, stderr)`` of ``routelab ARGV`` run in this process."""
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse's own errors and --version
        status = exit_.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_usage_error(argv, capsys, match, monkeypatch=None):
    """``routelab ARGV`` exits 2 with one line ``routelab: error: ...`` matching ``match``."""
    status, out, err = run_cli(argv, capsys)
    assert status == 2, (status, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("routelab: error: "), err
    assert "Traceback" not in err and out == ""
    assert re.search(match, lines[0]), lines[0]


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if any training starts."""

    def refuse(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr("analysis.compare.train_and_measure", refuse)
    monkeypatch.setattr("analysis.compare.run_jobs", refuse)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["compare", "--routers", "nope"], "unknown router 'nope'"),
        (["compare", "--routers", "noisy-top2, base"], "' base'.*without spaces"),
        (["compare", "--routers", ","], "--routers.*empty name"),
        (["compare", "--routers", "top2,top2"], "twice"),
        (["compare", "--threads", "0"], "--threads: must be an int >= 1"),
        (["compare", "--batch-size", "0"], "--batch-size: must be an int >= 1"),
        (["compare", "--steps", "-3"], "--steps"),
        (["compare", "--lr", "nan"], "--lr: must be a finite number > 0"),
        (["compare", "--lr", "inf"], "--lr"),
        (["compare", "--experts", "x"], "--experts"),
        (["compare", "--dataset", "imagenet"], "invalid choice"),
        (
            ["compare", "--routers", "hash-multi-hash", "--experts", "3"],
            "cannot run with --experts 3",
        ),
        (["compare", "--routers", "top2", "--experts", "1"], "'top2' cannot run with --experts 1"),
        (["compare", "--routers", "hash-random", "--dataset", "digits"], "runs on tokens"),
        (["compare", "--out", "/proc/routelab-not-writable"], "not writable"),
        (["sweep", "--grid", "nope=1,2"], "no option 'nope'"),
        (["sweep", "--grid", "importance_weight"], "OPTION=v1,v2"),
        (["sweep", "--grid", "importance_weight=a,b"], "numbers"),
        (["sweep", "--grid", "importance_weight=nan"], "finite"),
        (["sweep", "--router", "top2", "--grid", "k=1.5"], "whole numbers"),
        (["sweep", "--router", "base"], "give --grid"),
        (["sweep", "--router", "top2", "--grid", "k=9"], "'top2' cannot run"),
        (["demo", "--k", "9"], "--k 9 needs at least as many --experts"),
        (["demo", "--router", "nope"], "unknown router"),
        (["demo", "--tokens", "0"], "--tokens"),
        ([], "required: command"),
    ],
)
def test_every_mistake_is_one_line_and_exit_2(argv, match, capsys, no_training):
    assert_usage_error(argv, capsys, match)


def test_out_that_is_a_file_or_holds_other_files(tmp_path, capsys, no_training):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert_usage_error(["compare", "--quick", "--out", str(afile)], capsys, "is a file")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert_usage_error(["compare", "--quick", "--out", str(other)], capsys, "not empty")
    assert (other / "notes.txt").read_text() == "mine"


def test_version_and_python_m_routelab(capsys):
    status, out, _ = run_cli(["--version"], capsys)
    assert status == 0 and re.fullmatch(r"routelab \d+\.\d+\.\d+\S*\n", out)
    done = subprocess.run(
        [sys.executable, "-m", "routelab", "--version"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout == out


def _all_help():
    parser = build_parser()
    texts = [parser.format_help()]
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    texts += [p.format_help() for p in sub.choices.values()]
    return texts


def test_help_is_plain_text():
    for text in _all_help():
        assert "``" not in text and not re.search(r":(class|func|mod|meth|data):", text), text


def test_sweep_help_lists_the_chosen_routers_options(capsys):
    status, out, _ = run_cli(["sweep", "--router", "switch-cf1.0", "--help"], capsys)
    assert status == 0
    listed = {line.split()[0]: line.split()[1] for line in out.split("now:\n")[1].splitlines()[:7]}
    assert "Sweepable options of switch-cf1.0" in out
    assert listed["capacity_factor"] == "1.0" and listed["balance_weight"] == "0.01"
    assert "z_weight" in listed
    status, out, _ = run_cli(["sweep", "--router", "top2-pausing", "--help"], capsys)
    assert re.search(r"\n  margin +64\.0 +\(PausingPolicy\)", out)


def test_subcommands_are_registered_from_one_table():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert {"demo", "compare", "sweep"} <= set(sub.choices)
    assert len(cli.SUBCOMMANDS) == len(sub.choices)


def test_demo_with_a_registry_router(capsys):
    status, out, _ = run_cli(
        ["demo", "--router", "base", "--tokens", "256", "--experts", "4"], capsys
    )
    assert status == 0
    loads = [int(line.split()[2]) for line in out.splitlines() if line.startswith("expert ")]
    assert loads == [64, 64, 64, 64]  # BASE: every expert exactly T / E
    status, out, _ = run_cli(["demo", "--router", "hash-balanced", "--tokens", "128"], capsys)
    assert status == 0 and "hash-balanced" in out


def _table_rows(report, dataset):
    section = report.split(f"\n## {dataset}\n")[1].split("\n## ")[0]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    return [line.split("|")[1].strip() for line in lines[1:]]


@pytest.mark.slow
def test_compare_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "report"
    routers = ["top2", "switch-cf0.5", "softmax", "hash-balanced"]
    argv = ["compare", "--quick", "--out", str(out), "--no-progress", "--threads", "2"]
    status, stdout, err = run_cli([*argv, "--routers", ",".join(routers)], capsys)
    assert status == 0, err
    assert "about" in err and "quiet machine" in err  # the time is said up front
    report = (out / "report.md").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    assert _table_rows(report, "tokens") == routers
    assert _table_rows(report, "digits") == ["top2", "switch-cf0.5", "softmax"]  # no hash
    softmax = next(r for r in metrics["datasets"]["digits"]["results"] if r["router"] == "softmax")
    assert softmax["dense"] and "| softmax |" in report
    digits_section = report.split("\n## digits\n")[1]
    softmax_line = next(
        line for line in digits_section.splitlines() if line.startswith("| softmax |")
    )
    assert softmax_line.count("n/a") >= 4
    switch = next(
        r for r in metrics["datasets"]["tokens"]["results"] if r["router"] == "switch-cf0.5"
    )
    assert switch["executed"]["num_dropped"] > 0
    assert switch["chosen"]["num_dropped"] == 0  # the router's own choice drops nothing
    assert len(switch["shuffled_mutual_information"]) == 10
    manifest = json.loads((out / "run.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted([*manifest["files"], "run.json"])
    for dataset in DATASETS:
        for name in metrics["plots"][dataset]:
            assert (out / name).read_bytes()[:8] == PNG
            with Image.open(out / name) as image:
                image.verify()
    assert "| router |" in stdout
    for needle in ("## Rows", "What this run shows", "Detail plots:", "chance I", "changed %"):
        assert needle in report

    # a different run into the same folder is refused, and nothing was touched
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    status, _, err = run_cli([*argv, "--routers", "top2", "--dataset", "tokens"], capsys)
    assert status == 2 and "holds a different run" in err and "--overwrite" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    # with --overwrite the old run's files go (no digits plots remain beside the new ones)
    status, _, err = run_cli(
        [*argv, "--routers", "top2", "--dataset", "tokens", "--overwrite"], capsys
    )
    assert status == 0, err
    names = {p.name for p in out.iterdir()}
    assert not any(n.startswith("digits_") for n in names)
    assert names == {*json.loads((out / "run.json").read_text())["files"], "run.json"}


@pytest.mark.slow
def test_sweep_quick_over_a_policy_option(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--quick", "--steps", "3", "--out", str(out), "--no-progress"]
    argv += ["--router", "switch-cf1.0", "--grid", "capacity_factor=0.5,2", "--threads", "1"]
    argv += ["--dataset", "tokens"]
    status, stdout, err = run_cli(argv, capsys)
    assert status == 0, err
    cells = json.loads((out / "sweep.json").read_text())["cells"]
    assert [c["options"] for c in cells] == [{"capacity_factor": 0.5}, {"capacity_factor": 2.0}]
    assert cells[0]["dropped_pct"] > cells[1]["dropped_pct"]  # less capacity, more drops
    assert (out / "sweep.png").read_bytes()[:8] == PNG
    assert "## dropped %" in stdout and "capacity_factor" in stdout
    other = [a if a != "capacity_factor=0.5,2" else "capacity_factor=1" for a in argv]
    assert_usage_error(other, capsys, "holds a different run")


def test_default_rows_are_what_compare_plans():
    from analysis.compare import plan_jobs

    jobs = plan_jobs(default_rows(), DATASETS)
    tokens = [j.router for j in jobs if j.dataset == "tokens"]
    digits = [j.router for j in jobs if j.dataset == "digits"]
    assert tokens == [r.name for r in default_rows() if "tokens" in r.datasets]
    assert digits == [r.name for r in default_rows() if "digits" in r.datasets]
    assert not [n for n in digits if REGISTRY[n].router.__name__ == "HashRouter"]

"""Hostile inputs to the analysis functions: a clear TypeError / ValueError naming the
argument, up front (no 32 GB allocation, no deep torch message)."""

import math

import numpy as np
import pytest
import torch

from analysis import (
    RoutingRecorder,
    contingency,
    frequency_buckets,
    mutual_information,
    plots,
    shuffled_baseline,
    specialisation,
)
from analysis.specialisation import shuffled_levels
from analysis.validation import MAX_TABLE_CELLS, as_float_array, as_labels
from routelab import FFNExperts, MoE, Routing
from routelab.routers import TopKGate


def _routing(num_tokens=6, num_experts=3):
    token = torch.arange(num_tokens)
    return Routing(token, token % num_experts, torch.ones(num_tokens), num_tokens, num_experts)


@pytest.mark.parametrize(
    ("labels", "num_labels", "error", "match"),
    [
        (torch.zeros(6, dtype=torch.long), 2.5, TypeError, "num_labels must be an int"),
        (torch.zeros(6, dtype=torch.long), True, TypeError, "num_labels must be an int"),
        (torch.zeros(6, dtype=torch.long), 0, ValueError, "num_labels must be >= 1"),
        (torch.zeros(6), None, TypeError, "integer tensor"),
        (torch.zeros(6, dtype=torch.bool), None, TypeError, "integer tensor"),
        (torch.zeros(5, dtype=torch.long), None, ValueError, r"shape \[T\] = \[6\]"),
        (torch.zeros(2, 3, dtype=torch.long), None, ValueError, "shape"),
        (torch.tensor([0, 1, 2, 3, 4, -1]), None, ValueError, ">= 0"),
        (torch.tensor([0, 1, 2, 3, 4, 5]), 3, ValueError, "< num_labels = 3"),
        (["a", "b", "c", "d", "e", "f"], None, TypeError, "integer"),
    ],
)
def test_contingency_rejects_bad_labels(labels, num_labels, error, match):
    with pytest.raises(error, match=match):
        contingency(_routing(), labels, num_labels)
    with pytest.raises(error, match=match):
        shuffled_baseline(_routing(), labels, num_labels)


def test_one_huge_label_is_refused_before_allocating():
    labels = torch.tensor([0, 1, 2, 3, 4, 10**9])
    with pytest.raises(ValueError, match=r"cells.*torch.unique"):
        contingency(_routing(), labels)  # would be a 3 x 1e9 int64 table: 24 GB
    with pytest.raises(ValueError, match="cells"):
        specialisation(_routing(), labels)
    with pytest.raises(ValueError, match="cells"):
        contingency(_routing(), torch.zeros(6, dtype=torch.long), num_labels=MAX_TABLE_CELLS)
    # the fix the message names works
    table = contingency(_routing(), torch.unique(labels, return_inverse=True)[1])
    assert table.shape == (3, 6) and int(table.sum()) == 6


def test_labels_as_numpy_and_lists_work():
    expected = contingency(_routing(), torch.tensor([0, 1, 0, 1, 0, 1]))
    assert torch.equal(contingency(_routing(), np.array([0, 1, 0, 1, 0, 1])), expected)
    assert torch.equal(contingency(_routing(), [0, 1, 0, 1, 0, 1]), expected)
    empty = Routing(
        torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0), 0, 3
    )
    assert contingency(empty, torch.zeros(0, dtype=torch.long)).shape == (3, 1)


@pytest.mark.parametrize(
    ("table", "error", "match"),
    [
        ([[1.0, float("nan")]], ValueError, "finite"),
        ([[1.0, float("inf")]], ValueError, "finite"),
        ([[1.0, -1.0]], ValueError, ">= 0"),
        ([1.0, 2.0], ValueError, "2-D"),
        (torch.zeros(0, 3), ValueError, "at least 1"),
        ([["a", "b"]], TypeError, "real numbers"),
        (torch.ones(2, 2, dtype=torch.complex64), TypeError, "real"),
    ],
)
def test_tables_are_checked(table, error, match):
    with pytest.raises(error, match=match):
        mutual_information(table)
    with pytest.raises(error, match=match):
        specialisation(table)


def test_specialisation_and_buckets_options():
    with pytest.raises(ValueError, match="top must be >= 1"):
        specialisation([[1, 2]], top=0)
    with pytest.raises(TypeError, match="top must be an int"):
        specialisation([[1, 2]], top=1.5)
    with pytest.raises(ValueError, match="finite"):
        frequency_buckets([1.0, float("nan")])
    with pytest.raises(ValueError, match=">= 0"):
        frequency_buckets([1, -2])
    with pytest.raises(TypeError, match="num_buckets"):
        frequency_buckets([1, 2], 2.5)
    with pytest.raises(ValueError, match="shuffles must be >= 1"):
        shuffled_levels(_routing(), torch.zeros(6, dtype=torch.long), shuffles=0)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        shuffled_levels(_routing(), torch.zeros(6, dtype=torch.long), seed=-1)
    # independent expectation: expert = label on 3 labels gives I = log 3
    spec = specialisation(_routing(), torch.arange(6) % 3)
    assert spec.mutual_information == pytest.approx(math.log(3))


def test_recorder_arguments():
    moe = MoE(TopKGate(4, 2, k=1), FFNExperts(2, 4, 8))
    with pytest.raises(TypeError, match="num_labels must be an int"):
        RoutingRecorder(moe, num_labels=2.5)
    with pytest.raises(ValueError, match="mode must be one of"):
        RoutingRecorder(moe, mode="training")
    recorder = RoutingRecorder(moe, num_labels=3)
    with pytest.raises(TypeError, match="integer"):
        recorder.set_labels(torch.zeros(4))
    with pytest.raises(ValueError, match="< num_labels = 3"):
        recorder.set_labels(torch.tensor([0, 3]))
    recorder.set_labels(torch.tensor([[0, 1], [2, 0]]))  # any shape, flattened
    moe(torch.randn(4, 4))
    assert int(recorder.table(0).sum()) == 4
    with pytest.raises(ValueError, match="field must be a LoadStats field"):
        recorder.cv_history(0, "cv_nonsense")
    recorder.remove()


def test_plots_refuse_non_finite_and_wrong_shapes(tmp_path):
    with pytest.raises(ValueError, match="finite"):
        plots.plot_load(torch.tensor([1.0, float("nan")]), tmp_path / "a.png")
    with pytest.raises(ValueError, match="2-D"):
        plots.plot_heatmap([1, 2, 3], tmp_path / "b.png")
    with pytest.raises(ValueError, match="at least one"):
        plots.plot_cv_panels({}, tmp_path / "c.png")
    with pytest.raises(TypeError, match="real numbers"):
        plots.plot_cv_over_steps({"x": ["a", "b"]}, tmp_path / "d.png")
    with pytest.raises(ValueError, match="one or two options"):
        plots.plot_sweep({}, [], tmp_path / "e.png", quantities={"m": "m"})
    assert not any(tmp_path.iterdir())


def test_validation_helpers_directly():
    assert as_float_array("v", [1, 2], 1).dtype == torch.float64
    labels, num = as_labels("labels", np.array([2, 0]), 2, None)
    assert labels.tolist() == [2, 0] and num == 3
    with pytest.raises(TypeError, match="bad"):
        as_float_array("bad", object(), 1)

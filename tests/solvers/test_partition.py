import itertools

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from solvers import PartitionResult, balanced_partition, greedy_partition


def brute_force_max_load(w, bins):
    best = float("inf")
    for assignment in itertools.product(range(bins), repeat=len(w)):
        loads = np.bincount(assignment, weights=w, minlength=bins)
        best = min(best, loads.max(initial=0.0))
    return best


weight_lists = st.lists(
    st.one_of(st.integers(0, 50).map(float), st.floats(0, 10, allow_nan=False)),
    min_size=0,
    max_size=60,
)


@given(w=weight_lists, bins=st.integers(1, 9))
def test_never_worse_than_greedy_and_consistent(w, bins):
    w = np.array(w, dtype=np.float64)
    result = balanced_partition(w, bins)
    greedy = greedy_partition(w, bins)
    assert result.max_load <= greedy.max_load + 1e-9
    # the result describes its own assignment
    assert result.assignment.shape == w.shape and result.assignment.dtype == np.int64
    assert ((result.assignment >= 0) & (result.assignment < bins)).all()
    loads = np.bincount(result.assignment, weights=w, minlength=bins)
    np.testing.assert_allclose(result.loads, loads, atol=1e-9)
    assert result.max_load == pytest.approx(loads.max(initial=0.0))
    assert result.max_load >= result.lower_bound - 1e-9
    assert result.max_load <= balanced_partition(w, bins, improve=False).max_load + 1e-9


@given(
    w=st.lists(st.integers(0, 30), min_size=1, max_size=7),
    bins=st.integers(1, 3),
)
def test_against_brute_force_on_tiny_cases(w, bins):
    w = np.array(w, dtype=np.float64)
    opt = brute_force_max_load(w, bins)
    result = balanced_partition(w, bins)
    greedy = greedy_partition(w, bins)
    assert opt - 1e-9 <= result.max_load <= greedy.max_load + 1e-9
    # Graham's LPT bound: max load <= (4/3 - 1/(3m)) OPT
    assert result.max_load <= (4 / 3 - 1 / (3 * bins)) * opt + 1e-9
    assert brute_force_max_load(w, bins) <= greedy.max_load + 1e-9


def test_local_pass_improves_on_lpt():
    # LPT gives {3, 2, 2} / {3, 2} -> 7; the optimum is {3, 3} / {2, 2, 2} -> 6
    result = balanced_partition([3, 3, 2, 2, 2], 2)
    assert result.max_load == 6.0 and result.imbalance == 1.0
    assert balanced_partition([3, 3, 2, 2, 2], 2, improve=False).max_load == 7.0


def test_torch_in_torch_out_and_numpy_in_numpy_out():
    w = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0])
    r = balanced_partition(w, 2)
    assert isinstance(r, PartitionResult)
    assert isinstance(r.assignment, torch.Tensor) and r.assignment.dtype == torch.int64
    assert isinstance(r.loads, torch.Tensor) and sorted(r.loads.tolist()) == [7.0, 8.0]
    n = balanced_partition(w.numpy(), 2)
    assert isinstance(n.assignment, np.ndarray)
    np.testing.assert_array_equal(n.assignment, r.assignment.numpy())
    assert balanced_partition([1, 2, 3], 2).assignment.dtype == np.int64  # a plain list


def test_deterministic_and_edge_cases():
    rng = np.random.default_rng(0)
    w = rng.zipf(1.3, 500).astype(float)
    a, b = balanced_partition(w, 7), balanced_partition(w, 7)
    np.testing.assert_array_equal(a.assignment, b.assignment)
    empty = balanced_partition([], 3)
    assert empty.assignment.shape == (0,) and empty.max_load == 0.0 and empty.imbalance == 1.0
    zeros = balanced_partition([0, 0, 0], 2)
    assert zeros.max_load == 0.0
    one_bin = balanced_partition([1, 2, 3], 1)
    assert one_bin.assignment.tolist() == [0, 0, 0] and one_bin.max_load == 6.0


def test_zipf_weights_reach_the_lower_bound():
    w = 1.0 / np.arange(1, 4001)  # Zipf frequencies of 4000 tokens
    r = balanced_partition(w, 16)
    assert r.max_load <= r.lower_bound * 1.001
    assert r.max_load < greedy_partition(np.random.default_rng(0).permutation(w), 16).max_load


@pytest.mark.parametrize(
    ("weights", "bins", "error", "match"),
    [
        ([1.0, -1.0], 2, ValueError, ">= 0"),
        ([1.0, float("nan")], 2, ValueError, "finite"),
        ([[1.0]], 2, ValueError, "1-D"),
        (["a"], 2, TypeError, "numeric"),
        ([1.0], 0, ValueError, "bins"),
        ([1.0], 2.0, TypeError, "bins"),
        ([1.0], True, TypeError, "bins"),
    ],
)
def test_bad_input_is_a_clear_error(weights, bins, error, match):
    with pytest.raises(error, match=match):
        balanced_partition(weights, bins)

"""Tests for solvers.balanced_assignment: every method against independent references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from solvers import AssignmentResult, balanced_assignment
from solvers.assignment import METHODS

FAST = ("auction", "exact", "sinkhorn", "greedy", "hungarian")


@st.composite
def problems(draw, max_tokens=64, max_experts=8):
    """``(scores [T, E], capacity)``: float or integer scores (ties), scales up to 1e12,
    capacity None, an int, or an uneven vector with ``sum >= T``."""
    T = draw(st.integers(0, max_tokens))
    E = draw(st.integers(1, max_experts))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["gauss", "int", "skewed", "huge", "constant"]))
    if kind == "gauss":
        S = rng.standard_normal((T, E))
    elif kind == "int":
        S = rng.integers(-3, 4, (T, E))
    elif kind == "skewed":
        S = rng.standard_normal((T, E)) + 3 * rng.standard_normal(E)
    elif kind == "huge":
        S = rng.standard_normal((T, E)) * 1e12
    else:
        S = np.full((T, E), 2.5)
    cap_kind = draw(st.sampled_from(["even", "int", "vector"]))
    if cap_kind == "even":
        cap = None
    elif cap_kind == "int":
        cap = -(-T // E) + draw(st.integers(0, 3))
    else:
        cap = rng.multinomial(T, np.ones(E) / E) + rng.integers(0, 3, E) * draw(st.integers(0, 1))
    return S, cap


def quota(T, E, cap):
    if cap is None:
        base, extra = divmod(T, E)
        return np.array([base + (e < extra) for e in range(E)])
    return np.broadcast_to(np.asarray(cap), (E,))


def scale_of(S):
    return max(float(np.abs(S).max(axis=1).sum()) if S.size else 0.0, 1e-300)


def check_result(res, S, cap):
    T, E = S.shape
    a = np.asarray(res.assignment)
    assert isinstance(res, AssignmentResult)
    assert a.dtype == np.int64 and a.shape == (T,)
    assert ((a >= 0) & (a < E)).all()
    load = np.bincount(a, minlength=E)
    assert (load <= quota(T, E, cap)).all(), (load, quota(T, E, cap))
    assert res.objective == pytest.approx(float(S[np.arange(T), a].sum()), rel=1e-12, abs=1e-9)
    assert res.gap_bound >= 0 and np.asarray(res.prices).shape == (E,)
    if cap is None:  # even split: every expert exactly its quota
        assert (load == quota(T, E, cap)).all()


@given(problems())
def test_fast_methods_meet_capacities_and_bound_their_gap(problem):
    S, cap = problem
    opt = balanced_assignment(S, cap, method="hungarian").objective
    tol = 1e-9 * scale_of(S)
    for method in FAST:
        res = balanced_assignment(S, cap, method=method)
        check_result(res, S, cap)
        true_gap = opt - res.objective
        assert true_gap >= -tol, (method, "beats the optimum")
        assert res.gap_bound >= true_gap - tol, (method, res.gap_bound, true_gap)
    exact = balanced_assignment(S, cap, method="exact")
    assert exact.objective == pytest.approx(opt, rel=1e-9, abs=tol)
    assert exact.gap_bound <= tol
    auction = balanced_assignment(S, cap, method="auction")
    assert opt - auction.objective <= auction.gap_bound + tol
    assert auction.gap_bound <= 1e-6 * scale_of(S) + tol  # its default tolerance


@settings(max_examples=12)
@given(problems(max_tokens=20, max_experts=5))
def test_exact_and_all_references_agree(problem):
    S, cap = problem
    objectives = {}
    for method in ("exact", "hungarian", "lp", "mincostflow"):
        res = balanced_assignment(S, cap, method=method)
        check_result(res, S, cap)
        objectives[method] = res.objective
    tol = 1e-9 * scale_of(S)
    for value in objectives.values():
        assert value == pytest.approx(objectives["hungarian"], rel=1e-9, abs=tol), objectives


@given(st.integers(0, 6), st.integers(1, 3), st.integers(0, 10_000), st.booleans())
def test_exact_matches_brute_force(T, E, seed, integer):
    rng = np.random.default_rng(seed)
    S = rng.integers(0, 3, (T, E)) if integer else rng.standard_normal((T, E))
    cap = rng.integers(0, T + 1, E)
    cap[0] += max(0, T - cap.sum())
    best = max(
        (
            S[np.arange(T), list(a)].sum()
            for a in itertools.product(range(E), repeat=T)
            if (np.bincount(np.array(a, dtype=np.int64), minlength=E) <= cap).all()
        ),
        default=0.0,
    )
    assert balanced_assignment(S, cap, method="exact").objective == pytest.approx(best, abs=1e-9)


@given(problems(max_tokens=30))
def test_greedy_is_sequential_greedy_by_descending_score(problem):
    S, cap = problem
    T, E = S.shape
    room = quota(T, E, cap).copy()
    ref = np.full(T, -1)
    entries = sorted((-S[t, e], t, e) for t in range(T) for e in range(E))
    for _, t, e in entries:  # the plain loop: highest score first, ties by token then expert
        if ref[t] < 0 and room[e] > 0:
            ref[t], room[e] = e, room[e] - 1
    np.testing.assert_array_equal(balanced_assignment(S, cap, method="greedy").assignment, ref)


@given(problems(max_tokens=40))
def test_dual_bound_holds_for_any_prices(problem):
    from solvers._duals import dual_value
    from solvers._ops import NumpyOps
    from solvers._validate import check_capacity

    S, cap = problem
    S = S.astype(np.float64)
    T, E = S.shape
    c = check_capacity(cap, T, E)
    opt = balanced_assignment(S, cap, method="hungarian").objective
    rng = np.random.default_rng(0)
    for _ in range(5):
        p = rng.random(E) * (float(np.abs(S).max(initial=0.0)) + 1)  # p >= 0: valid
        assert dual_value(NumpyOps(), S, c, p) >= opt - 1e-9 * scale_of(S)


@pytest.mark.parametrize("method", ["auction", "exact", "greedy", "sinkhorn"])
@given(problem=problems())
def test_torch_cpu_path_equals_numpy_path(method, problem):
    S, cap = problem
    a = balanced_assignment(S, cap, method=method)
    b = balanced_assignment(torch.from_numpy(np.asarray(S, dtype=np.float64)), cap, method=method)
    assert isinstance(b.assignment, torch.Tensor) and b.assignment.dtype == torch.int64
    assert isinstance(b.prices, torch.Tensor) and b.prices.dtype == torch.float64
    np.testing.assert_array_equal(a.assignment, b.assignment.numpy())
    np.testing.assert_allclose(a.prices, b.prices.numpy(), rtol=1e-12, atol=1e-9)
    assert a.objective == pytest.approx(b.objective, rel=1e-12, abs=1e-9)


@pytest.mark.parametrize("method", FAST)
def test_deterministic_on_ties(method):
    S = np.tile(np.array([[1.0, 1.0, 0.0, 1.0]]), (50, 1))
    S[::7] = 2.0
    first = balanced_assignment(S, method=method)
    for _ in range(2):
        again = balanced_assignment(S.copy(), method=method)
        np.testing.assert_array_equal(first.assignment, again.assignment)
        np.testing.assert_array_equal(first.prices, again.prices)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.int32])
@pytest.mark.parametrize("method", ["auction", "exact", "greedy", "sinkhorn"])
def test_low_precision_and_integer_tensors(dtype, method):
    g = torch.Generator().manual_seed(0)
    S = (torch.randn(45, 6, generator=g) * 4).to(dtype)
    res = balanced_assignment(S, method=method)
    assert res.assignment.dtype == torch.int64
    assert torch.bincount(res.assignment, minlength=6).tolist() == [8, 8, 8, 7, 7, 7]
    opt = balanced_assignment(S.double().numpy(), method="hungarian").objective
    assert res.objective <= opt + 1e-9
    assert opt - res.objective <= res.gap_bound + 1e-9


def test_huge_scores_are_solved_exactly():
    rng = np.random.default_rng(3)
    S = rng.standard_normal((60, 7)) * 1e12 + 1e12
    opt = balanced_assignment(S, method="hungarian").objective
    for method in ("exact", "auction"):
        res = balanced_assignment(S, method=method)
        assert res.objective == pytest.approx(opt, rel=1e-9)


def test_empty_and_single_expert():
    for method in METHODS:
        res = balanced_assignment(np.zeros((0, 4)), method=method)
        assert res.assignment.shape == (0,) and res.objective == 0 and res.gap_bound == 0
        res = balanced_assignment(np.arange(5.0)[:, None], method=method)
        assert res.assignment.tolist() == [0] * 5 and res.objective == 10.0
    res = balanced_assignment(torch.zeros(0, 3), method="auction")
    assert isinstance(res.assignment, torch.Tensor) and res.assignment.shape == (0,)


def test_large_problem_exact_has_zero_gap():
    rng = np.random.default_rng(0)
    S = rng.standard_normal((3000, 16)) + rng.standard_normal(16)
    res = balanced_assignment(S, method="exact")
    assert res.gap_bound <= 1e-9 * scale_of(S)
    assert (np.bincount(res.assignment, minlength=16) == 3000 // 16 + (np.arange(16) < 8)).all()
    auc = balanced_assignment(S, method="auction", tol=1e-4)
    assert auc.gap_bound <= 1e-4 * scale_of(S)
    assert res.objective - auc.objective <= auc.gap_bound + 1e-9


@pytest.mark.parametrize(
    ("scores", "capacity", "error", "match"),
    [
        (np.array([[np.nan, 1.0]]), None, ValueError, "found NaN"),
        (np.array([[np.inf, 1.0]]), None, ValueError, r"found \+inf"),
        (np.zeros(4), None, ValueError, "2-D"),
        (np.zeros((3, 0)), None, ValueError, "at least one expert"),
        (np.zeros((3, 2), dtype=bool), None, TypeError, "dtype"),
        (np.zeros((3, 2), dtype=complex), None, TypeError, "dtype"),
        ("abc", None, TypeError, "numpy array or a torch tensor"),
        (np.zeros((5, 2)), 2, ValueError, r"sum\(capacity\) = 4 < T = 5"),
        (np.zeros((5, 2)), [6, -1], ValueError, ">= 0"),
        (np.zeros((5, 2)), [5, 1, 1], ValueError, r"shape \[E\] = \[2\]"),
        (np.zeros((5, 2)), [2.5, 3.0], TypeError, "capacity"),
        (np.zeros((5, 2)), True, TypeError, "capacity"),
    ],
)
def test_bad_input_is_a_clear_error(scores, capacity, error, match):
    with pytest.raises(error, match=match):
        balanced_assignment(scores, capacity)


def test_bad_method_and_options():
    with pytest.raises(ValueError, match="method must be one of"):
        balanced_assignment(np.zeros((2, 2)), method="simplex")
    with pytest.raises(TypeError, match="unknown option"):
        balanced_assignment(np.zeros((2, 2)), method="greedy", tol=1e-3)
    with pytest.raises(ValueError, match="tol"):
        balanced_assignment(np.ones((4, 2)) * [1, 2], method="auction", tol=-1.0)
    with pytest.raises(ValueError, match="max_entries"):
        balanced_assignment(np.zeros((100, 4)), method="hungarian", max_entries=1000)
    with pytest.raises(TypeError, match="torch"):
        balanced_assignment(torch.zeros(3, 2, dtype=torch.bool))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["auction", "exact", "greedy", "sinkhorn"])
def test_cuda_in_cuda_out(method):
    S = torch.randn(300, 8, device="cuda")
    res = balanced_assignment(S, method=method)
    assert res.assignment.device == S.device and res.prices.device == S.device
    ref = balanced_assignment(S.cpu(), method=method)
    torch.testing.assert_close(res.assignment.cpu(), ref.assignment)


@pytest.mark.parametrize("method", ["exact", "auction", "greedy", "sinkhorn"])
@pytest.mark.parametrize("seed", range(3))
def test_closed_experts_take_no_token_and_keep_a_finite_certificate(method, seed):
    """Experts of capacity 0, at a size where the auction phase runs (it used to price
    them at inf: NaN gap bounds and non-optimal assignments)."""
    rng = np.random.default_rng(seed)
    T, E = 900, 5
    cap = np.array([0, 500, 0, 280, 150])  # sum 930 >= 900
    S = rng.standard_normal((T, E)) + rng.standard_normal(E)  # a per-expert skew too
    optimum = balanced_assignment(S, cap, method="hungarian").objective
    res = balanced_assignment(S, cap, method=method)
    assert np.isfinite(res.prices).all() and np.isfinite(res.gap_bound)
    assert (np.bincount(res.assignment, minlength=E) <= cap).all()
    assert res.gap_bound >= optimum - res.objective - 1e-9 * abs(optimum)
    if method == "exact":
        assert res.objective == pytest.approx(optimum, rel=1e-9)

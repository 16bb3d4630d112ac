"""Tests for the small-problem path of method="exact": dual coordinate descent prices, the
assignment on the tight graph of given prices, its maximum flow, and the end result against
scipy's Hungarian on repeated columns (independent references throughout)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching

from solvers import balanced_assignment
from solvers._coordinate import coordinate_prices, tight_assignment
from solvers._feasibility import PatternFlow
from solvers.assignment import _FEW_EXPERTS


def dual(S, cap, p):
    """``D(p) = sum_t max_e (S_te - p_e) + sum_e c_e p_e``, written out."""
    return float(sum(max(S[t] - p) for t in range(S.shape[0])) + np.dot(cap, p))


def hungarian_optimum(S, cap):
    """The optimum by scipy on the columns repeated by capacity (an independent solver)."""
    columns = np.repeat(np.arange(S.shape[1]), cap)
    rows, cols = linear_sum_assignment(S[:, columns], maximize=True)
    return float(S[rows, columns[cols]].sum())


KINDS = ("gauss", "skewed", "lowrank", "int", "int-skewed")


def random_scores(rng, kind, T, E, levels):
    """``[T, E]`` scores of a kind of KINDS; integer kinds take ``levels`` values (ties)."""
    if kind == "gauss":
        return rng.standard_normal((T, E))
    if kind == "skewed":
        return rng.standard_normal((T, E)) + 2 * rng.standard_normal(E)
    if kind == "lowrank":
        return rng.standard_normal((T, 3)) @ rng.standard_normal((3, E))
    skew = rng.integers(0, 3, E) if kind == "int-skewed" else 0
    return (rng.integers(0, levels, (T, E)) + skew).astype(np.float64)


@st.composite
def scores_and_capacity(draw, max_tokens=40, max_experts=6, spare=True, kinds=KINDS):
    """``(S [T, E], cap [E])``: Gaussian, skewed, low-rank or integer scores (ties), every
    capacity >= 1, ``sum(cap) == T`` or (with ``spare``) more."""
    E = draw(st.integers(2, max_experts))
    T = draw(st.integers(E, max_tokens))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    S = random_scores(rng, draw(st.sampled_from(kinds)), T, E, levels=4)
    cap = 1 + rng.multinomial(T - E, np.ones(E) / E)
    if spare and draw(st.booleans()):
        cap = cap + rng.integers(0, 3, E)
    return S, cap


@given(scores_and_capacity())
def test_each_coordinate_step_minimises_the_dual_along_its_coordinate(problem):
    """After one sweep the last expert's price is a minimiser of D along that coordinate
    (p >= 0 with spare capacity): D is piecewise linear there, so its minimum over the
    coordinate is at a breakpoint ``S_te - max_{f != e}(S_tf - p_f)`` (or at 0)."""
    S, cap = problem
    T, E = S.shape
    p, sweeps = coordinate_prices(S, cap, np.zeros(E), max_sweeps=1, enough=0)
    assert sweeps == 1
    e = E - 1
    others = np.delete(S - p, e, axis=1).max(axis=1)
    candidates = [*(S[:, e] - others), 0.0]
    if cap.sum() > T:
        candidates = [c for c in candidates if c >= 0]
        assert p[e] >= 0
    trial = p.copy()
    best = min(dual(S, cap, np.where(np.arange(E) == e, c, trial)) for c in candidates)
    assert dual(S, cap, p) <= best + 1e-9 * (1 + abs(best))


@given(scores_and_capacity(), st.integers(0, 2**32 - 1))
def test_tight_assignment_uses_row_maxima_within_capacity_for_any_prices(problem, seed):
    S, cap = problem
    E = S.shape[1]
    rng = np.random.default_rng(seed)
    p = rng.integers(0, 3, E).astype(np.float64)  # integer prices keep integer scores tied
    owner = tight_assignment(S, cap, p)
    placed = owner >= 0
    v = S - p
    assert (v[placed, owner[placed]] == v[placed].max(axis=1)).all()
    assert (np.bincount(owner[placed], minlength=E) <= cap).all()


@given(scores_and_capacity(spare=False, kinds=("int", "int-skewed")))
def test_tight_assignment_places_every_token_at_optimal_prices(problem):
    """LP duality: at optimal prices an optimal assignment uses tight pairs only, so the
    tight graph's flow places every token, and the result is optimal (integer scores:
    ties everywhere, and the reference prices are exact)."""
    S, cap = problem
    T, E = S.shape
    reference = balanced_assignment(S, cap, method="hungarian")  # prices: its exchange graph
    owner = tight_assignment(S, cap, np.asarray(reference.prices))
    assert (owner >= 0).all()
    assert (np.bincount(owner, minlength=E) == cap).all()
    assert S[np.arange(T), owner].sum() == pytest.approx(hungarian_optimum(S, cap), abs=1e-9)


@given(st.integers(1, 60), st.integers(1, 9), st.integers(0, 2**32 - 1))
def test_pattern_flow_is_a_maximum_b_matching(n, E, seed):
    rng = np.random.default_rng(seed)
    usable = rng.random((n, E)) < rng.uniform(0.1, 0.9)
    cap = rng.integers(0, 6, E)
    flow = PatternFlow(usable, cap)
    owner = flow.assignment()
    placed = owner >= 0
    assert placed.sum() == flow.flow_value
    assert usable[placed, owner[placed]].all()
    assert (np.bincount(owner[placed], minlength=E) <= cap).all()
    # reference: maximum bipartite matching on the experts' columns repeated by capacity
    columns = np.repeat(np.arange(E), cap)
    graph = csr_matrix(usable[:, columns].astype(np.int8)) if columns.size else None
    matched = 0
    if graph is not None:
        matched = int((maximum_bipartite_matching(graph, perm_type="column") >= 0).sum())
    assert flow.flow_value == matched


@settings(max_examples=25)
@given(
    st.integers(2, 2 * _FEW_EXPERTS),
    st.integers(0, 2**32 - 1),
    st.sampled_from(KINDS),
    st.booleans(),
)
def test_exact_is_optimal_on_both_sides_of_the_few_experts_switch(E, seed, kind, spare):
    """Up to _FEW_EXPERTS experts the coordinate-descent path, beyond it the auction (and, for
    integer scores, the zero-price tight assignment first): optimal with a zero certificate
    either way, at sizes where sweeps stop with conflicts left for the augmenting paths."""
    rng = np.random.default_rng(seed)
    T = int(rng.integers(E, 12 * E + 1))
    S = random_scores(rng, kind, T, E, levels=10)
    cap = 1 + rng.multinomial(T - E, np.ones(E) / E) + (rng.integers(0, 2, E) if spare else 0)
    res = balanced_assignment(S, cap, method="exact")
    a = np.asarray(res.assignment)
    assert (np.bincount(a, minlength=E) <= cap).all()
    scale = 1 + float(np.abs(S).max(axis=1).sum())
    assert res.objective == pytest.approx(hungarian_optimum(S, cap), abs=1e-9 * scale)
    assert res.gap_bound <= 1e-9 * scale


def test_integer_ties_are_certified_by_zero_prices_without_bidding():
    """Uniform integer scores with many experts: the row maxima admit a full assignment,
    found by the tight graph's flow alone (no auction round, no augmenting path)."""
    rng = np.random.default_rng(0)
    S = rng.integers(0, 10, (2048, 32)).astype(np.float64)
    res = balanced_assignment(S)
    assert res.iterations == 0 and res.gap_bound == 0.0
    assert (np.asarray(res.prices) == 0).all()
    assert res.objective == S.max(axis=1).sum()
    assert (np.bincount(np.asarray(res.assignment), minlength=32) == 64).all()

"""The dual of balanced assignment and certificates built from it.

Primal: maximise ``sum_t S[t, a_t]`` over assignments ``a`` with ``load_e(a) <= c_e``.
Dual (only E variables, the expert prices p)::

    D(p) = sum_t max_e (S[t, e] - p_e) + sum_e c_e p_e  >=  OPT

for every p when ``sum(c) == T`` and for every ``p >= 0`` when ``sum(c) > T`` (weak LP
duality for the transportation problem). ``D(p) - objective`` is therefore a certified
upper bound on the optimality gap of any assignment.

The exchange graph of an assignment has one node per expert and the arc ``a -> b`` of
cost ``M[a, b] = min_{t in a} (S[t, a] - S[t, b])`` (the score lost by moving the best
candidate token from a to b); an expert with spare capacity also gets 0-cost arcs to every
expert (a slack unit can move anywhere). The assignment is optimal iff this graph has no
negative cycle, and then ``p = -dist`` (shortest distances from a virtual root) are prices
satisfying complementary slackness, so ``D(p) == objective``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "certified_gap",
    "dual_value",
    "exchange_costs",
    "objective_value",
    "prices_from_assignment",
]


def dual_value(ops: Any, S: Any, cap: Any, p: Any) -> float:
    """``D(p) = sum_t max_e (S[t, e] - p_e) + sum_e c_e p_e`` (valid bound: see module doc)."""
    if S.shape[0] == 0:
        return float(ops.sum(cap * p)) if S.shape[1] else 0.0
    return ops.sum(ops.row_max(S - p)) + ops.sum(cap * p)


def certified_gap(ops: Any, S: Any, cap: Any, assignment: Any, p: Any) -> float:
    """``D(p) - objective``, summed term by term so that no large number cancels::

        sum_t [max_e (S_te - p_e) - (S[t, a_t] - p[a_t])] + sum_e (c_e - load_e) p_e

    (the same value as ``dual_value - objective_value`` in exact arithmetic, since
    ``sum_t p[a_t] = sum_e load_e p_e``). Every bracket is >= 0 and exactly 0 for a
    complementary-slack token, whatever the magnitude of its scores (``1e300`` row
    offsets, ``-inf`` forbidden pairs that are not used).
    """
    T, E = S.shape
    if T == 0:
        return float(ops.sum(cap * p)) if E else 0.0
    with np.errstate(over="ignore"):  # -1e308 - p is -inf: an unusable pair, as it should be
        v = S - p
    slack = ops.row_max(v) - v[ops.arange(T), assignment]
    unused = cap - ops.bincount(assignment, E)
    with np.errstate(invalid="ignore"):  # 0 * inf: a full expert at an infinite price
        spare = unused * p
    spare[unused == 0] = 0  # a full expert's price never enters the gap
    return ops.sum(slack) + ops.sum(spare)


def objective_value(ops: Any, S: Any, assignment: Any) -> float:
    """``sum_t S[t, a_t]``."""
    if S.shape[0] == 0:
        return 0.0
    return ops.sum(S[ops.arange(S.shape[0]), assignment])


def exchange_costs(S: np.ndarray, cap: np.ndarray | None, assignment: np.ndarray) -> np.ndarray:
    """``M [E, E]``, the arc costs of the exchange graph (module doc).

    ``M[a, b] = min_{t: a_t = a} (S[t, a] - S[t, b])`` (inf where a is empty), lowered to 0
    where expert a has spare capacity (skipped when ``cap`` is None). The diagonal is inf.
    """
    T, E = S.shape
    M = np.full((E, E), np.inf)
    if T:
        order = np.argsort(assignment, kind="stable")
        bounds = np.searchsorted(assignment[order], np.arange(E + 1))
        for e in range(E):  # E blocks [n_e, E]: no [T, E] temporary
            idx = order[bounds[e] : bounds[e + 1]]
            if idx.size:
                M[e] = (S[idx, e][:, None] - S[idx]).min(axis=0)
    if cap is not None:
        load = np.bincount(assignment, minlength=E) if T else np.zeros(E, dtype=np.int64)
        M = np.where((load < cap)[:, None], np.minimum(M, 0.0), M)
    np.fill_diagonal(M, np.inf)
    return M


def prices_from_assignment(
    S: np.ndarray, cap: np.ndarray, assignment: np.ndarray, *, max_iter: int | None = None
) -> np.ndarray:
    """Expert prices for an assignment: ``-`` Bellman-Ford distances in its exchange graph.

    For an optimal assignment they satisfy complementary slackness (``D(p) = objective``);
    for any other they are still valid prices (the bound is then just looser). Shifted so
    that ``min(p) = 0`` (so ``p >= 0``, as the dual needs when ``sum(c) > T``).
    """
    E = S.shape[1]
    M = exchange_costs(S, cap, assignment)
    dist = np.zeros(E)
    for _ in range(max_iter if max_iter is not None else E + 1):
        with np.errstate(over="ignore"):  # sums of 1e308-scale arc costs saturate to inf
            new = np.minimum(dist, (dist[:, None] + M).min(axis=0))
        if np.array_equal(new, dist):
            break
        dist = new
    p = -dist
    return p - p.min()

"""Reference back-ends built on general-purpose solvers (scipy, cvxpy, networkx).

They are slow and exist for checking the fast methods and for users who want an
independent solver. Each returns an optimal assignment; prices come from its exchange
graph (:func:`solvers._duals.prices_from_assignment`). Forbidden pairs (``-inf``) are
missing edges (hungarian: infinite cost; lp: variables fixed at 0; mincostflow: no arc).
They get the row-shifted scores (row maximum 0), which removes per-token offsets; their
own numerics still limit them: ``lp`` to what its LP solver takes (HiGHS treats costs
above 1e20 as infinite), ``mincostflow`` to ``2**-bits`` of the finite score spread.
"""

from __future__ import annotations

import numpy as np

__all__ = ["hungarian", "linear_program", "min_cost_flow"]


def hungarian(S: np.ndarray, cap: np.ndarray, *, max_entries: int = 50_000_000) -> np.ndarray:
    """``scipy.optimize.linear_sum_assignment`` on the expert columns repeated ``c_e`` times.

    The matrix is ``[T, sum(c)]``; refuses (ValueError) when it would hold more than
    ``max_entries`` numbers.
    """
    from scipy.optimize import linear_sum_assignment

    T, E = S.shape
    slots = int(cap.sum())
    if T * slots > max_entries:
        raise ValueError(
            f"method='hungarian' would build a [T, sum(capacity)] = [{T}, {slots}] matrix "
            f"({T * slots:,} entries > max_entries = {max_entries:,}); use method='exact', "
            "or raise max_entries"
        )
    if T == 0:
        return np.zeros(0, dtype=np.int64)
    column_expert = np.repeat(np.arange(E), cap)
    rows, cols = linear_sum_assignment(S[:, column_expert], maximize=True)
    out = np.empty(T, dtype=np.int64)
    out[rows] = column_expert[cols]
    return out


def linear_program(S: np.ndarray, cap: np.ndarray, *, solver: str | None = None) -> np.ndarray:
    """The transportation LP in cvxpy; its constraint matrix is totally unimodular, so a vertex
    solution (HiGHS dual simplex by default) is integral."""
    import cvxpy as cp

    T, E = S.shape
    if T == 0:
        return np.zeros(0, dtype=np.int64)
    X = cp.Variable((T, E), nonneg=True)
    forbidden = np.isneginf(S)
    constraints = [cp.sum(X, axis=1) == 1, cp.sum(X, axis=0) <= cap]
    if forbidden.any():
        constraints.append(cp.multiply(forbidden.astype(np.float64), X) == 0)
    problem = cp.Problem(
        cp.Maximize(cp.sum(cp.multiply(np.where(forbidden, 0.0, S), X))), constraints
    )
    try:
        if solver is None:
            problem.solve(solver=cp.SCIPY, scipy_options={"method": "highs-ds"})
        else:
            problem.solve(solver=solver)
    except cp.SolverError as err:
        raise RuntimeError(
            f"method='lp': the LP solver failed ({err}); its numerics take scores up to about "
            "1e15 (HiGHS treats costs above 1e20 as infinite): use method='exact'"
        ) from None
    if problem.status not in ("optimal", "optimal_inaccurate"):
        raise RuntimeError(f"method='lp': cvxpy returned status {problem.status!r}")
    return np.asarray(np.argmax(np.asarray(X.value), axis=1), dtype=np.int64)


def min_cost_flow(S: np.ndarray, cap: np.ndarray, *, bits: int = 40) -> np.ndarray:
    """networkx network simplex with integer costs ``round((max(S) - S) * 2**k)``, the power
    of two k chosen so costs span about ``2**bits`` (exact for integer scores)."""
    import networkx as nx

    T, E = S.shape
    if T == 0:
        return np.zeros(0, dtype=np.int64)
    finite = S[np.isfinite(S)]
    spread = float(finite.max() - finite.min())
    shift = 0 if spread == 0 else bits - int(np.ceil(np.log2(spread)))
    with np.errstate(invalid="ignore"):
        cost = np.rint(np.ldexp(finite.max() - S, shift))
    G = nx.DiGraph()
    G.add_node("sink", demand=T)
    for t in range(T):
        G.add_node(("t", t), demand=-1)
        for e in np.flatnonzero(np.isfinite(cost[t])).tolist():
            G.add_edge(("t", t), ("e", e), weight=int(cost[t, e]), capacity=1)
    for e in range(E):
        G.add_edge(("e", e), "sink", weight=0, capacity=int(cap[e]))
    _, flow = nx.network_simplex(G)
    out = np.empty(T, dtype=np.int64)
    for t in range(T):
        out[t] = next(e for e in range(E) if flow[("t", t)].get(("e", e), 0) > 0)
    return out

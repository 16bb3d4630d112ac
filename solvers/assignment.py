"""Balanced assignment: tokens to experts under capacities, maximising the total score.

Problem: scores ``S [T, E]``, capacities ``c [E]`` (``sum(c) >= T``)::

    maximise   sum_t S[t, a_t]   over   a in {0..E-1}^T   with   #{t : a_t = e} <= c_e.

Every method returns an :class:`AssignmentResult` whose ``gap_bound`` is certified by LP
duality: with expert prices ``p`` (``p >= 0`` when ``sum(c) > T``),
``D(p) = sum_t max_e (S[t, e] - p_e) + sum_e c_e p_e >= OPT``, so
``gap_bound = D(p) - objective >= OPT - objective``.

numpy in, numpy out; torch in, torch out on the same device. Deterministic: the same input
gives the same output, ties included (every tie is broken by the lower token / expert id).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from solvers import _reference
from solvers._auction import auction, duals_for, greedy
from solvers._duals import dual_value, objective_value, prices_from_assignment
from solvers._exact import finish, violators
from solvers._ops import NumpyOps, ops_for
from solvers._validate import check_capacity, check_scores, is_torch

__all__ = ["METHODS", "AssignmentResult", "balanced_assignment"]

METHODS = ("auction", "exact", "sinkhorn", "greedy", "hungarian", "lp", "mincostflow")

_OPTIONS: dict[str, dict[str, Any]] = {
    "auction": {"tol": 1e-6, "eps_start": 1 / 32, "factor": 8.0, "switch": 32},
    "exact": {"tol": 1e-6, "eps_start": 1 / 128, "factor": 8.0, "switch": 64},
    "sinkhorn": {"temperature": 1e-2, "max_iter": 200, "tol": 1e-4},
    "greedy": {},
    "hungarian": {"max_entries": 50_000_000},
    "lp": {"solver": None},
    "mincostflow": {"bits": 40},
}


@dataclass(frozen=True, eq=False)
class AssignmentResult:
    """The result of :func:`balanced_assignment`.

    Fields:
        assignment: int64 ``[T]``, the expert of each token (numpy array, or a torch tensor
            on the scores' device).
        objective: ``sum_t S[t, assignment[t]]`` (float, computed in float64).
        prices: float64 ``[E]``, the expert prices (dual variables) behind ``gap_bound``.
        gap_bound: ``D(prices) - objective >= OPT - objective >= 0``, a certified bound on
            the optimality gap (0 up to rounding for the exact methods).
        iterations: method-specific work count (auction rounds plus augmenting paths,
            Sinkhorn sweeps, greedy rounds; 1 for the reference solvers).
        method: the method that produced it.
    """

    assignment: Any
    objective: float
    prices: Any
    gap_bound: float
    iterations: int
    method: str

    def __repr__(self) -> str:
        return (
            f"AssignmentResult(method={self.method!r}, T={len(self.assignment)}, "
            f"objective={self.objective:.6g}, gap_bound={self.gap_bound:.3g}, "
            f"iterations={self.iterations})"
        )


def balanced_assignment(
    scores: Any, capacity: Any = None, method: str = "exact", **options: Any
) -> AssignmentResult:
    """Assign every token to one expert, expert e taking at most ``capacity[e]`` tokens,
    maximising the total score.

    Args:
        scores: ``[T, E]`` numpy array or torch tensor (float of any precision, or integer);
            finite. Computations run in float64.
        capacity: None for an even split (``T // E`` each, the first ``T % E`` experts one
            more), an int for every expert, or an int vector ``[E]``; ``sum >= T``.
        method: ``"exact"`` (default; optimal: auction prices, then shortest augmenting
            paths on the E-node exchange graph), ``"auction"`` (epsilon-scaled auction,
            eps-optimal; runs in torch on the input's device or in numpy),
            ``"sinkhorn"`` (log-domain entropic OT, rounded to the capacities by greedy),
            ``"greedy"`` (capacity-aware greedy by descending score), or a reference
            back-end: ``"hungarian"`` (scipy on repeated columns), ``"lp"`` (cvxpy),
            ``"mincostflow"`` (networkx).
        options: per method.
            auction: ``tol`` (stop once ``gap_bound <= tol * sum_t max_e |S_te|``, 1e-6),
            ``eps_start`` (first epsilon, relative to the score spread ``max(S) - min(S)``,
            1/32), ``factor`` (epsilon divisor per phase, 8), ``switch`` (free tokens at
            which a phase's tail is handed to augmenting paths, 32).
            exact: the same for its auction phase, except ``tol`` (its last epsilon relative
            to the score spread, 1e-6; it only trades auction time against augmenting
            paths, the result is optimal either way), ``eps_start`` 1/128, ``switch`` 64.
            sinkhorn: ``temperature`` (relative to the score spread, 1e-2), ``max_iter``
            (200), ``tol`` (column-marginal error per token, 1e-4).
            hungarian: ``max_entries`` (5e7). lp: ``solver`` (cvxpy solver name).
            mincostflow: ``bits`` (integer cost resolution, 40).

    Returns:
        :class:`AssignmentResult`.

    Raises:
        TypeError: scores / capacity of the wrong type or dtype, unknown options.
        ValueError: wrong shapes, NaN / inf scores, negative or insufficient capacity,
            unknown method, a hungarian matrix above ``max_entries``.
    """
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    unknown = sorted(set(options) - set(_OPTIONS[method]))
    if unknown:
        raise TypeError(
            f"unknown option(s) {unknown} for method={method!r}; "
            f"accepted: {sorted(_OPTIONS[method]) or 'none'}"
        )
    opts = {**_OPTIONS[method], **options}
    S = check_scores(scores)
    T, E = S.shape
    cap = check_capacity(capacity, T, E)
    ops = ops_for(S)
    cap_x = ops.as_int(cap)

    if T == 0 or E == 1:
        owner = ops.full_int(T, 0)
        prices = ops.full(E, 0.0)
        return _result(ops, S, cap_x, owner, prices, 0, method)
    if not (cap > 0).all():
        return _without_closed_experts(ops, S, cap, cap_x, method, options)

    if method in ("auction", "exact"):
        owner, prices, iterations = _auction_family(
            ops, S, cap, cap_x, exact=method == "exact", **opts
        )
    elif method == "sinkhorn":
        owner, prices, iterations = _sinkhorn(ops, S, cap_x, **opts)
    elif method == "greedy":
        owner, iterations = greedy(ops, S, cap_x)
        S_host = ops.to_numpy(S)
        p_graph = ops.as_float(prices_from_assignment(S_host, cap, ops.to_numpy(owner)))
        prices, _ = duals_for(ops, S, cap_x, owner, [ops.full(E, 0.0), p_graph])
    else:
        S_host = ops.to_numpy(S)
        if method == "hungarian":
            a = _reference.hungarian(S_host, cap, max_entries=opts["max_entries"])
        elif method == "lp":
            a = _reference.linear_program(S_host, cap, solver=opts["solver"])
        else:
            a = _reference.min_cost_flow(S_host, cap, bits=opts["bits"])
        owner = ops.from_numpy(a, S)
        prices = ops.from_numpy(prices_from_assignment(S_host, cap, a), S)
        iterations = 1
    return _result(ops, S, cap_x, owner, prices, iterations, method)


def _without_closed_experts(ops, S, cap, cap_x, method, options) -> AssignmentResult:
    """Experts of capacity 0 take no token: solve over the others and map back.

    A closed expert e gets the smallest price ``p_e >= 0`` that keeps every row maximum
    of ``S - p`` on an open expert, ``p_e = max(0, max_t (S_te - m_t))`` with
    ``m_t = max over open e' of (S_te' - p_e')``; since ``c_e p_e = 0``, the dual value,
    hence ``gap_bound``, is the sub-problem's.
    """
    open_experts = np.flatnonzero(cap > 0)
    columns = ops.from_numpy(open_experts, S)
    sub = balanced_assignment(S[:, columns], cap[open_experts], method=method, **options)
    S_host = ops.to_numpy(S)
    owner = open_experts[ops.to_numpy(sub.assignment)]
    prices = np.zeros(S_host.shape[1])
    prices[open_experts] = ops.to_numpy(sub.prices)
    best_open = (S_host[:, open_experts] - prices[open_experts]).max(axis=1)
    closed = np.flatnonzero(cap == 0)
    prices[closed] = np.maximum((S_host[:, closed] - best_open[:, None]).max(axis=0), 0.0)
    return _result(
        ops,
        S,
        cap_x,
        ops.from_numpy(owner, S),
        ops.from_numpy(prices, S),
        sub.iterations,
        method,
    )


def _result(ops, S, cap_x, owner, prices, iterations, method) -> AssignmentResult:
    objective = objective_value(ops, S, owner)
    gap = dual_value(ops, S, cap_x, prices) - objective
    return AssignmentResult(
        assignment=owner,
        objective=objective,
        prices=prices,
        gap_bound=max(gap, 0.0),
        iterations=int(iterations),
        method=method,
    )


def _scales(S_host: np.ndarray) -> tuple[float, float]:
    """``(spread, magnitude)``: ``max(S) - min(S)`` and ``sum_t max_e |S_te|``."""
    return float(S_host.max() - S_host.min()), float(np.abs(S_host).max(axis=1).sum())


def _auction_family(ops, S, cap, cap_x, *, exact, tol, eps_start, factor, switch):
    """``auction`` (eps-optimal, on the input's back-end) or ``exact`` (on the host: auction
    phases, then augmenting paths from exactly complementary-slack prices)."""
    for name, value, lo in (("tol", tol, 0.0), ("eps_start", eps_start, 0.0)):
        if not isinstance(value, (int, float)) or not value > lo:
            raise ValueError(f"{name} must be a number > {lo}, got {value!r}")
    if isinstance(switch, bool) or not isinstance(switch, int) or switch < 0:
        raise ValueError(f"switch must be an int >= 0, got {switch!r}")
    if not isinstance(factor, (int, float)) or not factor > 1:
        raise ValueError(f"factor must be a number > 1, got {factor!r}")
    S_host = ops.to_numpy(S)
    T, E = S_host.shape
    spread, magnitude = _scales(S_host)
    if spread == 0.0:  # every score equal: any feasible assignment is optimal
        owner = np.repeat(np.arange(E), cap)[:T]
        return ops.from_numpy(owner, S), ops.full(E, 0.0), 0
    host = NumpyOps()
    if exact:
        first = S_host.argmax(axis=1)
        if (np.bincount(first, minlength=E) <= cap).all():  # the unconstrained optimum fits
            return ops.from_numpy(first, S), ops.full(E, 0.0), 0
    # Start from the column means as prices: removes a per-expert offset (a popular expert)
    # at once. Computed on the host so that every back-end starts from the same numbers.
    p_start = np.zeros(E)
    if int(cap.sum()) == T:
        p_start = S_host.mean(axis=0)
        p_start -= p_start.min()
    # Integer scores tie everywhere: the auction's assignment is often optimal long before
    # its prices are, and the exchange-graph prices of an optimal assignment certify it.
    integral = bool(np.array_equal(S_host, np.rint(S_host)))
    settings = dict(factor=factor, switch=switch, S_host=S_host, cap_host=cap)
    if exact:
        finals = [tol * spread]
        if integral:  # try to certify early, at a coarse epsilon
            finals[:0] = [x * spread for x in (1e-1, 1e-2) if x > tol]
        p, owner, rounds, eps = p_start, None, 0, eps_start * spread
        for i, eps_final in enumerate(finals):
            owner, p, r, _ = auction(
                host,
                S_host,
                cap,
                eps_start=eps,
                eps_final=eps_final,
                complete=False,
                p_start=p,
                owner_start=owner,
                **settings,
            )
            rounds += r
            bad = violators(S_host, p, owner)
            if bad.sum() <= 4 * switch:
                break
            # Many tokens off by less than eps: complete the assignment and try the prices
            # of its exchange graph, exact if it is optimal already.
            trial, p_done, aug = finish(S_host, cap, p, owner.copy(), eps_final)
            rounds += aug
            p_graph = prices_from_assignment(S_host, cap, trial)
            bad = violators(S_host, p_graph, trial)
            if bad.sum() <= 4 * switch or i == len(finals) - 1:
                owner, p = trial, p_graph
                bad_done = violators(S_host, p_done, trial)
                if bad_done.sum() < bad.sum():
                    p, bad = p_done, bad_done
                break
            eps = eps_final / factor
        owner[bad] = -1
        owner, p, aug = finish(S_host, cap, p, owner, 0.0)
        return ops.from_numpy(owner, S), ops.from_numpy(p, S), rounds + aug
    eps_final = tol * magnitude / T
    eps_check = eps_final * factor**2
    if integral:
        eps_check = max(eps_check, 1e-1 * spread)
    owner, p, rounds, _ = auction(
        ops,
        S,
        cap_x,
        eps_start=eps_start * spread,
        eps_final=eps_final,
        tol=tol * magnitude,
        eps_check=eps_check,
        p_start=ops.as_float(p_start),
        graph_prices=integral,
        **settings,
    )
    return owner, p, rounds


def _sinkhorn(ops, S, cap_x, *, temperature, max_iter, tol):
    from solvers._sinkhorn import sinkhorn_potentials, sinkhorn_potentials_numpy

    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}")
    E = S.shape[1]
    on_host = not is_torch(S) or S.device.type == "cpu"
    S_work = ops.to_numpy(S) if on_host else S
    cap_work = ops.to_numpy(cap_x) if on_host else cap_x
    spread = float(S_work.max() - S_work.min()) or 1.0
    # CPU inputs (numpy or torch) run the numpy twin: the same numbers on both paths.
    solve = sinkhorn_potentials_numpy if on_host else sinkhorn_potentials
    g, iterations = solve(S_work, cap_work, tau=temperature * spread, max_iter=max_iter, tol=tol)
    p = -g
    usable = cap_work > 0
    p = p - p[usable].min()
    p[~usable] = spread + 1.0  # an expert without capacity is never worth its price
    p_x = ops.from_numpy(p, S) if on_host else p
    owner, _ = greedy(ops, S - p_x, cap_x)
    prices, _ = duals_for(ops, S, cap_x, owner, [p_x, ops.full(E, 0.0)])
    return owner, prices, iterations

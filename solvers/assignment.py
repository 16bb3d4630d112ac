"""Balanced assignment: tokens to experts under capacities, maximising the total score.

Problem: scores ``S [T, E]``, capacities ``c [E]`` (``sum(c) >= T``)::

    maximise   sum_t S[t, a_t]   over   a in {0..E-1}^T   with   #{t : a_t = e} <= c_e
               and S[t, a_t] > -inf    (a score of -inf is a forbidden pair)

Every method returns an :class:`AssignmentResult` whose ``gap_bound`` is certified by LP
duality: with expert prices ``p`` (``p >= 0`` when ``sum(c) > T``),
``D(p) = sum_t max_e (S[t, e] - p_e) + sum_e c_e p_e >= OPT``, so
``gap_bound = D(p) - objective >= OPT - objective``.

Any finite scores are solved right (one ``-1e300`` among O(1) scores included): the
methods run on row-shifted, outlier-clipped working forms of the scores and the exact
ones repair the clipped part exactly (:mod:`solvers._prepare`). A problem in which some
tokens cannot be placed (their allowed experts lack capacity) is a ValueError naming them
(:mod:`solvers._feasibility`).

Every method is one row of :data:`METHODS` (its solver and its options with defaults and
checks). numpy in, numpy out; torch in, torch out on the same device. Deterministic: the
same input gives the same output, ties included (every tie is broken by the lower token /
expert id, or, for the tied tokens that ``exact`` spreads over their best experts, by a
maximum flow on a graph built in token order).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from solvers import _reference
from solvers._auction import auction, duals_for, greedy
from solvers._coordinate import coordinate_prices, tight_assignment
from solvers._duals import certified_gap, objective_value, prices_from_assignment
from solvers._exact import finish, violators
from solvers._feasibility import check_feasible
from solvers._ops import NumpyOps, ops_for
from solvers._prepare import Working, prepare
from solvers._validate import (
    check_capacity,
    check_scores,
    has_forbidden,
    is_torch,
    require_float,
    require_int,
)

__all__ = ["METHODS", "AssignmentResult", "Method", "balanced_assignment"]


@dataclass(frozen=True, eq=False)
class AssignmentResult:
    """The result of :func:`balanced_assignment`.

    Fields:
        assignment: int64 ``[T]``, the expert of each token (numpy array, or a torch tensor
            on the scores' device).
        objective: ``sum_t S[t, assignment[t]]`` (float, computed in float64; inf when the
            total is beyond float64's range, as with several scores of 1.7e308).
        prices: float64 ``[E]``, the expert prices (dual variables) behind ``gap_bound``.
        gap_bound: ``D(prices) - objective >= OPT - objective >= 0``, a certified bound on
            the optimality gap (0 up to rounding for the exact methods).
        iterations: method-specific work count (auction rounds or coordinate-descent
            sweeps, plus augmenting paths; Sinkhorn sweeps, greedy rounds; 1 for the
            reference solvers).
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


# ---------------------------------------------------------------------------- options
def _positive(name: str, value: Any) -> float:
    return require_float(name, value, above=0.0)


def _above_one(name: str, value: Any) -> float:
    return require_float(name, value, above=1.0)


def _count(name: str, value: Any) -> int:
    return require_int(name, value, 0)


def _optional_count(name: str, value: Any) -> int | None:
    return None if value is None else _count(name, value)


_FEW_EXPERTS = 12
"""``method="exact"`` takes its prices from dual coordinate descent (:mod:`solvers._coordinate`)
up to this many experts: a sweep costs ``O(T E^2)`` against ``O(T E)`` per bidding round,
and with few experts a handful of sweeps replace some 13 rounds and as many paths."""


def _switch(switch: int | None, T: int, most: int) -> int:
    """The auction-to-augmenting-paths switch: given, or ``T // 64`` in ``[8, most]``."""
    return min(max(T // 64, 8), most) if switch is None else switch


def _at_least_one(name: str, value: Any) -> int:
    return require_int(name, value, 1)


def _temperature(name: str, value: Any) -> float:
    # Below 1e-12 (of the score spread) the entropic plan is a hard assignment in float64
    # and exp underflows: method="exact" is the tool then.
    return require_float(name, value, minimum=1e-12)


def _bits(name: str, value: Any) -> int:
    return require_int(name, value, 1, 60)


def _solver_name(name: str, value: Any) -> Any:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{name} must be None or a cvxpy solver name, got {value!r}")
    return value


Option = tuple[Any, Callable[[str, Any], Any]]


@dataclass(frozen=True)
class Method:
    """One method of :func:`balanced_assignment`: ``solve(ops, work, cap, cap_x, **options)
    -> (assignment, prices, iterations)`` on the working forms (:mod:`solvers._prepare`),
    prices in the units of ``work.scaled``; ``options`` maps each option name to its
    default and its check."""

    solve: Callable[..., tuple[Any, Any, int]]
    options: Mapping[str, Option]
    summary: str

    def resolve(self, name: str, given: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults overridden by ``given``, each value checked; unknown names: TypeError."""
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            raise TypeError(
                f"unknown option(s) {unknown} for method={name!r}; "
                f"accepted: {sorted(self.options) or 'none'}"
            )
        return {
            key: check(key, given[key]) if key in given else default
            for key, (default, check) in self.options.items()
        }


# ---------------------------------------------------------------------------- public API
def balanced_assignment(
    scores: Any, capacity: Any = None, method: str = "exact", **options: Any
) -> AssignmentResult:
    """Assign every token to one expert, expert e taking at most ``capacity[e]`` tokens,
    maximising the total score.

    Args:
        scores: ``[T, E]`` numpy array or torch tensor (float of any precision, or integer).
            Any finite value; ``-inf`` marks a forbidden pair (e.g. device-limited routing,
            masked experts); NaN and ``+inf`` are refused. Computations run in float64.
        capacity: None for an even split (``T // E`` each, the first ``T % E`` experts one
            more), an int for every expert, or an int vector ``[E]``; ``sum >= T``.
        method: a key of :data:`METHODS`: ``"exact"`` (default; optimal: prices from dual
            coordinate descent for at most 12 experts, else from auction phases; integer
            scores first try zero prices with their ties spread by a maximum flow; then
            shortest augmenting paths on the E-node exchange graph), ``"auction"``
            (epsilon-scaled auction, within ``tol``; runs in torch on the input's device or
            in numpy), ``"sinkhorn"`` (log-domain entropic OT, rounded to the capacities
            by greedy), ``"greedy"`` (capacity-aware greedy by descending score), or a
            reference back-end: ``"hungarian"`` (scipy on repeated columns), ``"lp"``
            (cvxpy), ``"mincostflow"`` (networkx).
        options: per method.
            auction: ``tol`` (stop once ``gap_bound <= tol * M``, 1e-6, where
            ``M = sum_t min(max_e |S_te|, range_t)``, ``range_t`` the row's score range, both
            over the scores within the outlier window of :mod:`solvers._prepare`: at most
            ``sum_t max_e |S_te|``, and neither a -1e300 outlier nor a row offset of 1e300
            makes the tolerance meaningless for the other tokens), ``eps_start`` (first epsilon,
            relative to the score spread, 1/32), ``factor`` (epsilon divisor per phase, 8),
            ``switch`` (free tokens at which a phase's tail is handed to augmenting paths;
            default ``T // 64`` clamped to [8, 32]: below a thousand tokens a bidding
            round is cheaper than an augmenting path, above it the tail is long).
            exact: the same for its auction phase (more than 12 experts), except ``tol``
            (its last epsilon relative to the score spread, 1e-6; it only trades auction
            time against augmenting paths, the result is optimal either way),
            ``eps_start`` 1/128, ``switch`` ``T // 64`` clamped to [8, 64] (also, times 4,
            the most tokens the zero-price start of integer scores may leave to paths).
            sinkhorn: ``temperature`` (relative to the score spread, >= 1e-12, 1e-2),
            ``max_iter`` (200), ``tol`` (column-marginal error per token, 1e-4).
            hungarian: ``max_entries`` (5e7). lp: ``solver`` (cvxpy solver name).
            mincostflow: ``bits`` (integer cost resolution, 1..60, 40).

    Returns:
        :class:`AssignmentResult`.

    Raises:
        TypeError: scores / capacity of the wrong type or dtype, unknown options.
        ValueError: wrong shapes, NaN / +inf scores, negative or insufficient capacity,
            an infeasible problem (the message names the tokens that cannot be placed),
            unknown method, option values out of range, a hungarian matrix above
            ``max_entries``.
    """
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}")
    entry = METHODS[method]
    opts = entry.resolve(method, options)
    S = check_scores(scores)
    T, E = S.shape
    cap = check_capacity(capacity, T, E)
    ops = ops_for(S)
    cap_x = ops.as_int(cap)
    forbidden = bool(T) and has_forbidden(ops, S)
    if forbidden:
        check_feasible(~np.isneginf(ops.to_numpy(S)), cap)
    if T == 0 or E == 1:
        return _result(ops, S, cap_x, ops.full_int(T, 0), ops.full(E, 0.0), 0, method)
    if not (cap > 0).all():
        return _without_closed_experts(ops, S, cap, cap_x, method, options)
    work = prepare(ops, S, forbidden)
    owner, prices, iterations = entry.solve(ops, work, cap, cap_x, **opts)
    if work.exponent:
        prices = prices * work.to_score_units(1.0)
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
    with np.errstate(over="ignore"):  # 1.7e308 - -1.7e308: the price is capped below
        lift = (S_host[:, closed] - best_open[:, None]).max(axis=0)
    # (p_e = +inf would be exact, c_e p_e being 0; a finite cap keeps the certificate finite)
    prices[closed] = np.clip(lift, 0.0, np.finfo(np.float64).max)
    return _result(
        ops, S, cap_x, ops.from_numpy(owner, S), ops.from_numpy(prices, S), sub.iterations, method
    )


def _result(ops, S, cap_x, owner, prices, iterations, method) -> AssignmentResult:
    return AssignmentResult(
        assignment=owner,
        objective=objective_value(ops, S, owner),
        prices=prices,
        gap_bound=max(certified_gap(ops, S, cap_x, owner, prices), 0.0),
        iterations=int(iterations),
        method=method,
    )


# ---------------------------------------------------------------------------- methods
def _repair_exactly(W: np.ndarray, cap: np.ndarray, p: np.ndarray, owner: np.ndarray):
    """Make ``owner`` optimal for ``W`` (host arrays): free the tokens that are not
    complementary-slack for ``p`` and insert them by shortest augmenting paths."""
    owner = owner.copy()
    owner[violators(W, p, owner)] = -1
    return finish(W, cap, p, owner, 0.0)


def _place_left_over(W: np.ndarray, cap: np.ndarray, owner: np.ndarray) -> tuple[np.ndarray, int]:
    """Place the free tokens (``-1``) of a heuristic assignment by augmenting paths (only
    needed with forbidden pairs, where greedy can get stuck); the others keep their expert
    unless a path moves them."""
    if not (owner < 0).any():
        return owner, 0
    placed, _, paths = finish(W, cap, np.zeros(W.shape[1]), owner.copy(), np.inf)
    return placed, paths


def _solve_exact(ops, work: Working, cap, cap_x, *, tol, eps_start, factor, switch):
    """On the host: prices (coordinate descent for few experts, auction phases otherwise)
    on the clipped scores, shortest augmenting paths from exactly complementary-slack
    prices, then the exact repair of whatever clipping changed."""
    C = ops.to_numpy(work.clipped)
    T, E = C.shape
    switch = _switch(switch, T, 64)
    zeros = np.zeros(E)
    owner: np.ndarray | None = None
    if work.spread == 0.0:  # every score equal: any feasible assignment is optimal
        owner = np.repeat(np.arange(E), cap)[:T]
        return ops.from_numpy(owner, work.scaled), ops.full(E, 0.0), 0
    first = C.argmax(axis=1)  # the same as the argmax of the unclipped scores
    if (np.bincount(first, minlength=E) <= cap).all():  # the unconstrained optimum fits
        return ops.from_numpy(first, work.scaled), ops.full(E, 0.0), 0
    few = E <= _FEW_EXPERTS
    if work.integral:
        # Integer scores tie everywhere: the row maxima (ties included) often admit an
        # assignment within the capacities (optimal, certified by zero prices) or, with
        # many experts, miss one by a few tokens, which augmenting paths from zero prices
        # then place (with few, coordinate descent gets closer first, and cheaply).
        owner = tight_assignment(C, cap, zeros, most_left=0 if few else 4 * switch)
    if owner is not None:
        p, rounds = zeros, 0
    elif few:
        p, rounds = coordinate_prices(C, cap, _start_prices(C, cap), max_sweeps=8, enough=2)
        owner = tight_assignment(C, cap, p)
    else:
        owner, p, rounds = _auction_prices(C, cap, work, tol, eps_start, factor, switch)
    assert owner is not None  # every branch above sets it
    owner, p, aug = finish(C, cap, p, owner, 0.0)
    rounds += aug
    if work.clipped_any:
        owner, p, aug = _repair_exactly(ops.to_numpy(work.shifted), cap, p, owner)
        rounds += aug
    return ops.from_numpy(owner, work.scaled), ops.from_numpy(p, work.scaled), rounds


def _auction_prices(C, cap, work: Working, tol, eps_start, factor, switch):
    """Auction phases on the clipped scores ``C [T, E]`` (host) down to ``tol * spread``:
    returns ``(owner, prices, rounds)`` with the tokens that are not exactly
    complementary-slack for the prices freed (``-1``), ready for :func:`finish`."""
    spread = work.spread
    settings = dict(factor=factor, switch=switch, S_host=C, cap_host=cap)
    host = NumpyOps()
    # Integer scores tie everywhere: the auction's assignment is often optimal long before
    # its prices are, and the exchange-graph prices of an optimal assignment certify it.
    finals = [tol * spread]
    if work.integral:  # try to certify early, at a coarse epsilon
        finals[:0] = [x * spread for x in (1e-1, 1e-2) if x > tol]
    p, owner, rounds, eps = _start_prices(C, cap), None, 0, eps_start * spread
    for i, eps_final in enumerate(finals):
        owner, p, r, _ = auction(
            host,
            C,
            cap,
            eps_start=eps,
            eps_final=eps_final,
            complete=False,
            p_start=p,
            owner_start=owner,
            **settings,
        )
        rounds += r
        bad = violators(C, p, owner)
        if bad.sum() <= 4 * switch:
            break
        # Many tokens off by less than eps: complete the assignment and try the prices
        # of its exchange graph, exact if it is optimal already.
        trial, p_done, aug = finish(C, cap, p, owner.copy(), eps_final)
        rounds += aug
        p_graph = prices_from_assignment(C, cap, trial)
        bad = violators(C, p_graph, trial)
        if bad.sum() <= 4 * switch or i == len(finals) - 1:
            owner, p = trial, p_graph
            bad_done = violators(C, p_done, trial)
            if bad_done.sum() < bad.sum():
                p, bad = p_done, bad_done
            break
        eps = eps_final / factor
    assert owner is not None  # finals is never empty: the loop ran
    owner[bad] = -1
    return owner, p, rounds


def _start_prices(C: np.ndarray, cap: np.ndarray) -> np.ndarray:
    """The column means as first prices when every expert must be full: removes a
    per-expert offset (a popular expert) at once. On the host, so that every back-end starts
    from the same numbers."""
    if int(cap.sum()) != C.shape[0]:
        return np.zeros(C.shape[1])
    p = C.mean(axis=0)
    return p - p.min()


def _solve_auction(ops, work: Working, cap, cap_x, *, tol, eps_start, factor, switch):
    """The eps-scaled auction on the clipped scores, on the input's back-end; clipped
    entries in use are re-placed (augmenting paths), exactly if the tolerance needs it."""
    C = work.clipped
    C_host = ops.to_numpy(C)
    T, E = C_host.shape
    switch = _switch(switch, T, 32)
    if work.spread == 0.0:
        owner = np.repeat(np.arange(E), cap)[:T]
        return ops.from_numpy(owner, work.scaled), ops.full(E, 0.0), 0
    target = tol * work.magnitude
    eps_final = target / T
    eps_check = eps_final * factor**2
    if work.integral:
        eps_check = max(eps_check, 1e-1 * work.spread)
    owner, p, rounds, _ = auction(
        ops,
        C,
        cap_x,
        eps_start=eps_start * work.spread,
        eps_final=eps_final,
        tol=target,
        eps_check=eps_check,
        p_start=ops.as_float(_start_prices(C_host, cap)),
        graph_prices=work.integral,
        factor=factor,
        switch=switch,
        S_host=C_host,
        cap_host=cap,
    )
    if not work.clipped_any:
        return owner, p, rounds
    W = ops.to_numpy(work.shifted)
    own, p_host = ops.to_numpy(owner).copy(), ops.to_numpy(p).copy()
    rows = np.arange(T)
    v = W - p_host
    slack = v.max(axis=1) - v[rows, own]
    own[W[rows, own] < C_host[rows, own]] = -1  # the tokens sitting on clipped entries
    delta = float(slack[own >= 0].max(initial=0.0))
    own, p_host, aug = finish(W, cap, p_host, own, delta)
    rounds += aug
    if certified_gap(NumpyOps(), W, cap, own, p_host) > target:
        own, p_host, aug = _repair_exactly(W, cap, p_host, own)
        rounds += aug
    return ops.from_numpy(own, work.scaled), ops.from_numpy(p_host, work.scaled), rounds


def _greedy_placing_all(ops, work: Working, cap, cap_x, values):
    """Capacity-aware greedy on ``values [T, E]``; with forbidden pairs, the tokens it
    leaves stuck are placed by augmenting paths. Returns ``(assignment, rounds)``."""
    owner, rounds = greedy(ops, values, cap_x)
    if work.forbidden:
        W = ops.to_numpy(work.shifted)
        own, paths = _place_left_over(W, cap, ops.to_numpy(owner).copy())
        owner, rounds = ops.from_numpy(own, work.scaled), rounds + paths
    return owner, rounds


def _solve_greedy(ops, work: Working, cap, cap_x):
    """Greedy by descending score, certified by the better of zero prices and the
    exchange-graph prices of its assignment."""
    owner, rounds = _greedy_placing_all(ops, work, cap, cap_x, work.scaled)
    W = ops.to_numpy(work.shifted)
    p_graph = ops.from_numpy(prices_from_assignment(W, cap, ops.to_numpy(owner)), work.scaled)
    candidates = [ops.full(W.shape[1], 0.0), p_graph]
    prices, _ = duals_for(ops, work.shifted, cap_x, owner, candidates)
    return owner, prices, rounds


def _solve_sinkhorn(ops, work: Working, cap, cap_x, *, temperature, max_iter, tol):
    from solvers._sinkhorn import sinkhorn_potentials, sinkhorn_potentials_numpy

    C = work.clipped
    E = C.shape[1]
    on_host = not is_torch(C) or C.device.type == "cpu"
    C_work = ops.to_numpy(C) if on_host else C
    cap_work = cap if on_host else cap_x
    spread = work.spread or 1.0
    # CPU inputs (numpy or torch) run the numpy twin: the same numbers on both paths.
    solve = sinkhorn_potentials_numpy if on_host else sinkhorn_potentials
    g, iterations = solve(C_work, cap_work, tau=temperature * spread, max_iter=max_iter, tol=tol)
    p = -g
    p = p - p.min()
    p_x = ops.from_numpy(p, work.scaled) if on_host else p
    owner, _ = _greedy_placing_all(ops, work, cap, cap_x, work.shifted - p_x)
    prices, _ = duals_for(ops, work.shifted, cap_x, owner, [p_x, ops.full(E, 0.0)])
    return owner, prices, iterations


def _reference_solver(solve: Callable[..., np.ndarray]) -> Callable[..., tuple[Any, Any, int]]:
    """A reference back-end (host, on the row-shifted scores) as a :class:`Method` solver."""

    def run(ops, work: Working, cap, cap_x, **options):
        W = ops.to_numpy(work.shifted)
        a = solve(W, cap, **options)
        prices = prices_from_assignment(W, cap, a)
        return ops.from_numpy(a, work.scaled), ops.from_numpy(prices, work.scaled), 1

    return run


_AUCTION_FAMILY = {"factor": (8.0, _above_one)}

METHODS: dict[str, Method] = {
    "exact": Method(
        _solve_exact,
        {
            "tol": (1e-6, _positive),
            "eps_start": (1 / 128, _positive),
            **_AUCTION_FAMILY,
            "switch": (None, _optional_count),
        },
        "optimal: coordinate-descent or auction prices, then shortest augmenting paths (host)",
    ),
    "auction": Method(
        _solve_auction,
        {
            "tol": (1e-6, _positive),
            "eps_start": (1 / 32, _positive),
            **_AUCTION_FAMILY,
            "switch": (None, _optional_count),
        },
        "epsilon-scaled auction within tol (numpy or torch on the input's device)",
    ),
    "sinkhorn": Method(
        _solve_sinkhorn,
        {
            "temperature": (1e-2, _temperature),
            "max_iter": (200, _at_least_one),
            "tol": (1e-4, _positive),
        },
        "log-domain entropic OT, rounded by greedy",
    ),
    "greedy": Method(_solve_greedy, {}, "capacity-aware greedy by descending score"),
    "hungarian": Method(
        _reference_solver(_reference.hungarian),
        {"max_entries": (50_000_000, _at_least_one)},
        "reference: scipy linear_sum_assignment on repeated columns",
    ),
    "lp": Method(
        _reference_solver(_reference.linear_program),
        {"solver": (None, _solver_name)},
        "reference: the transportation LP in cvxpy",
    ),
    "mincostflow": Method(
        _reference_solver(_reference.min_cost_flow),
        {"bits": (40, _bits)},
        "reference: networkx network simplex on integer costs",
    ),
}
"""Every method of :func:`balanced_assignment`, by name: adding one is adding a row."""

"""Prices by exact dual coordinate descent, and the assignment on the tight graph of prices.

For few experts (small E) the E-variable dual of balanced assignment (:mod:`solvers._duals`)
::

    D(p) = sum_t max_e (S[t, e] - p_e) + sum_e c_e p_e

is cheap to minimise one coordinate at a time (Gauss-Seidel): with the other prices fixed,
``D`` is piecewise linear in ``p_e`` with slope ``c_e - #{t : d_t > p_e}``, where
``d_t = S[t, e] - max_{f != e} (S[t, f] - p_f)`` is what token t gains by choosing e at
price 0 over its best alternative. So any ``p_e`` between the ``(c_e + 1)``-th and the
``c_e``-th largest ``d_t`` is a minimiser (one ``np.partition``); the midpoint is taken,
and with spare capacity (``sum(c) > T``, where the dual needs ``p >= 0``) at least 0. A few
sweeps over the experts bring Gaussian-like scores at (1024, 8) to the optimal prices or a
handful of conflicts; coordinate descent can stall on a non-smooth D short of the optimum,
so what is left is always finished exactly by shortest augmenting paths
(:func:`solvers._exact.finish`).

Given prices p, :func:`tight_assignment` assigns every token it can to a *tight* expert
(one of its row maxima of ``S - p``): a token with one tight expert (forced) takes it
unless the expert is over-full (then the largest margins over the second-best value stay),
the tied tokens are spread over their tight experts by one maximum flow on the graph
source -> tie pattern -> expert -> sink (:class:`solvers._feasibility.PatternFlow`). Every
assigned token is then complementary-slack for p, which is what ``finish`` needs; when p is
optimal the flow places every token (LP duality: an optimal assignment uses tight pairs
only), which is how integer scores, tied everywhere, are solved without bidding.

Shapes: ``S [T, E]`` float64 (finite: the clipped working form), ``cap [E]`` int64 (every
entry >= 1, ``sum(cap) >= T``), ``p [E]`` float64.
"""

from __future__ import annotations

import numpy as np

from solvers._auction import keep_best
from solvers._feasibility import PatternFlow
from solvers._ops import NumpyOps

__all__ = ["coordinate_prices", "tight_assignment"]


def coordinate_prices(
    S: np.ndarray, cap: np.ndarray, p: np.ndarray, *, max_sweeps: int, enough: int
) -> tuple[np.ndarray, int]:
    """Gauss-Seidel sweeps of exact coordinate descent on ``D(p)`` (module doc) from ``p``.

    Stops after ``max_sweeps`` sweeps, when a sweep changes no price (a fixed point), or
    when the tokens' first row maxima of ``S - p`` overfill the experts by at most
    ``enough`` tokens in total. Returns ``(prices, sweeps)``.
    """
    T, E = S.shape
    spare = int(cap.sum()) > T
    lower = T - cap - 1  # index of the (c_e + 1)-th largest in ascending order; -1: none
    S_rows = np.ascontiguousarray(S.T)  # [E, T]: one expert's column is one contiguous row
    v = S_rows - p[:, None]  # [E, T], S - p transposed
    p = p.copy()
    sweeps = 0
    while sweeps < max_sweeps:
        sweeps += 1
        before = p.copy()
        for e in range(E):
            v[e] = -np.inf
            gain = S_rows[e] - v.max(axis=0)  # d_t [T]
            k = int(lower[e])
            if k >= 0:
                part = np.partition(gain, (k, k + 1))
                price = 0.5 * (part[k] + part[k + 1])
            else:  # room for every token: the slope is >= 0 everywhere
                price = -np.inf
            p[e] = max(price, 0.0) if spare else price
            np.subtract(S_rows[e], p[e], out=v[e])
        load = np.bincount(v.argmax(axis=0), minlength=E)
        if np.maximum(load - cap, 0).sum() <= enough or np.array_equal(before, p):
            break
    return p, sweeps


def tight_assignment(
    S: np.ndarray, cap: np.ndarray, p: np.ndarray, most_left: int | None = None
) -> np.ndarray | None:
    """int64 ``[T]``: each token on a tight expert of ``S - p`` (a row maximum) within the
    capacities, ``-1`` for the tokens left over (module doc).

    With ``most_left``, None instead when more than that many tokens would be left over
    (checked on the lower bounds ``max(forced excess, unfillable slots)`` before the flow is
    built, where ``unfillable = sum_e max(c_e - #{t : e tight for t}, 0)`` when
    ``sum(c) == T``). Deterministic: forced tokens tie on their margin by lower token id,
    the flow is Dinic's on a graph built in token order.
    """
    T, E = S.shape
    v = S - p
    j1, best, second = NumpyOps().top2(v)  # v[t, j1[t]] is -inf now
    forced = np.flatnonzero(second < best)  # one tight expert
    tied = np.flatnonzero(second == best)
    tight = (v == best[:, None])[tied]  # [n_tied, E], the row maxima of the tied tokens
    tight[np.arange(tied.size), j1[tied]] = True
    load = np.bincount(j1[forced], minlength=E)  # of the forced tokens
    if most_left is not None:
        excess = int(np.maximum(load - cap, 0).sum())
        unfillable = 0
        if int(cap.sum()) == T:
            unfillable = int(np.maximum(cap - load - tight.sum(axis=0), 0).sum())
        if max(excess, unfillable) > most_left:
            return None
    owner = np.full(T, -1, dtype=np.int64)
    if (load <= cap).all():
        owner[forced] = j1[forced]
    else:  # an over-full expert keeps its largest margins
        margin = best[forced] - second[forced]
        tok, exp, _, keep, _ = keep_best(NumpyOps(), forced, j1[forced], margin, cap, True)
        owner[tok[keep]] = exp[keep]
        load = np.bincount(exp[keep], minlength=E)
    room = cap - load
    if tied.size and room.any():
        owner[tied] = PatternFlow(tight, room).assignment()
    if most_left is not None and int((owner < 0).sum()) > most_left:
        return None
    return owner

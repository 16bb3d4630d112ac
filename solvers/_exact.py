"""Exact balanced assignment for E << T: auction prices, then shortest augmenting paths on the
E-node exchange graph.

Complementary slackness (CS): token t assigned to a is CS for prices p when
``S[t, a] - p_a >= max_e (S[t, e] - p_e) - delta``. With ``delta = 0`` and every expert
exactly full (spare capacity is filled by ``K = sum(c) - T`` zero-score *dummy* tokens,
which may only sit at the cheapest experts), CS certifies optimality.

:func:`finish` inserts the free tokens (and dummies) one at a time by successive shortest
paths (Hungarian / SSP). The graph has one node per expert: the arc ``e -> f`` moves the
best candidate token of e to f at reduced cost
``R[e, f] = min_{t in e} (S[t, e] - S[t, f]) - p_e + p_f >= -delta`` (clamped at 0), a free
token s enters expert f at ``max_g (S[s, g] - p_g) - (S[s, f] - p_f)``. Shortest distances
are min-plus (Bellman-Ford) sweeps over the dense ``[E, E]`` matrix; the prices then rise
by ``max(D - dist_e, 0)`` (D the distance of the free slot reached), which keeps every
assigned token delta-CS and makes the path tight, and the tokens shift along the path. Each
insertion costs O(E^2) plus O(|tokens of the experts on the path| * E) to refresh their
rows of the exchange matrix; no ``T x T`` (or ``T x sum(c)``) matrix is ever built.
"""

from __future__ import annotations

import numpy as np

from solvers._duals import exchange_costs

__all__ = ["finish", "unassign_violators"]


def unassign_violators(S: np.ndarray, p: np.ndarray, owner: np.ndarray, delta: float) -> int:
    """Free every assigned token that is not delta-CS for prices p; returns how many."""
    v = S - p
    best = v.max(axis=1)
    rows = np.arange(S.shape[0])
    bad = (owner >= 0) & (v[rows, np.maximum(owner, 0)] < best - delta)
    owner[bad] = -1
    return int(bad.sum())


def _refresh_row(S, owner, kd, M, W, e):
    idx = np.flatnonzero(owner == e)
    if idx.size:
        diff = S[idx, e][:, None] - S[idx]
        arg = diff.argmin(axis=0)
        M[e] = diff[arg, np.arange(S.shape[1])]
        W[e] = idx[arg]
    else:
        M[e] = np.inf
        W[e] = -1
    if kd[e] > 0:
        lower = M[e] > 0
        M[e, lower] = 0.0
        W[e, lower] = -1
    M[e, e] = np.inf


def finish(
    S: np.ndarray, cap: np.ndarray, p: np.ndarray, owner: np.ndarray, delta: float = 0.0
) -> tuple[np.ndarray, np.ndarray, int]:
    """Assign every free token (``owner == -1``) by shortest augmenting paths.

    Every assigned token must be delta-CS for ``p`` on entry; it stays so, and the result
    is a complete assignment meeting the capacities in which every token is delta-CS (so
    ``D(p) - objective <= T * delta``; with ``delta = 0`` it is optimal). Returns
    ``(owner, prices, augmentations)``; ``owner`` is modified in place. Prices are shifted
    to ``min(p) = 0``.
    """
    T, E = S.shape
    p = np.array(p, dtype=np.float64)
    load = np.bincount(owner[owner >= 0], minlength=E)
    dummies = int(cap.sum()) - T
    kd = np.zeros(E, dtype=np.int64)  # dummies placed per expert
    if dummies:
        slack = cap - load
        cheap = np.flatnonzero(p <= p.min() + delta)
        for e in cheap:  # deterministic: lowest expert first
            take = min(int(slack[e]), dummies - int(kd.sum()))
            kd[e] = take
    free_dummies = dummies - int(kd.sum())
    free = np.flatnonzero(owner < 0)
    if free.size == 0 and free_dummies == 0:
        return owner, p - p.min(), 0
    # the exchange matrix of the assigned tokens (free ones excluded)
    assigned = owner >= 0
    M = np.full((E, E), np.inf)
    W = np.full((E, E), -1, dtype=np.int64)
    if assigned.any():
        idx = np.flatnonzero(assigned)
        Ms, Ws = exchange_costs(S[idx], None, owner[idx])
        present = np.bincount(owner[idx], minlength=E) > 0
        M[present] = Ms[present]
        W[present] = np.where(Ws[present] >= 0, idx[np.maximum(Ws[present], 0)], -1)
    for e in np.flatnonzero(kd > 0):
        lower = M[e] > 0
        M[e, lower] = 0.0
        W[e, lower] = -1
    np.fill_diagonal(M, np.inf)
    cols = np.arange(E)
    augmentations = 0
    while free.size or free_dummies:
        augmentations += 1
        # distances from the free tokens / dummies into each expert
        if free.size:
            v = S[free] - p
            enter = v.max(axis=1)[:, None] - v  # [F, E] >= 0
            src_row = enter.argmin(axis=0)
            dist = enter[src_row, cols]
            src = free[src_row]
        else:
            dist = np.full(E, np.inf)
            src = np.full(E, -1, dtype=np.int64)
        if free_dummies:
            dd = p - p.min()
            use = dd < dist
            dist = np.where(use, dd, dist)
            src = np.where(use, -1, src)
        dist = np.maximum(dist, 0.0)
        R = np.maximum(M - p[:, None] + p[None, :], 0.0)
        pred = np.full(E, -1, dtype=np.int64)
        for _ in range(E):
            cand = dist[:, None] + R
            arg = cand.argmin(axis=0)
            best = cand[arg, cols]
            better = best < dist
            if not better.any():
                break
            dist = np.where(better, best, dist)
            pred = np.where(better, arg, pred)
        slots = cap - load - kd
        open_ = np.flatnonzero(slots > 0)
        target = open_[np.argmin(dist[open_])]
        D = dist[target]
        p += np.maximum(D - dist, 0.0)
        # walk back from the target to the entry expert, then shift tokens forward
        path = [int(target)]
        while pred[path[-1]] >= 0:
            path.append(int(pred[path[-1]]))
        path.reverse()
        moves = [(path[i], path[i + 1], int(W[path[i], path[i + 1]])) for i in range(len(path) - 1)]
        for a, b, t in moves:
            if t >= 0:
                owner[t] = b
            else:
                kd[a] -= 1
                kd[b] += 1
        entry = path[0]
        s = int(src[entry])
        if s >= 0:
            owner[s] = entry
            free = free[free != s]
            load[entry] += 1
        else:
            kd[entry] += 1
            free_dummies -= 1
        for a, b, t in moves:
            if t >= 0:
                load[a] -= 1
                load[b] += 1
        for e in set(path):
            _refresh_row(S, owner, kd, M, W, e)
    return owner, p - p.min(), augmentations

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

import itertools

import numpy as np

from solvers._ops import row_max

__all__ = ["finish", "violators"]

_ONE_PASS_ENTRIES = 1 << 18  # below this many entries a [T, E] temporary is cheap


def violators(S: np.ndarray, p: np.ndarray, owner: np.ndarray, delta: float = 0.0) -> np.ndarray:
    """bool ``[T]``: the assigned tokens that are not delta-CS for prices p."""
    v = S - p
    mine = v[np.arange(S.shape[0]), np.maximum(owner, 0)]
    return (owner >= 0) & (mine < row_max(v) - delta)


class _Exchange:
    """The exchange graph of the assigned tokens: sorted member lists and ``M [E, E]``."""

    def __init__(self, S: np.ndarray, owner: np.ndarray) -> None:
        E = S.shape[1]
        self.S = S
        assigned = np.flatnonzero(owner >= 0)
        order = assigned[np.argsort(owner[assigned], kind="stable")]
        bounds = np.searchsorted(owner[order], np.arange(E + 1))
        self.members = [order[bounds[e] : bounds[e + 1]] for e in range(E)]
        self.M = np.full((E, E), np.inf)
        if order.size * E <= _ONE_PASS_ENTRIES:  # small: one vectorised pass, few calls
            rows = S[order]
            rows = rows[np.arange(order.size), owner[order]][:, None] - rows
            filled = np.flatnonzero(bounds[1:] > bounds[:-1])
            self.M[filled] = np.minimum.reduceat(rows, bounds[filled], axis=0)
            np.fill_diagonal(self.M, np.inf)
        else:
            for e in range(E):  # E small blocks: cheaper than one [T, E] copy
                self.refresh(e)

    def refresh(self, e: int) -> None:
        idx = self.members[e]
        if idx.size:
            rows = self.S[idx]
            np.subtract(rows[:, e : e + 1], rows, out=rows)
            self.M[e] = rows.min(axis=0)
        else:
            self.M[e] = np.inf
        self.M[e, e] = np.inf

    def best_token(self, a: int, b: int) -> int:
        idx = self.members[a]
        return int(idx[np.argmin(self.S[idx, a] - self.S[idx, b])])

    def move(self, t: int, a: int, b: int) -> None:
        # slices and concatenate: np.delete / np.insert cost several times more
        if a >= 0:
            m = self.members[a]
            i = int(np.searchsorted(m, t))
            self.members[a] = np.concatenate((m[:i], m[i + 1 :]))
        m = self.members[b]
        i = int(np.searchsorted(m, t))
        self.members[b] = np.concatenate((m[:i], np.array([t], dtype=m.dtype), m[i:]))


def _disjoint_paths(
    targets: np.ndarray, dist: np.ndarray, pred: np.ndarray, src: np.ndarray, first_only: bool
) -> list[list[int]]:
    """Shortest paths (entry expert first) to ``targets`` in order, keeping each one that
    shares no expert and no entering token with those kept before (only the first one with
    ``first_only``). Unreachable targets (infinite distance) end the search."""
    paths: list[list[int]] = []
    used: set[int] = set()
    sources: set[int] = set()
    if not targets.size or not np.isfinite(dist[targets[0]]):
        # Only forbidden pairs lead on: callers check feasibility first (solvers._feasibility).
        raise ValueError("infeasible: no augmenting path reaches an expert with room left")
    for target in targets.tolist():
        if paths and (first_only or not np.isfinite(dist[target])):
            break
        path = [target]
        while pred[path[-1]] >= 0:
            path.append(int(pred[path[-1]]))
        path.reverse()
        s = int(src[path[0]])
        if used.isdisjoint(path) and (s < 0 or s not in sources):
            paths.append(path)
            used.update(path)
            sources.add(s)
    return paths


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
        for e in np.flatnonzero(p <= p.min() + delta):  # deterministic: lowest expert first
            kd[e] = min(int(slack[e]), dummies - int(kd.sum()))
    free_dummies = dummies - int(kd.sum())
    free = np.flatnonzero(owner < 0)
    if free.size == 0 and free_dummies == 0:
        return owner, p - p.min(), 0
    graph = _Exchange(S, owner)
    cols = np.arange(E)
    augmentations = 0
    while free.size or free_dummies:
        augmentations += 1
        # distances from the free tokens / dummies into each expert
        if free.size:
            v = S[free] - p
            enter = row_max(v)[:, None] - v  # [F, E] >= 0
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
        M = graph.M
        if dummies:
            M = np.where((kd > 0)[:, None], np.minimum(M, 0.0), M)
            np.fill_diagonal(M, np.inf)
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
        open_ = np.flatnonzero(cap - load - kd > 0)
        open_ = open_[np.argsort(dist[open_], kind="stable")]  # nearest first, lower id on ties
        paths = _disjoint_paths(open_, dist, pred, src, first_only=bool(dummies))
        # Potentials min(dist, D) stay feasible for any D, and every path ending at or below
        # D is tight under them: the expert-disjoint paths (distinct entering tokens) are
        # augmented together, as they touch disjoint rows of the exchange graph.
        p += np.maximum(dist[paths[-1][-1]] - dist, 0.0)
        for path in paths:
            if len(paths) > 1:
                augmentations += 1
            moves = []
            for a, b in itertools.pairwise(path):
                use_dummy = kd[a] > 0 and not (graph.M[a, b] < 0.0)
                moves.append((a, b, -1 if use_dummy else graph.best_token(a, b)))
            for a, b, t in moves:
                if t >= 0:
                    owner[t] = b
                    graph.move(t, a, b)
                else:
                    kd[a] -= 1
                    kd[b] += 1
                load[a] -= t >= 0
                load[b] += t >= 0
            entry = path[0]
            s = int(src[entry])
            if s >= 0:
                owner[s] = entry
                graph.move(s, -1, entry)
                free = free[free != s]
                load[entry] += 1
            else:
                kd[entry] += 1
                free_dummies -= 1
            for touched in set(path):
                graph.refresh(touched)
        if len(paths) > 1:
            augmentations -= 1
    return owner, p - p.min(), augmentations

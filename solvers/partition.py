"""Balanced partition (multiway number partitioning / makespan scheduling).

Given non-negative item weights ``w [n]`` and ``m`` bins, find an assignment
``a [n] -> {0..m-1}`` that minimises the largest bin load
``max_b sum_{i: a_i = b} w_i``. NP-hard in general; :func:`balanced_partition` runs

1. two greedy starts, keeping the better one (smaller max load):
   - **LPT** (longest processing time first, Graham 1969): items by weight
     descending, each to the currently least-loaded bin; max load at most
     ``(4/3 - 1/(3m)) * OPT``;
   - **plain greedy** (list scheduling): items in input order, each to the
     least-loaded bin; max load at most ``(2 - 1/m) * OPT``;
2. a local-improvement pass: while possible, move one item out of a most-loaded bin
   into another bin, or swap an item of a most-loaded bin with a lighter item of
   another bin, when that lowers the most-loaded bin without raising the other bin
   to its old level (each move strictly decreases ``(max load, number of bins at
   max load)`` in lexicographic order, so it terminates).

So the result is never worse than plain greedy or LPT (the property tests compare
it with both and with brute force on tiny cases). Ties everywhere go to the lowest
bin index, so the result is deterministic.

Input: numpy array, torch tensor (any device; computed on the host) or a sequence.
Output arrays follow the input: torch in, torch out on the same device; numpy
otherwise.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

import numpy as np

from solvers._validate import as_real_numpy, like_source, require_int

__all__ = ["PartitionResult", "balanced_partition", "greedy_partition", "improve_partition"]


@dataclass
class PartitionResult:
    """The result of :func:`balanced_partition`.

    Fields:
        assignment: int64 ``[n]``, the bin of each item (numpy or torch, as the input).
        loads: float64 ``[bins]``, the total weight in each bin (numpy or torch).
        max_load: the largest bin load.
        mean_load: ``sum(w) / bins``.
        lower_bound: ``max(mean_load, max(w))``; no partition has a smaller max load.
        imbalance: ``max_load / mean_load`` (1.0 is perfect; 1.0 when all weights are 0).
        iterations: the number of improving moves/swaps made by the local pass.
        method: the start the local pass improved (``"lpt"`` or ``"greedy"``), with
            ``"+local"`` appended when local improvement was on.
    """

    assignment: Any
    loads: Any
    max_load: float
    mean_load: float
    lower_bound: float
    imbalance: float
    iterations: int
    method: str


def _as_weights(weights: object) -> tuple[np.ndarray, Any]:
    """Weights as float64 numpy ``[n]`` plus the torch tensor they came from (or None)."""
    return as_real_numpy("weights", weights, 1, "[n]", nonnegative=True)


def _greedy(w: np.ndarray, order: np.ndarray, bins: int) -> np.ndarray:
    """Each item in ``order`` to the least-loaded bin (ties: lowest bin index)."""
    assignment = np.empty(w.shape[0], dtype=np.int64)
    heap = [(0.0, b) for b in range(bins)]  # already a valid heap
    for i in order.tolist():
        load, b = heap[0]
        assignment[i] = b
        heapq.heapreplace(heap, (load + w[i], b))
    return assignment


def _loads(w: np.ndarray, assignment: np.ndarray, bins: int) -> np.ndarray:
    return np.bincount(assignment, weights=w, minlength=bins).astype(np.float64)


def improve_partition(
    w: np.ndarray,
    assignment: np.ndarray,
    bins: int,
    *,
    max_iter: int,
    groups: np.ndarray | None = None,
    moves: bool = True,
    lower_bound: float | None = None,
) -> tuple[np.ndarray, int]:
    """Local improvement (module doc): moves and swaps out of a most-loaded bin.

    Each step takes, over every other bin, the move of one item of the most-loaded bin
    ``top`` (or its swap with a lighter item) whose pair maximum
    ``max(L_top - delta, L_other + delta)`` is smallest, ``delta`` strictly inside
    ``(0, L_top - L_other)``; it stops when none lowers ``L_top``, after ``max_iter`` steps,
    or once ``max load <= lower_bound`` (nothing can do better).

    ``groups [n]`` (ints): items only swap with items of their own group; with
    ``moves=False`` no item moves alone, so every group's per-bin counts are kept (the
    dispersed hash table's constraint). Returns ``(assignment, steps)``; deterministic.
    """
    assignment = assignment.copy()
    n = w.shape[0]
    loads = _loads(w, assignment, bins)
    eps = 1e-12 * max(float(w.sum()), 1.0)
    group = np.zeros(n, dtype=np.int64) if groups is None else np.asarray(groups, np.int64)
    # exact integer keys (group, rank of weight): the per-group search is one searchsorted
    values = np.unique(np.concatenate([w, [0.0]]))
    rank = np.searchsorted(values, w)
    stride = values.size + 1
    steps = 0
    while steps < max_iter:
        top = int(np.argmax(loads))
        if lower_bound is not None and loads[top] <= lower_bound + eps:
            break
        members = np.flatnonzero(assignment == top)
        if members.size == 0:
            break
        wa, ga = w[members], group[members]
        by_bin = np.argsort(assignment, kind="stable")
        starts = np.concatenate([[0], np.cumsum(np.bincount(assignment, minlength=bins))])
        phantom_groups = np.unique(ga) if moves else np.zeros(0, dtype=np.int64)
        best = None  # (resulting pair max, other bin, member idx, other item or -1)
        for other in range(bins):
            if other == top:
                continue
            gap = loads[top] - loads[other]
            if gap <= eps:
                continue
            # candidates b in the other bin (or "nothing", weight 0): delta = wa - wb
            others = by_bin[starts[other] : starts[other + 1]]
            idx_b = np.concatenate([np.full(phantom_groups.size, -1), others])
            wb = np.concatenate([np.zeros(phantom_groups.size), w[others]])
            gb = np.concatenate([phantom_groups, group[others]])
            rb = np.concatenate([np.zeros(phantom_groups.size, np.int64), rank[others]])
            if not idx_b.size:
                continue
            order = np.lexsort((rb, gb))  # stable: "nothing" first among equal weights
            key = gb[order] * stride + rb[order]
            wb_sorted, idx_sorted, gb_sorted = wb[order], idx_b[order], gb[order]
            # for each a, the best delta is the one closest to gap/2, within (0, gap)
            target = ga * stride + np.searchsorted(values, wa - gap / 2.0)
            pos = np.searchsorted(key, target)
            for cand in (pos - 1, pos):
                ok = (cand >= 0) & (cand < key.size)
                cand_c = np.clip(cand, 0, key.size - 1)
                delta = wa - wb_sorted[cand_c]
                ok &= (gb_sorted[cand_c] == ga) & (delta > eps) & (delta < gap - eps)
                if not ok.any():
                    continue
                pair_max = np.maximum(loads[top] - delta, loads[other] + delta)
                pair_max = np.where(ok, pair_max, np.inf)
                j = int(np.argmin(pair_max))
                if best is None or pair_max[j] < best[0] - eps:
                    best = (float(pair_max[j]), other, int(members[j]), int(idx_sorted[cand_c[j]]))
        if best is None:
            break
        _, other, a, b = best
        assignment[a] = other
        loads[top] -= w[a]
        loads[other] += w[a]
        if b >= 0:
            assignment[b] = top
            loads[top] += w[b]
            loads[other] -= w[b]
        steps += 1
    return assignment, steps


def greedy_partition(weights: object, bins: int) -> PartitionResult:
    """Plain greedy (list scheduling): items in input order, each to the least-loaded bin.

    The baseline :func:`balanced_partition` never does worse than.
    """
    w, source = _as_weights(weights)
    bins = require_int("bins", bins, 1)
    assignment = _greedy(w, np.arange(w.shape[0]), bins)
    return _result(w, assignment, bins, 0, "greedy", source)


def balanced_partition(
    weights: object, bins: int, *, improve: bool = True, max_iter: int | None = None
) -> PartitionResult:
    """Split items into ``bins`` groups with loads as even as possible (min max load).

    Best of LPT and plain greedy, then local improvement (module docstring). Cost:
    ``O(n log n + n log m)`` for the starts, ``O(n log n)`` per improving move.

    Args:
        weights: ``[n]`` non-negative finite weights (numpy, torch or a sequence).
        bins: m >= 1.
        improve: run the local-improvement pass (default True).
        max_iter: cap on improving moves (default ``10 * n + 10``).

    Returns:
        :class:`PartitionResult` with ``assignment [n]`` and ``loads [m]``.

    Example::

        >>> r = balanced_partition([5, 4, 3, 3, 3], 2)
        >>> r.max_load, r.loads.tolist()
        (9.0, [9.0, 9.0])
    """
    w, source = _as_weights(weights)
    bins = require_int("bins", bins, 1)
    max_iter = 10 * w.shape[0] + 10 if max_iter is None else require_int("max_iter", max_iter, 0)
    if not isinstance(improve, (bool, np.bool_)):
        raise TypeError(f"improve must be a bool, got {type(improve).__name__} ({improve!r})")
    lpt = _greedy(w, np.argsort(-w, kind="stable"), bins)
    plain = _greedy(w, np.arange(w.shape[0]), bins)
    if _loads(w, plain, bins).max(initial=0.0) < _loads(w, lpt, bins).max(initial=0.0):
        assignment, method = plain, "greedy"
    else:
        assignment, method = lpt, "lpt"
    moves = 0
    if improve and bins > 1 and w.shape[0]:
        assignment, moves = improve_partition(w, assignment, bins, max_iter=max_iter)
        method += "+local"
    return _result(w, assignment, bins, moves, method, source)


def _result(
    w: np.ndarray, assignment: np.ndarray, bins: int, moves: int, method: str, source: Any
) -> PartitionResult:
    loads = _loads(w, assignment, bins)
    total = float(w.sum())
    mean = total / bins
    max_load = float(loads.max(initial=0.0))
    lower = max(mean, float(w.max(initial=0.0)))
    imbalance = max_load / mean if mean > 0 else 1.0
    return PartitionResult(
        assignment=like_source(assignment, source),
        loads=like_source(loads, source),
        max_load=max_load,
        mean_load=mean,
        lower_bound=lower,
        imbalance=imbalance,
        iterations=moves,
        method=method,
    )

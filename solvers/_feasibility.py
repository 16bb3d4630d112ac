"""Feasibility of a balanced assignment with forbidden pairs (scores of ``-inf``).

Every token can be placed iff Hall's condition holds: every set X of tokens may use
experts whose capacities sum to at least ``|X|``. Checked by one maximum flow on the
graph source -> token pattern (tokens grouped by their set of usable experts, capacity
= how many tokens share it) -> expert (unbounded) -> sink (capacity ``c_e``); when the
flow is short of T, the patterns reachable from the source in the residual graph are a
violating X and the experts reachable are exactly its usable experts: the error names
both.
"""

from __future__ import annotations

import numpy as np

__all__ = ["check_feasible", "hall_violator"]


def _listing(ids: np.ndarray, limit: int = 12) -> str:
    head = ", ".join(str(int(i)) for i in ids[:limit])
    return f"[{head}{', ...' if ids.size > limit else ''}]"


def hall_violator(allowed: np.ndarray, cap: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """None when every token can be placed, else ``(tokens, experts)``: a set of tokens whose
    usable experts (allowed, capacity > 0) are exactly ``experts`` and have less capacity in
    total than there are tokens (the residual-graph cut of a maximum flow, module doc).

    ``allowed [T, E]`` bool (False: forbidden pair), ``cap [E]`` int64 (``sum >= T``).
    """
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import breadth_first_order, maximum_flow

    T, E = allowed.shape
    usable = allowed & (cap > 0)[None, :]
    homeless = np.flatnonzero(~usable.any(axis=1))
    if homeless.size:
        return homeless, np.zeros(0, dtype=np.int64)
    patterns, inverse, counts = np.unique(
        np.packbits(usable, axis=1), axis=0, return_inverse=True, return_counts=True
    )
    inverse = inverse.reshape(-1)
    P = patterns.shape[0]
    pattern_experts = np.unpackbits(patterns, axis=1, count=E).astype(bool)
    source, sink = 0, P + E + 1
    pat_rows, pat_cols = np.nonzero(pattern_experts)
    rows = np.concatenate([np.zeros(P, np.int64), 1 + pat_rows, 1 + P + np.arange(E)])
    cols = np.concatenate([1 + np.arange(P), 1 + P + pat_cols, np.full(E, sink)])
    caps = np.concatenate([counts, np.full(pat_rows.size, T + 1), cap]).astype(np.int32)
    graph = csr_matrix((caps, (rows, cols)), shape=(P + E + 2, P + E + 2))
    result = maximum_flow(graph, source, sink, method="dinic")
    if result.flow_value >= T:
        return None
    residual = (graph.astype(np.int64) - result.flow).tocsr()
    residual.data[residual.data < 0] = 0
    residual.eliminate_zeros()
    reached = breadth_first_order(residual, source, directed=True, return_predecessors=False)
    reached_patterns = reached[(reached >= 1) & (reached <= P)] - 1
    experts = np.sort(reached[(reached > P) & (reached < sink)] - 1 - P)
    return np.flatnonzero(np.isin(inverse, reached_patterns)), experts


def check_feasible(allowed: np.ndarray, cap: np.ndarray) -> None:
    """Raise a ValueError naming the tokens that cannot be placed, if any
    (:func:`hall_violator`)."""
    found = hall_violator(allowed, cap)
    if found is None:
        return
    tokens, experts = found
    if not experts.size:
        raise ValueError(
            f"infeasible: {tokens.size} token(s) {_listing(tokens)} have no allowed expert "
            "with capacity > 0 (every score of the row is -inf, or only experts of capacity 0 "
            "allow them)"
        )
    total = int(cap[experts].sum())
    raise ValueError(
        f"infeasible: the {tokens.size} tokens {_listing(tokens)} may only use experts "
        f"{_listing(experts)} (every other pair is -inf, forbidden), whose capacities sum to "
        f"{total} < {tokens.size}: at least {tokens.size - total} of them cannot be placed"
    )

"""Feasibility of a balanced assignment with forbidden pairs (scores of ``-inf``).

Every token can be placed iff Hall's condition holds: every set X of tokens may use
experts whose capacities sum to at least ``|X|``. Checked by one maximum flow on the
graph source -> token pattern (tokens grouped by their set of usable experts, capacity
= how many tokens share it) -> expert (unbounded) -> sink (capacity ``c_e``); when the
flow is short of T, the patterns reachable from the source in the residual graph are a
violating X and the experts reachable are exactly its usable experts: the error names
both. The same flow (:class:`PatternFlow`) spreads tied tokens over their tight experts in
method="exact" (:mod:`solvers._coordinate`).
"""

from __future__ import annotations

import numpy as np

__all__ = ["PatternFlow", "check_feasible", "hall_violator"]


def _listing(ids: np.ndarray, limit: int = 12) -> str:
    head = ", ".join(str(int(i)) for i in ids[:limit])
    return f"[{head}{', ...' if ids.size > limit else ''}]"


class PatternFlow:
    """A maximum flow on source -> token pattern -> expert -> sink (module doc).

    ``usable [n, E]`` bool: the experts each row (token) may take; rows with the same set
    share one pattern node of capacity = their count; pattern -> expert arcs are unbounded,
    expert e -> sink has capacity ``cap[e]``. Fields: ``patterns [P, E]`` bool, ``inverse
    [n]`` (the pattern of each row), ``graph`` (csr capacities), ``result`` (scipy's
    ``maximum_flow``, Dinic's algorithm), ``flow_value``.
    """

    def __init__(self, usable: np.ndarray, cap: np.ndarray) -> None:
        from scipy.sparse import csr_matrix
        from scipy.sparse.csgraph import maximum_flow

        n, E = usable.shape
        # each row's set as 64-bit words: one word (E <= 64) sorts as a plain 1-D array
        packed = np.packbits(usable, axis=1, bitorder="little")
        words = np.zeros((n, -(-packed.shape[1] // 8) * 8), dtype=np.uint8)
        words[:, : packed.shape[1]] = packed
        codes = words.view(np.uint64)
        _, first, inverse, counts = np.unique(
            codes[:, 0] if codes.shape[1] == 1 else codes,
            axis=None if codes.shape[1] == 1 else 0,
            return_index=True,
            return_inverse=True,
            return_counts=True,
        )
        self.inverse = inverse.reshape(-1)
        self.patterns = usable[first]
        P = counts.size
        self.sink = P + E + 1
        pat_rows, pat_cols = np.divmod(np.flatnonzero(self.patterns), E)  # row-major
        # CSR rows in node order: source, patterns (their experts ascending), experts, sink
        indices = np.concatenate([1 + np.arange(P), 1 + P + pat_cols, np.full(E, self.sink)])
        data = np.concatenate([counts, np.full(pat_rows.size, n + 1), cap]).astype(np.int32)
        per_row = np.concatenate([[P], np.bincount(pat_rows, minlength=P), np.ones(E), [0]])
        indptr = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int32)
        size = self.sink + 1
        self.graph = csr_matrix((data, indices.astype(np.int32), indptr), shape=(size, size))
        self.result = maximum_flow(self.graph, 0, self.sink, method="dinic")
        self.flow_value = int(self.result.flow_value)

    def assignment(self) -> np.ndarray:
        """int64 ``[n]``: an expert for every row the flow carries, ``-1`` for the others;
        within a pattern the rows in order fill its experts in ascending order."""
        P = self.patterns.shape[0]
        flow = self.result.flow  # csr; a pattern's row holds its expert arcs (and reverse arcs)
        lo, hi = flow.indptr[1], flow.indptr[P + 1]
        node = flow.indices[lo:hi]
        amounts = np.where(node > P, np.maximum(flow.data[lo:hi], 0), 0)
        slots = np.repeat(node - 1 - P, amounts)  # the experts of the carried rows, by pattern
        per_pattern = np.repeat(np.arange(P), np.diff(flow.indptr[1 : P + 2]))
        carried = np.bincount(per_pattern, weights=amounts, minlength=P).astype(np.int64)
        slot_start = np.cumsum(carried) - carried
        order = np.argsort(self.inverse, kind="stable")  # rows by pattern, in order
        group = self.inverse[order]
        rank = np.arange(group.size) - np.searchsorted(group, group)
        out = np.full(group.size, -1, dtype=np.int64)
        kept = rank < carried[group]
        out[order[kept]] = slots[slot_start[group[kept]] + rank[kept]]
        return out

    def residual_reach(self) -> np.ndarray:
        """The nodes reachable from the source in the residual graph (a minimum cut)."""
        from scipy.sparse.csgraph import breadth_first_order

        residual = (self.graph.astype(np.int64) - self.result.flow).tocsr()
        residual.data[residual.data < 0] = 0
        residual.eliminate_zeros()
        return breadth_first_order(residual, 0, directed=True, return_predecessors=False)


def hall_violator(allowed: np.ndarray, cap: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """None when every token can be placed, else ``(tokens, experts)``: a set of tokens whose
    usable experts (allowed, capacity > 0) are exactly ``experts`` and have less capacity in
    total than there are tokens (the residual-graph cut of a maximum flow, module doc).

    ``allowed [T, E]`` bool (False: forbidden pair), ``cap [E]`` int64 (``sum >= T``).
    """
    T = allowed.shape[0]
    usable = allowed & (cap > 0)[None, :]
    homeless = np.flatnonzero(~usable.any(axis=1))
    if homeless.size:
        return homeless, np.zeros(0, dtype=np.int64)
    flow = PatternFlow(usable, cap)
    if flow.flow_value >= T:
        return None
    P = flow.patterns.shape[0]
    reached = flow.residual_reach()
    reached_patterns = reached[(reached >= 1) & (reached <= P)] - 1
    experts = np.sort(reached[(reached > P) & (reached < flow.sink)] - 1 - P)
    return np.flatnonzero(np.isin(flow.inverse, reached_patterns)), experts


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

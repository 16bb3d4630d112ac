"""The auction algorithm for balanced assignment, and capacity-aware greedy.

Both are rounds of the same vectorised step: every free token proposes to one expert, and
each expert keeps the best ``c_e`` of its holders and new proposers (:func:`keep_best`).
Everything is written against the small back-end in :mod:`solvers._ops`, so it runs on
numpy arrays and on torch tensors (CPU or CUDA) with identical results.

Auction (Bertsekas 1988; the transportation form of Bertsekas & Castanon 1989, experts as
objects with ``c_e`` identical copies), Jacobi bidding with epsilon scaling:

- token t, unassigned, values expert e at ``v_te = S_te - p_e``; it bids for its best
  expert ``j`` the amount ``b_t = p_j + (w1 - w2) + eps`` (w1, w2 the best and second-best
  values), i.e. the price at which it would be indifferent, plus eps;
- expert e keeps its ``c_e`` highest bids (a tie goes to the holder, then to the lower
  token id); the rest are free again; once full, its price is its lowest held bid, so
  prices never fall;
- on termination every token is within eps of its best value (eps-complementary slackness),
  hence ``D(p) - objective <= T * eps`` (experts with spare capacity keep price 0).

Epsilon scaling runs phases with eps divided by ``factor`` each time, keeping the prices
and the tokens still eps-optimal, and stops early as soon as the certified gap
``D(p) - objective`` is within the tolerance. The long tail of a phase (a few free tokens
pushing each other along chains of displacements, one step per round) is handed to
shortest augmenting paths on the E-node exchange graph (:mod:`solvers._exact`).
"""

from __future__ import annotations

from typing import Any

from solvers._duals import certified_gap

__all__ = ["auction", "greedy", "keep_best"]


def keep_best(
    ops: Any, tok: Any, exp: Any, key: Any, cap: Any, by_token: bool
) -> tuple[Any, Any, Any, Any, Any]:
    """For candidates ``(tok, exp, key)``, keep the ``cap[exp]`` best keys per expert.

    Order within an expert: key descending, then token id ascending (``by_token``) or the
    candidates' input order (holders before proposers: the incumbent wins a tie).
    Returns the candidates sorted that way, ``keep`` (bool) and ``last`` (bool: the kept
    candidate of rank ``cap - 1``, the weakest one of a full expert).
    """
    order = ops.order_by(exp, key, tok if by_token else None)
    tok, exp, key = tok[order], exp[order], key[order]
    rank = ops.group_rank(exp)
    limit = cap[exp]
    return tok, exp, key, rank < limit, rank == limit - 1


def _propose(
    ops: Any,
    owner: Any,
    held: Any,
    load: Any,
    weakest: Any,
    cap: Any,
    tok: Any,
    exp: Any,
    key: Any,
    by_token: bool = False,
) -> None:
    """One round of proposals ``tok -> exp`` with strength ``key``; updates the state in place.

    ``owner [T]`` (-1 free), ``held [T]`` (the key each holder won with), ``load [E]``,
    ``weakest [E]`` (lowest held key; +inf for an empty expert).
    """
    E = cap.shape[0]
    counts = ops.bincount(exp, E)
    contested = counts > cap - load
    c_tok = contested[exp]
    free_tok = ~c_tok
    if ops.any(free_tok):  # room for every proposer: accept them all
        t, e, k = tok[free_tok], exp[free_tok], key[free_tok]
        owner[t] = e
        held[t] = k
        load += ops.bincount(e, E)
        ops.scatter_min_(weakest, e, k)
    if ops.any(c_tok):  # merge holders and proposers of the contested experts
        p_tok, p_exp, p_key = tok[c_tok], exp[c_tok], key[c_tok]
        # A holder whose key beats every proposal to its expert is kept whatever happens
        # (a tie goes to the holder, or to the lower token id with by_token): leave it out
        # of the sort and lower its expert's limit instead. ``top`` has one more slot, -inf,
        # read by the free tokens (owner -1), and -inf for uncontested experts: neither is a
        # candidate.
        top = ops.full(E + 1, -ops.inf)
        ops.scatter_max_(top, p_exp, p_key)
        bar = top[owner]
        holders = ops.nonzero(held <= bar if by_token else held < bar)
        h_exp = owner[holders]
        limit = cap - load + ops.bincount(h_exp, E)
        t = ops.cat(holders, p_tok)
        e = ops.cat(h_exp, p_exp)
        k = ops.cat(held[holders], p_key)
        t, e, k, keep, last = keep_best(ops, t, e, k, limit, by_token)
        owner[t[~keep]] = -1
        owner[t[keep]] = e[keep]
        held[t[keep]] = k[keep]
        weakest[e[last]] = k[last]
        load[contested] = cap[contested]


def auction(
    ops: Any,
    S: Any,
    cap: Any,
    *,
    eps_start: float,
    eps_final: float,
    factor: float,
    switch: int,
    S_host: Any,
    cap_host: Any,
    tol: float = 0.0,
    eps_check: float = 0.0,
    complete: bool = True,
    p_start: Any = None,
    owner_start: Any = None,
    graph_prices: bool = False,
) -> tuple[Any, Any, int, int]:
    """Epsilon-scaled Jacobi auction on float64 ``S [T, E]`` with capacities ``cap [E]``.

    Phases run with ``eps = eps_start, eps_start / factor, ...`` down to ``eps_final``; each
    phase starts from the previous prices, with the tokens that are no longer eps-optimal
    freed. A phase bids in rounds until at most ``switch`` tokens are free: the tail of a
    phase (a few free tokens chasing the last free slots through long chains of
    displacements, one per round) is left to shortest augmenting paths.

    - ``complete=False``: the free tokens just carry over to the next phase; after the
      ``eps_final`` phase the (maybe partial, ``-1`` = free) assignment is returned, every
      assigned token eps-optimal (for ``method="exact"``, which finishes it exactly).
    - ``complete=True``: phases with ``eps <= eps_check`` are completed by augmenting paths
      (:func:`solvers._exact.finish` with ``delta = eps`` on the numpy copies ``S_host``,
      ``cap_host``, which keeps eps-complementary slackness); the run stops after the first
      completed phase whose certified gap ``D(p) - objective`` is ``<= tol``, or after the
      ``eps_final`` phase (gap ``<= T * eps_final``). With ``graph_prices``, a completed
      phase whose gap is too large also tries the prices of its assignment's exchange graph
      (exact when that assignment is optimal: integer scores often get there early).

    ``p_start`` (default zeros) are the initial prices; ``owner_start`` (default all free,
    ``-1``) an initial partial assignment whose tokens are ``eps_start``-optimal for them.

    Returns ``(assignment, prices, rounds, phases)``; ``rounds`` counts bidding rounds plus
    augmenting paths.
    """
    T, E = S.shape
    owner = ops.full_int(T, -1)
    held = ops.full(T, 0.0)
    load = ops.full_int(E, 0)
    weakest = ops.full(E, ops.inf)
    p = ops.full(E, 0.0) if p_start is None else p_start
    if owner_start is not None:  # holders sit at their expert's price
        owner = owner_start
        kept = owner >= 0
        held = ops.where(kept, p[ops.clip_min(owner, 0)], held)
        load = ops.bincount(owner[kept], E)
        ops.scatter_min_(weakest, owner[kept], held[kept])
    # base[t]: token t stays eps'-optimal while its expert's price is <= base[t] + eps'
    # (its bid minus the eps it bid with: prices only rise, so only its own expert's price
    # can erode its lead). Lets a phase change re-check only the tokens near the edge.
    base = held - max(eps_start, eps_final)
    eps = max(eps_start, eps_final)
    rounds = phases = 0
    spare = int(cap_host.sum()) != T
    while True:
        phases += 1
        last = eps <= eps_final
        while True:
            free = ops.nonzero(owner < 0)
            if free.shape[0] <= switch:
                break
            rounds += 1
            v = S[free] - p
            j1, w1, w2 = ops.top2(v)
            bid = p[j1] + (w1 - w2) + eps
            _propose(ops, owner, held, load, weakest, cap, free, j1, bid)
            base[free] = held[free] - eps
            p = ops.where(load == cap, weakest, p)
        if not complete:
            if last:
                return owner, p, rounds, phases
        elif eps <= eps_check or last:
            # spare capacity: an expert that lost tokens keeps a price above the others;
            # finish() places the dummy tokens (spare slots) and restores CS for them too
            if free.shape[0] or spare:
                owner, p, held, aug = _finish_phase(ops, S_host, cap_host, p, owner, eps)
                base = held - eps
                rounds += aug
                load = ops.bincount(owner, E)
                weakest = ops.full(E, ops.inf)
                ops.scatter_min_(weakest, owner, held)
            gap = certified_gap(ops, S, cap, owner, p)
            if gap <= tol or last:
                return owner, p, rounds, phases
            if graph_prices:
                from solvers._duals import prices_from_assignment

                p_graph = ops.from_numpy(
                    prices_from_assignment(S_host, cap_host, ops.to_numpy(owner)), p
                )
                if certified_gap(ops, S, cap, owner, p_graph) <= tol:
                    return owner, p_graph, rounds, phases
        eps = max(eps / factor, eps_final)
        # free the tokens that are no longer eps-optimal (they bid again)
        suspect = ops.nonzero((owner >= 0) & (p[ops.clip_min(owner, 0)] > base + eps))
        if suspect.shape[0]:
            v = S[suspect] - p
            mine = v[ops.arange(suspect.shape[0]), owner[suspect]]
            bad = suspect[mine < ops.row_max(v) - eps]
        else:
            bad = suspect
        if bad.shape[0]:
            owner[bad] = -1
            kept = owner >= 0
            load = ops.bincount(owner[kept], E)
            weakest = ops.full(E, ops.inf)
            ops.scatter_min_(weakest, owner[kept], held[kept])


def _finish_phase(ops: Any, S_host: Any, cap_host: Any, p: Any, owner: Any, eps: float):
    from solvers._exact import finish

    own, p_host, aug = finish(
        S_host, cap_host, ops.to_numpy(p).copy(), ops.to_numpy(owner).copy(), eps
    )
    owner = ops.from_numpy(own, owner)
    p = ops.from_numpy(p_host, p)
    held = p[owner]  # holders now sit at their expert's price: the first to give way
    return owner, p, held, aug


def greedy(ops: Any, S: Any, cap: Any) -> tuple[Any, int]:
    """Capacity-aware greedy by descending score; returns ``(assignment, rounds)``.

    Sequential greedy takes the entries ``(t, e)`` in the strict order (score descending,
    token ascending, expert ascending) and assigns t to e when t is free and e has room. It
    equals the stable matching of token-proposing deferred acceptance under that same order
    (preferences from common pair weights have a unique stable matching), which is what is
    computed here in at most E vectorised rounds: every free token proposes to its best
    expert among those it has not proposed to yet and that could still take it (room left,
    or a weakest holder not above it), every expert keeps its best ``c_e`` proposers.

    Forbidden pairs (``-inf``) are never proposed; a token whose every remaining option is
    forbidden is stuck and left free (``-1``) for the caller to place (augmenting paths).
    """
    T, E = S.shape
    owner = ops.full_int(T, -1)
    held = ops.full(T, 0.0)
    load = ops.full_int(E, 0)
    weakest = ops.full(E, ops.inf)
    tried = ops.zeros_bool(T, E)
    stuck = ops.zeros_bool(T)
    rounds = 0
    while True:
        free = ops.nonzero((owner < 0) & ~stuck)
        if free.shape[0] == 0:
            return owner, rounds
        rounds += 1
        v = S[free]
        closed = tried[free] | ((load >= cap) & (v < weakest))
        masked = ops.where(closed, -ops.inf, v)
        exp = ops.argmax_rows(masked)
        blocked = masked[ops.arange(free.shape[0]), exp] == -ops.inf
        if ops.any(blocked):
            stuck[free[blocked]] = True
            free, exp = free[~blocked], exp[~blocked]
            if free.shape[0] == 0:
                continue
        tried[free, exp] = True
        _propose(ops, owner, held, load, weakest, cap, free, exp, S[free, exp], by_token=True)


def duals_for(ops: Any, S: Any, cap: Any, owner: Any, candidates: list[Any]) -> tuple[Any, float]:
    """The candidate prices with the lowest dual bound; returns ``(prices, gap_bound)``."""
    best_p, best_gap = None, float("inf")
    for p in candidates:
        gap = certified_gap(ops, S, cap, owner, p)
        if gap < best_gap:
            best_p, best_gap = p, gap
    return best_p, max(best_gap, 0.0)

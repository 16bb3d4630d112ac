"""Hash routing (Roller et al. 2021, "Hash Layers For Large Sparse Models").

A hash layer routes each token by its id through a fixed table, with no learned router
and no balancing loss::

    expert(t) = table[token_id(t)]                 table: int64 [V] -> {0..E-1}
    y_t = FFN_{expert(t)}(x_t)                     weight 1

How the table is built decides the balance and what the experts specialise in. The
strategies (each a function returning the table, and ``HashRouter.fit(strategy, ...)``):

- ``"random"`` (:func:`random_table`): ``table[v] = h_seed(v) mod E`` with ``h`` the
  SplitMix64 finaliser keyed by the seed: identical in every process and on every
  machine (never Python's salted ``hash()``), defined for any id.
- ``"balanced"`` (:func:`balanced_table`): from the token frequencies ``c [V]`` of a
  training stream, tokens go to experts so the expected loads
  ``L_e = sum_{v: table[v]=e} c_v`` are as even as possible
  (:func:`solvers.balanced_partition`: best of LPT and greedy, then local moves).
  Unseen tokens (``c_v = 0``) keep their random hash.
- ``"clustered"`` (:func:`clustered_table`): k-means (:func:`solvers.kmeans`, seeded,
  k-means++) on a token embedding table ``[V, d]`` into ``num_clusters`` clusters;
  cluster -> expert, so similar tokens share an expert. With ``num_clusters > E`` the
  clusters are packed onto experts by ``balanced_partition`` of their weights.
- ``"dispersed"`` (:func:`dispersed_table`): k-means into clusters, then each cluster's
  members are dealt across experts (chunks of E members get E distinct experts), so
  similar tokens go to different experts and each cluster's per-expert counts differ
  by at most one. Within a cluster members are dealt heaviest first, each chunk's
  heaviest member to the currently least-loaded expert.
- ``"multi-hash"`` (:func:`multi_hash_table`): N random hash functions (hash j is
  ``random_table(..., index=j)``; hash 0 is exactly the ``"random"`` table). Each
  token's FFN is assembled from N pieces: ``y = B(relu(A x))`` with
  ``A = [A_{0,k_0} | ... | A_{N-1,k_{N-1}}]`` (``[d, h]``, pieces ``[d, h/N]``) and
  ``B`` the matching rows ``[h, d]``, ``k_j = hash_j(token)``. Since relu acts
  elementwise, ``B relu(A x) = sum_j B_{j,k_j} relu(A_{j,k_j} x)``: N*E sub-experts of
  hidden size h/N, token routed to sub-expert ``j*E + k_j`` in each group j with
  weight 1. Build the experts as ``FFNExperts(N * E, d, h // N, bias=False)`` (relu);
  ``MoE`` runs them unchanged.

Shapes: ``x [T, d]``, ``token_ids int64 [T]`` -> Routing with N entries per token
(N = ``num_hashes``, 1 except for multi-hash), ``num_experts = N * E``, weights 1.0 in
the dtype of x, ``probs`` None. Routing a batch is one gather ``table[:, token_ids]``.

Token ids outside ``[0, V)``: a ValueError by default; ``out_of_range="modulo"``
folds them into the table with ``id mod V`` (Python/torch modulo, non-negative).
The range check costs a host sync; under ``routelab.validation(False)`` it is skipped
and a bad id fails inside the gather instead (IndexError on CPU, a device assert on
CUDA). Missing ``token_ids``: a ValueError.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from routelab.router import Router, validation_enabled
from routelab.routing import Routing, _require_int
from solvers import balanced_partition, kmeans

__all__ = [
    "OUT_OF_RANGE",
    "STRATEGIES",
    "HashRouter",
    "balanced_table",
    "clustered_table",
    "dispersed_table",
    "multi_hash_table",
    "random_table",
    "splitmix64",
]

STRATEGIES = ("random", "balanced", "clustered", "dispersed", "multi-hash")
OUT_OF_RANGE = ("error", "modulo")

_MASK64 = (1 << 64) - 1


def splitmix64(values: np.ndarray) -> np.ndarray:
    """The SplitMix64 finaliser (Steele et al. 2014) on uint64 arrays (wrapping arithmetic).

    ``z += 0x9E3779B97F4A7C15; z = (z ^ z>>30) * 0xBF58476D1CE4E5B9;
    z = (z ^ z>>27) * 0x94D049BB133111EB; z ^= z>>31``.
    """
    z = np.asarray(values, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} ({seed!r})")
    if not 0 <= seed <= _MASK64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return int(seed)


def _hash_key(seed: int, index: int) -> np.uint64:
    """The key of hash function ``index`` under ``seed``: two SplitMix64 rounds."""
    first = splitmix64(np.array([seed], dtype=np.uint64))
    with np.errstate(over="ignore"):
        mixed = first ^ np.uint64((index * 0xD1B54A32D192ED03) & _MASK64)
    return splitmix64(mixed)[0]


def random_table(vocab_size: int, num_experts: int, *, seed: int = 0, index: int = 0) -> Tensor:
    """A seeded random hash table, int64 ``[V]``: ``splitmix64(v ^ key(seed, index)) mod E``.

    Stable across processes, ``PYTHONHASHSEED`` values, machines and library versions
    (pure 64-bit integer arithmetic). ``index`` selects one of a family of independent
    hash functions (multi-hash uses ``index = 0 .. N-1``).
    """
    vocab_size = _require_int("vocab_size", vocab_size, 1)
    num_experts = _require_int("num_experts", num_experts, 1)
    index = _require_int("index", index, 0)
    key = _hash_key(_check_seed(seed), index)
    ids = np.arange(vocab_size, dtype=np.uint64)
    h = splitmix64(ids ^ key)
    return torch.from_numpy((h % np.uint64(num_experts)).astype(np.int64))


def multi_hash_table(
    vocab_size: int, num_experts: int, num_hashes: int, *, seed: int = 0
) -> Tensor:
    """N independent random tables stacked, int64 ``[N, V]`` (row j: hash function j)."""
    num_hashes = _require_int("num_hashes", num_hashes, 1)
    return torch.stack(
        [random_table(vocab_size, num_experts, seed=seed, index=j) for j in range(num_hashes)]
    )


def _as_1d_float(name: str, values: object, length: int | None = None) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().cpu().double().numpy()
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D [V], got shape {arr.shape}")
    if length is not None and arr.shape[0] != length:
        raise ValueError(f"{name} must have length V = {length}, got {arr.shape[0]}")
    if not np.isfinite(arr).all() or (arr.size and arr.min() < 0):
        raise ValueError(f"{name} must be finite and >= 0")
    return arr


def balanced_table(counts: object, num_experts: int, *, seed: int = 0) -> Tensor:
    """A frequency-balanced table, int64 ``[V]``, from token counts ``c [V]``.

    Minimises the largest expected load ``max_e sum_{v: table[v]=e} c_v`` with
    :func:`solvers.balanced_partition`; tokens with ``c_v = 0`` keep the random hash
    ``random_table(V, E, seed=seed)`` so unseen tokens still spread out.
    """
    num_experts = _require_int("num_experts", num_experts, 1)
    c = _as_1d_float("counts", counts)
    table = random_table(max(c.shape[0], 1), num_experts, seed=seed)[: c.shape[0]].numpy().copy()
    seen = np.flatnonzero(c > 0)
    if seen.size:
        table[seen] = balanced_partition(c[seen], num_experts).assignment
    return torch.from_numpy(table)


def _cluster(embeddings: object, num_clusters: int, seed: int) -> np.ndarray:
    """k-means labels ``[V]`` of the embedding rows (float64, seeded)."""
    if isinstance(embeddings, Tensor):
        embeddings = embeddings.detach().cpu().double().numpy()
    emb = np.asarray(embeddings, dtype=np.float64)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be [V, d], got shape {emb.shape}")
    if num_clusters > emb.shape[0]:
        raise ValueError(
            f"num_clusters must be <= V = {emb.shape[0]} (rows of embeddings), got {num_clusters}"
        )
    return kmeans(emb, num_clusters, seed=seed, max_iter=50).labels


def _token_weights(weights: object, vocab_size: int) -> np.ndarray:
    if weights is None:
        return np.ones(vocab_size)
    return _as_1d_float("weights", weights, vocab_size)


def clustered_table(
    embeddings: object,
    num_experts: int,
    *,
    num_clusters: int | None = None,
    weights: object = None,
    seed: int = 0,
) -> Tensor:
    """Similar tokens share an expert: k-means clusters of ``embeddings [V, d]`` -> experts.

    ``num_clusters`` (default E, must be >= E): with exactly E clusters, cluster c is
    expert c; with more, clusters are packed onto experts by ``balanced_partition`` of
    their total ``weights`` (token frequencies ``[V]``; default 1 per token).
    """
    num_experts = _require_int("num_experts", num_experts, 1)
    num_clusters = num_experts if num_clusters is None else num_clusters
    num_clusters = _require_int("num_clusters", num_clusters, 1)
    if num_clusters < num_experts:
        raise ValueError(
            f"num_clusters must be >= num_experts = {num_experts} for 'clustered' "
            f"(fewer clusters would leave experts unused), got {num_clusters}"
        )
    labels = _cluster(embeddings, num_clusters, _check_seed(seed))
    if num_clusters == num_experts:
        return torch.from_numpy(labels)
    w = _token_weights(weights, labels.shape[0])
    cluster_weight = np.bincount(labels, weights=w, minlength=num_clusters)
    packing = balanced_partition(cluster_weight, num_experts).assignment
    return torch.from_numpy(packing[labels])


def dispersed_table(
    embeddings: object,
    num_experts: int,
    *,
    num_clusters: int | None = None,
    weights: object = None,
    seed: int = 0,
) -> Tensor:
    """Similar tokens go to different experts: each k-means cluster dealt across experts.

    Every cluster's members (``num_clusters`` clusters of ``embeddings [V, d]``,
    default E) are sorted by ``weights`` (descending, ties by id) and cut into chunks of
    E; each chunk goes to distinct experts, its heaviest member to the least-loaded
    expert so far (ties: lowest index), chunks taken heaviest first over all clusters.
    So in every cluster the per-expert member counts differ by at most one, and the
    expected loads stay even.
    """
    num_experts = _require_int("num_experts", num_experts, 1)
    num_clusters = num_experts if num_clusters is None else num_clusters
    num_clusters = _require_int("num_clusters", num_clusters, 1)
    labels = _cluster(embeddings, num_clusters, _check_seed(seed))
    V = labels.shape[0]
    w = _token_weights(weights, V)
    # members of every cluster, heaviest first (ties by id): sort by (label, -w, id)
    order = np.lexsort((np.arange(V), -w, labels))
    bounds = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=num_clusters))])
    chunks = [
        order[start : min(start + num_experts, end)]
        for c in range(num_clusters)
        for start, end in [(int(bounds[c]), int(bounds[c + 1]))]
        for start in range(start, end, num_experts)
    ]
    chunks.sort(key=lambda members: (-w[members[0]], int(members[0])))
    table = np.empty(V, dtype=np.int64)
    loads = np.zeros(num_experts)
    for members in chunks:
        emptiest = np.argsort(loads, kind="stable")[: members.shape[0]]
        table[members] = emptiest
        loads[emptiest] += w[members]
    _swap_within_clusters(table, labels, w, loads, max_iter=4 * V)
    return torch.from_numpy(table)


def _swap_within_clusters(
    table: np.ndarray, labels: np.ndarray, w: np.ndarray, loads: np.ndarray, max_iter: int
) -> None:
    """Local improvement that keeps every cluster's per-expert counts: swap the experts
    of two tokens of the same cluster, one on a most-loaded expert, when that lowers it
    without raising the other expert to its old level (in place; deterministic)."""
    eps = 1e-12 * max(float(w.sum()), 1.0)
    bound = max(float(w.sum()) / loads.shape[0], float(w.max(initial=0.0)))
    order = np.argsort(labels, kind="stable")
    starts = np.concatenate([[0], np.cumsum(np.bincount(labels))])
    members = [order[starts[c] : starts[c + 1]] for c in range(starts.shape[0] - 1)]
    for _ in range(max_iter):
        top = int(np.argmax(loads))
        if loads[top] <= bound + eps:
            return  # optimal: no table does better
        on_top = np.flatnonzero(table == top)
        best = None  # (pair max, a, b)
        for c in np.unique(labels[on_top]).tolist():
            a = on_top[labels[on_top] == c]
            b = members[c][table[members[c]] != top]
            if b.size == 0:
                continue
            delta = w[a][:, None] - w[b][None, :]  # [|a|, |b|]
            gap = loads[top] - loads[table[b]][None, :]
            pair_max = np.maximum(loads[top] - delta, loads[table[b]][None, :] + delta)
            pair_max = np.where((delta > eps) & (delta < gap - eps), pair_max, np.inf)
            i, j = np.unravel_index(int(np.argmin(pair_max)), pair_max.shape)
            if np.isfinite(pair_max[i, j]) and (best is None or pair_max[i, j] < best[0]):
                best = (float(pair_max[i, j]), int(a[i]), int(b[j]))
        if best is None:
            return
        _, a_tok, b_tok = best
        other = int(table[b_tok])
        table[a_tok], table[b_tok] = other, top
        moved = w[a_tok] - w[b_tok]
        loads[top] -= moved
        loads[other] += moved


def _as_token_stream(token_ids: object) -> Tensor:
    if isinstance(token_ids, np.ndarray):
        token_ids = torch.from_numpy(token_ids)
    elif not isinstance(token_ids, Tensor):
        token_ids = torch.as_tensor(token_ids)
    if token_ids.dtype.is_floating_point or token_ids.dtype in (torch.bool, torch.complex64):
        raise TypeError(f"token_ids must be an integer tensor, got {token_ids.dtype}")
    return token_ids.reshape(-1).long().cpu()


class HashRouter(Router):
    """Hash routing (Roller et al. 2021): ``expert_j(t) = j*E + table[j, token_id(t)]``.

    See the module docstring for the formula, the strategies and multi-hash. Shapes:
    ``x [T, d]`` and ``token_ids int64 [T]`` -> a Routing with ``num_hashes`` entries
    per token, weight 1.0 (dtype of x), over ``num_experts = num_hashes * E``.

    Args:
        d_model: d (only checked: the routing ignores x's values).
        num_experts: E, the experts each hash function chooses among (experts per hash).
        table: int ``[V]`` (one hash) or ``[N, V]`` (multi-hash) with values in
            ``[0, E)``; held as the registered buffer ``table`` (in ``state_dict``).
        out_of_range: ``"error"`` (default) raises a ValueError for token ids outside
            ``[0, V)``; ``"modulo"`` uses ``id mod V``.
        strategy: a label for ``repr`` (``fit`` sets it).

    Attributes: ``num_hashes`` N, ``experts_per_hash`` E, ``vocab_size`` V and
    ``num_experts`` N*E (what ``FFNExperts`` and ``MoE`` must be built for).

    Build one with :meth:`fit`, e.g.
    ``HashRouter.fit("balanced", 16, d_model=512, token_ids=stream)``.
    """

    differentiable: ClassVar[bool] = False
    requires_token_ids: ClassVar[bool] = True

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        table: Tensor,
        out_of_range: str = "error",
        strategy: str = "custom",
    ) -> None:
        experts_per_hash = _require_int("num_experts", num_experts, 1)
        if not isinstance(table, Tensor):
            raise TypeError(f"table must be a torch.Tensor, got {type(table).__name__}")
        if table.dtype.is_floating_point or table.dtype in (torch.bool, torch.complex64):
            raise TypeError(f"table must be an integer tensor, got {table.dtype}")
        if table.dim() not in (1, 2) or table.shape[-1] == 0 or 0 in table.shape:
            raise ValueError(
                f"table must be [V] or [num_hashes, V] with V >= 1, got {tuple(table.shape)}"
            )
        if int(table.min()) < 0 or int(table.max()) >= experts_per_hash:
            raise ValueError(
                f"table values must be expert ids in [0, {experts_per_hash}), got min "
                f"{int(table.min())}, max {int(table.max())}"
            )
        if out_of_range not in OUT_OF_RANGE:
            raise ValueError(f"out_of_range must be one of {OUT_OF_RANGE}, got {out_of_range!r}")
        num_hashes = 1 if table.dim() == 1 else int(table.shape[0])
        super().__init__(d_model, experts_per_hash * num_hashes)
        self.experts_per_hash = experts_per_hash
        self.num_hashes = num_hashes
        self.out_of_range = out_of_range
        self.strategy = strategy
        self.register_buffer("table", table.detach().long().clone())

    @property
    def vocab_size(self) -> int:
        """V, the number of token ids the table covers."""
        return int(self.table.shape[-1])

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(
        cls,
        strategy: str,
        num_experts: int,
        *,
        d_model: int,
        token_ids: object = None,
        embeddings: object = None,
        vocab_size: int | None = None,
        num_clusters: int | None = None,
        num_hashes: int | None = None,
        seed: int = 0,
        out_of_range: str = "error",
    ) -> HashRouter:
        """Build a HashRouter whose table is fitted by ``strategy`` (see :data:`STRATEGIES`).

        Args:
            strategy: ``"random"``, ``"balanced"``, ``"clustered"``, ``"dispersed"`` or
                ``"multi-hash"``.
            num_experts: E, experts per hash function.
            d_model: d of the inputs the router will see.
            token_ids: a training token stream (int, any shape; torch, numpy or a
                sequence): its frequencies ``[V]`` are what ``"balanced"`` balances,
                and weight the clusters of ``"clustered"`` / ``"dispersed"``.
                Required for ``"balanced"``.
            embeddings: a token embedding table ``[V, d_emb]`` (e.g. a trained model's
                input embeddings). Required for ``"clustered"`` and ``"dispersed"``.
            vocab_size: V; defaults to ``embeddings.shape[0]``, else
                ``max(token_ids) + 1``. Required for ``"random"`` / ``"multi-hash"``
                when no token stream is given.
            num_clusters: k-means clusters for ``"clustered"`` (default E, >= E) and
                ``"dispersed"`` (default E).
            num_hashes: N for ``"multi-hash"`` (required there, rejected elsewhere).
            seed: seeds the hash functions and k-means.
            out_of_range: ``"error"`` or ``"modulo"`` (see the class).
        """
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        num_experts = _require_int("num_experts", num_experts, 1)
        seed = _check_seed(seed)
        uses = {
            "embeddings": strategy in ("clustered", "dispersed"),
            "num_clusters": strategy in ("clustered", "dispersed"),
            "num_hashes": strategy == "multi-hash",
        }
        given = {"embeddings": embeddings, "num_clusters": num_clusters, "num_hashes": num_hashes}
        for name, value in given.items():
            if value is not None and not uses[name]:
                raise ValueError(f"{name} is not used by strategy {strategy!r}")
        if strategy in ("clustered", "dispersed") and embeddings is None:
            raise ValueError(f"strategy {strategy!r} needs embeddings=[V, d] to cluster")
        if strategy == "balanced" and token_ids is None:
            raise ValueError("strategy 'balanced' needs token_ids (a training token stream)")
        if strategy == "multi-hash" and num_hashes is None:
            raise ValueError("strategy 'multi-hash' needs num_hashes=N")

        stream = None if token_ids is None else _as_token_stream(token_ids)
        V = _resolve_vocab_size(vocab_size, stream, embeddings)
        counts = None
        if stream is not None:
            if stream.numel() and (int(stream.min()) < 0 or int(stream.max()) >= V):
                raise ValueError(
                    f"token_ids must lie in [0, vocab_size = {V}), got min "
                    f"{int(stream.min())}, max {int(stream.max())}"
                )
            counts = torch.bincount(stream, minlength=V).numpy()

        table: Tensor
        if strategy == "random":
            table = random_table(V, num_experts, seed=seed)
        elif strategy == "multi-hash":
            assert num_hashes is not None
            table = multi_hash_table(V, num_experts, num_hashes, seed=seed)
        elif strategy == "balanced":
            table = balanced_table(counts, num_experts, seed=seed)
        else:
            build = clustered_table if strategy == "clustered" else dispersed_table
            table = build(
                embeddings, num_experts, num_clusters=num_clusters, weights=counts, seed=seed
            )
        return cls(d_model, num_experts, table=table, out_of_range=out_of_range, strategy=strategy)

    # ------------------------------------------------------------------ routing
    def lookup(self, token_ids: Tensor) -> Tensor:
        """Expert ids int64 ``[T, N]`` (already offset by ``j * E``) for ``token_ids [T]``."""
        V = self.vocab_size
        ids = token_ids
        if self.out_of_range == "modulo":
            ids = torch.remainder(ids, V)
        elif validation_enabled() and ids.numel():
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= V:
                raise ValueError(
                    f"token_ids must lie in [0, {V}) (the hash table's vocab_size), got "
                    f"min {low}, max {high}; use out_of_range='modulo' to fold them in"
                )
        table = self.table.view(self.num_hashes, V)
        experts = table[:, ids]  # [N, T], the one gather
        if self.num_hashes > 1:
            offsets = torch.arange(self.num_hashes, device=experts.device) * self.experts_per_hash
            experts = experts + offsets[:, None]
        return experts.t()

    def route(self, x: Tensor, token_ids: Tensor | None) -> Routing:
        assert token_ids is not None  # the base class requires them (requires_token_ids)
        experts = self.lookup(token_ids)  # [T, N]
        weight = torch.ones(experts.shape, dtype=x.dtype, device=x.device)
        return Routing.from_topk(experts, weight, self.num_experts)

    # ------------------------------------------------------------------ analysis
    def expected_load(self, counts: object) -> Tensor:
        """Expected entries per expert, float64 ``[N*E]``, for token frequencies ``[V]``.

        ``L_{j*E+e} = sum_{v: table[j, v] = e} counts[v]``.
        """
        c = torch.from_numpy(_as_1d_float("counts", counts, self.vocab_size))
        table = self.table.view(self.num_hashes, -1).cpu()
        offsets = torch.arange(self.num_hashes)[:, None] * self.experts_per_hash
        flat = (table + offsets).reshape(-1)
        return torch.bincount(flat, weights=c.repeat(self.num_hashes), minlength=self.num_experts)

    def load_imbalance(self, counts: object) -> float:
        """``max / mean`` of :meth:`expected_load` (1.0 is perfectly even)."""
        load = self.expected_load(counts)
        mean = float(load.mean())
        return float(load.max()) / mean if mean > 0 else 1.0

    def extra_repr(self) -> str:
        extra = f", num_hashes={self.num_hashes}" if self.num_hashes > 1 else ""
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, strategy={self.strategy!r}, "
            f"vocab_size={self.vocab_size}{extra}, out_of_range={self.out_of_range!r}"
        )


def _resolve_vocab_size(vocab_size: object, stream: Tensor | None, embeddings: Any) -> int:
    if vocab_size is not None:
        V = _require_int("vocab_size", vocab_size, 1)
        if embeddings is not None and int(embeddings.shape[0]) != V:
            raise ValueError(f"embeddings has {int(embeddings.shape[0])} rows but vocab_size = {V}")
        return V
    if embeddings is not None:
        if not hasattr(embeddings, "shape") or len(embeddings.shape) != 2:
            raise ValueError("embeddings must be a [V, d] tensor or array")
        return int(embeddings.shape[0])
    if stream is not None and stream.numel():
        return int(stream.max()) + 1
    raise ValueError("vocab_size is required (or pass token_ids / embeddings to infer it)")

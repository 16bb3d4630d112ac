"""Hash routing (Roller et al. 2021, "Hash Layers For Large Sparse Models").

A hash layer routes each token by its id through a fixed table, with no learned router
and no balancing loss::

    expert(t) = table[token_id(t)]                 table: int64 [V] -> {0..E-1}
    y_t = FFN_{expert(t)}(x_t)                     weight 1

How the table is built decides the balance and what the experts specialise in. The
strategies (``HashRouter.fit(strategy, ...)``; the table builders are array functions in
:mod:`solvers.tables`, this module keeps the table and the routing; the expected load of
a table is :func:`analysis.hash_expected_load`):

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

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from routelab._validate import require_choice, require_int
from routelab.router import Router, validation_enabled
from routelab.routing import Routing
from solvers._validate import require_seed
from solvers.tables import (
    MAX_VOCAB,
    balanced_table,
    clustered_table,
    dispersed_table,
    multi_hash_table,
    random_table,
)

__all__ = ["OUT_OF_RANGE", "STRATEGIES", "HashRouter"]

OUT_OF_RANGE = ("error", "modulo")

MAX_INFERRED_VOCAB = 2**24
"""The largest V inferred from ``max(token_ids) + 1`` (pass ``vocab_size`` for more)."""


def _check_table_ids(table: object, experts_per_hash: int) -> Tensor:
    """``table`` if it is an integer tensor ``[V]`` / ``[N, V]`` of expert ids in
    ``[0, E)``; else a TypeError / ValueError naming what is wrong."""
    if not isinstance(table, Tensor):
        raise TypeError(f"table must be a torch.Tensor, got {type(table).__name__}")
    if table.dtype.is_floating_point or table.dtype == torch.bool or table.is_complex():
        raise TypeError(f"table must be an integer tensor of expert ids, got {table.dtype}")
    if table.dim() not in (1, 2) or 0 in table.shape:
        raise ValueError(
            f"table must be [V] or [num_hashes, V] with V >= 1, got {tuple(table.shape)}"
        )
    low, high = int(table.min()), int(table.max())
    if low < 0 or high >= experts_per_hash:
        raise ValueError(
            f"table values must be expert ids in [0, {experts_per_hash}), got min {low}, max {high}"
        )
    return table


def _as_token_stream(token_ids: object) -> Tensor:
    if isinstance(token_ids, np.ndarray):
        token_ids = torch.from_numpy(token_ids)
    elif not isinstance(token_ids, Tensor):
        try:
            token_ids = torch.as_tensor(token_ids)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"token_ids must be a sequence of integer ids: {err}") from None
    if token_ids.dtype.is_floating_point or token_ids.dtype == torch.bool or token_ids.is_complex():
        raise TypeError(f"token_ids must be an integer tensor, got {token_ids.dtype}")
    return token_ids.reshape(-1).long().cpu()


def _fit_random(V, E, counts, embeddings, num_clusters, num_hashes, seed):
    return random_table(V, E, seed=seed)


def _fit_multi_hash(V, E, counts, embeddings, num_clusters, num_hashes, seed):
    return multi_hash_table(V, E, num_hashes, seed=seed)


def _fit_balanced(V, E, counts, embeddings, num_clusters, num_hashes, seed):
    return balanced_table(counts, E, seed=seed)


def _fit_clusters(build: Callable[..., Any]) -> Callable[..., Any]:
    def fit(V, E, counts, embeddings, num_clusters, num_hashes, seed):
        return build(embeddings, E, num_clusters=num_clusters, weights=counts, seed=seed)

    return fit


# strategy -> (table builder, what it needs: "token_ids" / "embeddings" / "num_hashes",
# the options it accepts beyond the common ones)
_STRATEGIES: dict[str, tuple[Callable[..., Any], frozenset[str], frozenset[str]]] = {
    "random": (_fit_random, frozenset(), frozenset()),
    "balanced": (_fit_balanced, frozenset({"token_ids"}), frozenset()),
    "clustered": (
        _fit_clusters(clustered_table),
        frozenset({"embeddings"}),
        frozenset({"embeddings", "num_clusters"}),
    ),
    "dispersed": (
        _fit_clusters(dispersed_table),
        frozenset({"embeddings"}),
        frozenset({"embeddings", "num_clusters"}),
    ),
    "multi-hash": (_fit_multi_hash, frozenset({"num_hashes"}), frozenset({"num_hashes"})),
}
STRATEGIES = tuple(_STRATEGIES)

_NEEDS = {
    "token_ids": "needs token_ids (a training token stream)",
    "embeddings": "needs embeddings=[V, d] to cluster",
    "num_hashes": "needs num_hashes=N",
}


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

    differentiable: bool = False
    requires_token_ids: bool = True
    table: Tensor

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        table: Tensor,
        out_of_range: str = "error",
        strategy: str = "custom",
    ) -> None:
        experts_per_hash = require_int("num_experts", num_experts, 1)
        table = _check_table_ids(table, experts_per_hash)
        out_of_range = require_choice("out_of_range", out_of_range, OUT_OF_RANGE)
        if not isinstance(strategy, str):
            raise TypeError(f"strategy must be a str label, got {type(strategy).__name__}")
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

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        # Checked before torch copies it in (a float table would be cast to long silently,
        # an id >= E would route to an expert that does not exist).
        key = prefix + "table"
        if key in state_dict:
            table = _check_table_ids(state_dict[key], self.experts_per_hash)
            if tuple(table.shape) != tuple(self.table.shape):
                raise ValueError(
                    f"state_dict table has shape {tuple(table.shape)}, this router's is "
                    f"{tuple(self.table.shape)}: build a HashRouter for that table instead"
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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
        """Build a HashRouter whose table is fitted by ``strategy`` (see :data:`STRATEGIES`;
        the builders are :mod:`solvers.tables`).

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
            vocab_size: V (at most 2**28); defaults to ``embeddings.shape[0]``, else
                ``max(token_ids) + 1`` (at most 2**24: a stray huge id is an error, not a
                giant table). Required for ``"random"`` / ``"multi-hash"`` when no token
                stream is given.
            num_clusters: k-means clusters for ``"clustered"`` (default E, >= E) and
                ``"dispersed"`` (default E).
            num_hashes: N for ``"multi-hash"`` (required there, rejected elsewhere).
            seed: an int in ``[0, 2**64)``; seeds the hash functions and k-means.
            out_of_range: ``"error"`` or ``"modulo"`` (see the class).
        """
        strategy = require_choice("strategy", strategy, STRATEGIES)
        build, needs, accepts = _STRATEGIES[strategy]
        num_experts = require_int("num_experts", num_experts, 1)
        seed = require_seed(seed)
        given = {
            "token_ids": token_ids,
            "embeddings": embeddings,
            "num_clusters": num_clusters,
            "num_hashes": num_hashes,
        }
        for name in ("embeddings", "num_clusters", "num_hashes"):
            if given[name] is not None and name not in accepts:
                raise ValueError(f"{name} is not used by strategy {strategy!r}")
        for name in sorted(needs):
            if given[name] is None:
                raise ValueError(f"strategy {strategy!r} {_NEEDS[name]}")
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
        table = build(V, num_experts, counts, embeddings, num_clusters, num_hashes, seed)
        table = torch.as_tensor(table).cpu()
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

    def extra_repr(self) -> str:
        extra = f", num_hashes={self.num_hashes}" if self.num_hashes > 1 else ""
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, strategy={self.strategy!r}, "
            f"vocab_size={self.vocab_size}{extra}, out_of_range={self.out_of_range!r}"
        )


def _resolve_vocab_size(vocab_size: object, stream: Tensor | None, embeddings: Any) -> int:
    if embeddings is not None and (not hasattr(embeddings, "shape") or len(embeddings.shape) != 2):
        raise ValueError("embeddings must be a [V, d] tensor or array")
    if vocab_size is not None:
        V = require_int("vocab_size", vocab_size, 1, MAX_VOCAB)
        if embeddings is not None and int(embeddings.shape[0]) != V:
            raise ValueError(f"embeddings has {int(embeddings.shape[0])} rows but vocab_size = {V}")
        return V
    if embeddings is not None:
        return int(embeddings.shape[0])
    if stream is not None and stream.numel():
        V = int(stream.max()) + 1
        if V > MAX_INFERRED_VOCAB:
            raise ValueError(
                f"vocab_size inferred from max(token_ids) + 1 = {V} is above "
                f"{MAX_INFERRED_VOCAB} (a stray id?); pass vocab_size explicitly"
            )
        return max(V, 1)
    raise ValueError("vocab_size is required (or pass token_ids / embeddings to infer it)")

"""Hash-routing tables (Roller et al. 2021, "Hash Layers For Large Sparse Models"): the
combinatorial part of building ``table: int64 [V] -> {0..E-1}`` (token id -> expert).

- :func:`random_table`: ``table[v] = h_seed(v) mod E``, h the SplitMix64 finaliser keyed by
  the seed: identical in every process and on every machine (never Python's salted
  ``hash()``), defined for any id. :func:`multi_hash_table`: N of them, ``[N, V]``.
- :func:`balanced_table`: from token frequencies ``c [V]``, the expected loads
  ``L_e = sum_{v: table[v]=e} c_v`` as even as possible (:func:`balanced_partition`);
  unseen tokens (``c_v = 0``) keep their random hash.
- :func:`clustered_table`: k-means (:func:`kmeans`) clusters of a token embedding table
  ``[V, d]`` -> experts, so similar tokens share one (more clusters than experts are
  packed by :func:`balanced_partition` of their weights).
- :func:`dispersed_table`: each k-means cluster's members dealt across experts (chunks of
  E members get E distinct experts), so similar tokens go to different experts and each
  cluster's per-expert counts differ by at most one; then the partition's local search
  restricted to swaps inside a cluster (:func:`solvers.partition.improve_partition` with
  ``groups``), which keeps those counts.

numpy or torch in; the tables come back as int64 numpy arrays, or torch tensors on the
input's device when the main input (counts / embeddings) is one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from solvers._validate import as_real_numpy, like_source, require_int, require_seed
from solvers.kmeans import kmeans
from solvers.partition import balanced_partition, improve_partition

__all__ = [
    "MAX_VOCAB",
    "balanced_table",
    "clustered_table",
    "dispersed_table",
    "multi_hash_table",
    "random_table",
    "splitmix64",
]

MAX_VOCAB = 2**28
"""The largest vocabulary a table is built for (an int64 table of 2 GiB)."""

_MASK64 = (1 << 64) - 1


def splitmix64(values: Any) -> np.ndarray:
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


def _hash_key(seed: int, index: int) -> np.uint64:
    """The key of hash function ``index`` under ``seed``: two SplitMix64 rounds."""
    first = splitmix64(np.array([seed], dtype=np.uint64))
    with np.errstate(over="ignore"):
        mixed = first ^ np.uint64((index * 0xD1B54A32D192ED03) & _MASK64)
    return splitmix64(mixed)[0]


def _vocab(vocab_size: object) -> int:
    return require_int("vocab_size", vocab_size, 1, MAX_VOCAB)


def random_table(vocab_size: int, num_experts: int, *, seed: int = 0, index: int = 0) -> np.ndarray:
    """A seeded random hash table, int64 ``[V]``: ``splitmix64(v ^ key(seed, index)) mod E``.

    Stable across processes, ``PYTHONHASHSEED`` values, machines and library versions
    (pure 64-bit integer arithmetic). ``index`` selects one of a family of independent
    hash functions (multi-hash uses ``index = 0 .. N-1``).
    """
    vocab_size = _vocab(vocab_size)
    num_experts = require_int("num_experts", num_experts, 1)
    index = require_int("index", index, 0)
    key = _hash_key(require_seed(seed), index)
    h = splitmix64(np.arange(vocab_size, dtype=np.uint64) ^ key)
    return (h % np.uint64(num_experts)).astype(np.int64)


def multi_hash_table(
    vocab_size: int, num_experts: int, num_hashes: int, *, seed: int = 0
) -> np.ndarray:
    """N independent random tables stacked, int64 ``[N, V]`` (row j: hash function j)."""
    num_hashes = require_int("num_hashes", num_hashes, 1, 1024)
    return np.stack(
        [random_table(vocab_size, num_experts, seed=seed, index=j) for j in range(num_hashes)]
    )


def balanced_table(counts: Any, num_experts: int, *, seed: int = 0) -> Any:
    """A frequency-balanced table, int64 ``[V]``, from token counts ``c [V]``.

    Minimises the largest expected load ``max_e sum_{v: table[v]=e} c_v`` with
    :func:`solvers.balanced_partition`; tokens with ``c_v = 0`` keep the random hash
    ``random_table(V, E, seed=seed)`` so unseen tokens still spread out.
    """
    num_experts = require_int("num_experts", num_experts, 1)
    c, source = as_real_numpy("counts", counts, 1, "[V]", nonnegative=True)
    if not 1 <= c.shape[0] <= MAX_VOCAB:
        raise ValueError(f"counts must have 1 to {MAX_VOCAB} entries [V], got {c.shape[0]}")
    table = random_table(c.shape[0], num_experts, seed=seed)
    seen = np.flatnonzero(c > 0)
    if seen.size:
        table[seen] = balanced_partition(c[seen], num_experts).assignment
    return like_source(table, source)


def _cluster(embeddings: Any, num_clusters: object, seed: object) -> tuple[np.ndarray, Any]:
    """k-means labels ``[V]`` of the embedding rows (float64, seeded), and the torch source."""
    emb, source = as_real_numpy("embeddings", embeddings, 2, "[V, d]")
    num_clusters = require_int("num_clusters", num_clusters, 1)
    if not 1 <= emb.shape[0] <= MAX_VOCAB:
        raise ValueError(f"embeddings must have 1 to {MAX_VOCAB} rows [V, d], got {emb.shape[0]}")
    if num_clusters > emb.shape[0]:
        raise ValueError(
            f"num_clusters must be <= V = {emb.shape[0]} (rows of embeddings), got {num_clusters}"
        )
    return kmeans(emb, num_clusters, seed=require_seed(seed), max_iter=50).labels, source


def _token_weights(weights: Any, vocab_size: int) -> np.ndarray:
    if weights is None:
        return np.ones(vocab_size)
    return as_real_numpy("weights", weights, 1, "[V]", length=vocab_size, nonnegative=True)[0]


def clustered_table(
    embeddings: Any,
    num_experts: int,
    *,
    num_clusters: int | None = None,
    weights: Any = None,
    seed: int = 0,
) -> Any:
    """Similar tokens share an expert: k-means clusters of ``embeddings [V, d]`` -> experts.

    ``num_clusters`` (default E, must be >= E): with exactly E clusters, cluster c is
    expert c; with more, clusters are packed onto experts by ``balanced_partition`` of
    their total ``weights`` (token frequencies ``[V]``; default 1 per token).
    """
    num_experts = require_int("num_experts", num_experts, 1)
    num_clusters = num_experts if num_clusters is None else num_clusters
    if require_int("num_clusters", num_clusters, 1) < num_experts:
        raise ValueError(
            f"num_clusters must be >= num_experts = {num_experts} for 'clustered' "
            f"(fewer clusters would leave experts unused), got {num_clusters}"
        )
    labels, source = _cluster(embeddings, num_clusters, seed)
    if num_clusters == num_experts:
        return like_source(labels, source)
    w = _token_weights(weights, labels.shape[0])
    cluster_weight = np.bincount(labels, weights=w, minlength=num_clusters)
    packing = balanced_partition(cluster_weight, num_experts).assignment
    return like_source(packing[labels], source)


def dispersed_table(
    embeddings: Any,
    num_experts: int,
    *,
    num_clusters: int | None = None,
    weights: Any = None,
    seed: int = 0,
) -> Any:
    """Similar tokens go to different experts: each k-means cluster dealt across experts.

    Every cluster's members (``num_clusters`` clusters of ``embeddings [V, d]``,
    default E) are sorted by ``weights`` (descending, ties by id) and cut into chunks of
    E; each chunk goes to distinct experts, its heaviest member to the least-loaded
    expert so far (ties: lowest index), chunks taken heaviest first over all clusters.
    Then swaps of two tokens of the same cluster that lower the most-loaded expert
    (:func:`solvers.partition.improve_partition` with ``groups=labels, moves=False``).
    So in every cluster the per-expert member counts differ by at most one, and the
    expected loads stay even.
    """
    num_experts = require_int("num_experts", num_experts, 1)
    num_clusters = num_experts if num_clusters is None else num_clusters
    labels, source = _cluster(embeddings, num_clusters, seed)
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
    bound = max(float(w.sum()) / num_experts, float(w.max(initial=0.0)))
    table, _ = improve_partition(
        w, table, num_experts, max_iter=4 * V, groups=labels, moves=False, lower_bound=bound
    )
    return like_source(table, source)

"""Seeded k-means (Lloyd's algorithm with a k-means++ start).

Minimises the inertia ``sum_i min_c ||x_i - mu_c||^2`` over k centres ``mu [k, d]``:

1. **k-means++** start (Arthur & Vassilvitskii 2007): the first centre is a uniformly
   drawn point, each next one a point drawn with probability proportional to its
   squared distance to the nearest centre chosen so far (uniformly among the points
   not yet chosen when every distance is zero, i.e. fewer than k distinct points);
2. **Lloyd** iterations: assign every point to its nearest centre, move every centre
   to the mean of its points; a centre that loses all its points is moved to the
   point farthest from its own centre (so k clusters stay in use while there are
   k distinct points); stop when no centre moves more than ``tol`` (relative to the
   data's scale) or after ``max_iter`` iterations;
3. the returned labels are always the nearest final centre (ties: lowest index), so
   identical points always share a label.

Randomness comes only from ``numpy.random.default_rng(seed)``: the same seed gives the
same result on every run and machine (up to floating-point summation order of BLAS).
With ``n_init > 1`` the run with the smallest inertia wins (seeds ``seed, seed+1, ...``).

Input: numpy array, torch tensor (computed on the host in float64) or nested
sequences; torch in gives torch out on the input's device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from solvers._validate import (
    SEED_LIMIT,
    as_real_numpy,
    like_source,
    require_float,
    require_int,
    require_seed,
)

__all__ = ["KMeansResult", "kmeans"]


@dataclass
class KMeansResult:
    """The result of :func:`kmeans`.

    Fields:
        centers: float64 ``[k, d]``, the cluster centres (numpy or torch, as the input).
        labels: int64 ``[n]``, the nearest centre of each point.
        inertia: ``sum_i ||x_i - centers[labels_i]||^2``.
        iterations: Lloyd iterations run (in the winning restart).
        converged: whether the centres stopped moving before ``max_iter``.
    """

    centers: Any
    labels: Any
    inertia: float
    iterations: int
    converged: bool


def _sq_dist(x: np.ndarray, x_sq: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """``[n, k]`` squared distances, clipped at 0 (the expansion can round below it)."""
    d = x_sq[:, None] - 2.0 * (x @ centers.T) + (centers * centers).sum(1)[None, :]
    return np.maximum(d, 0.0)


def _nearest(x: np.ndarray, x_sq: np.ndarray, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centre of each row and its squared distance.

    ``argmin_c ||x - c||^2 = argmin_c (||c||^2 - 2 x.c)``: the row norm is added only
    to the chosen distance, which saves passes over the ``[n, k]`` matrix.
    """
    scores = x @ (-2.0 * centers.T)
    scores += (centers * centers).sum(1)[None, :]
    labels = np.argmin(scores, axis=1)
    dist = np.maximum(x_sq + scores[np.arange(x.shape[0]), labels], 0.0)
    return labels.astype(np.int64), dist


def _final_labels(x: np.ndarray, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centres computed once per distinct row, so identical points share a label
    whatever rounding the matrix product does at different row positions."""
    distinct, inverse = np.unique(x, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    labels, dist = _nearest(distinct, (distinct * distinct).sum(1), centers)
    return labels[inverse], dist[inverse]


def _plus_plus(x: np.ndarray, x_sq: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    n = x.shape[0]
    chosen = [int(rng.integers(n))]
    closest = _sq_dist(x, x_sq, x[chosen[0]][None, :])[:, 0]
    for _ in range(1, k):
        total = closest.sum()
        if total > 0:
            probs = closest / total
        else:  # every point sits on a centre: draw among the points not chosen yet
            probs = np.ones(n)
            probs[chosen] = 0.0
            probs /= probs.sum()
        c = int(rng.choice(n, p=probs))
        chosen.append(c)
        closest = np.minimum(closest, _sq_dist(x, x_sq, x[c][None, :])[:, 0])
    return x[chosen].copy()


def _lloyd(
    x: np.ndarray, x_sq: np.ndarray, centers: np.ndarray, max_iter: int, tol: float
) -> tuple[np.ndarray, int, bool]:
    k = centers.shape[0]
    for it in range(1, max_iter + 1):
        labels, dist = _nearest(x, x_sq, centers)
        sums = np.zeros_like(centers)
        _segment_sum(sums, labels, x)
        counts = np.bincount(labels, minlength=k)
        new = centers.copy()
        filled = counts > 0
        new[filled] = sums[filled] / counts[filled, None]
        empty = np.flatnonzero(~filled)
        if empty.size:
            far = np.argsort(-dist, kind="stable")[: empty.size]
            new[empty] = x[far]
        shift = float(((new - centers) ** 2).sum(1).max())
        centers = new
        if shift <= tol:
            return centers, it, True
    return centers, max_iter, False


def _segment_sum(out: np.ndarray, labels: np.ndarray, x: np.ndarray) -> None:
    """``out[c] += sum of x rows with label c`` (sorted segments, faster than add.at)."""
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    out[sorted_labels[starts]] += np.add.reduceat(x[order], starts, axis=0)


def kmeans(
    x: object,
    k: int,
    *,
    seed: int = 0,
    n_init: int = 1,
    max_iter: int = 100,
    tol: float = 1e-8,
) -> KMeansResult:
    """Cluster the rows of ``x [n, d]`` into ``k`` groups (k-means++ start, Lloyd).

    Args:
        x: ``[n, d]`` finite points, ``n >= k``.
        k: number of clusters, ``1 <= k <= n``.
        seed: seeds ``numpy.random.default_rng``.
        n_init: restarts (seeds ``seed + r``); the smallest inertia wins.
        max_iter: Lloyd iterations per restart.
        tol: stop when the largest squared centre shift is at most
            ``tol * mean squared norm of the centred data``.

    Returns:
        :class:`KMeansResult` (``centers [k, d]``, ``labels [n]``, ``inertia``, ...).

    Example::

        >>> import numpy as np
        >>> r = kmeans(np.array([[0.0], [0.1], [10.0], [10.2]]), 2, seed=0)
        >>> sorted(r.centers[:, 0].round(2).tolist())
        [0.05, 10.1]
    """
    arr, source = as_real_numpy("x", x, 2, "[n, d]")
    k = require_int("k", k, 1)
    n_init = require_int("n_init", n_init, 1)
    max_iter = require_int("max_iter", max_iter, 1)
    n = arr.shape[0]
    if k > n:
        raise ValueError(f"k must be <= the number of points n = {n}, got k = {k}")
    seed = require_seed(seed)
    if seed + n_init > SEED_LIMIT:
        raise ValueError(f"seed + n_init must be <= 2**64 (restarts use seed + r), got {seed}")
    tol = require_float("tol", tol, minimum=0.0)

    x_sq = (arr * arr).sum(1)
    scale = float(((arr - arr.mean(0)) ** 2).sum(1).mean()) if n else 0.0
    abs_tol = tol * scale
    best = None
    for r in range(n_init):
        rng = np.random.default_rng(seed + r)
        centers = _plus_plus(arr, x_sq, k, rng)
        centers, iters, converged = _lloyd(arr, x_sq, centers, max_iter, abs_tol)
        labels, dist = _final_labels(arr, centers)
        inertia = float(dist.sum())
        if best is None or inertia < best[0]:
            best = (inertia, centers, labels, iters, converged)
    assert best is not None
    inertia, centers, labels, iters, converged = best
    return KMeansResult(
        centers=like_source(centers, source),
        labels=like_source(labels, source),
        inertia=inertia,
        iterations=iters,
        converged=converged,
    )

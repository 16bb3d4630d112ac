"""Array back-ends for the vectorised solvers: the same algorithm runs on numpy arrays or on
torch tensors (CPU or CUDA) through this small set of primitives.

Every primitive is exact (elementwise arithmetic, max / min, stable sorts with explicit
tie keys), so the numpy and the torch path return identical assignments and prices.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["NumpyOps", "TorchOps", "ops_for", "row_max"]


def row_max(v: np.ndarray) -> np.ndarray:
    """``v.max(axis=1)`` for a 2-D float array, through ``argmax`` (numpy's argmax along short
    rows is SIMD-vectorised and several times faster than its max); the same values."""
    return v[np.arange(v.shape[0]), v.argmax(axis=1)]


class NumpyOps:
    """numpy implementations (float64 scores, int64 indices)."""

    name = "numpy"

    def __init__(self) -> None:
        self.inf = np.inf

    # construction -----------------------------------------------------------------
    def full(self, n: int, value: float) -> Any:
        return np.full(n, value, dtype=np.float64)

    def full_int(self, n: int, value: int) -> Any:
        return np.full(n, value, dtype=np.int64)

    def arange(self, n: int) -> Any:
        return np.arange(n, dtype=np.int64)

    def zeros_bool(self, *shape: int) -> Any:
        return np.zeros(shape, dtype=bool)

    def as_int(self, x: Any) -> Any:
        return np.asarray(x, dtype=np.int64)

    def as_float(self, x: Any) -> Any:
        return np.asarray(x, dtype=np.float64)

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def from_numpy(self, x: np.ndarray, like: Any) -> Any:
        return x

    # reductions -------------------------------------------------------------------
    def top2(self, v: Any) -> tuple[Any, Any, Any]:
        """Row-wise best index (lowest on ties), best value and second-best value of ``v [n, E]``."""
        j1 = v.argmax(axis=1)
        rows = np.arange(v.shape[0])
        w1 = v[rows, j1]
        v[rows, j1] = -np.inf  # v is a scratch copy owned by the caller
        w2 = row_max(v)
        return j1, w1, w2

    def row_max(self, v: Any) -> Any:
        return row_max(v)

    def row_min(self, v: Any) -> Any:
        return v[np.arange(v.shape[0]), v.argmin(axis=1)]

    def isneginf(self, x: Any) -> Any:
        return np.isneginf(x)

    def abs(self, x: Any) -> Any:
        return np.abs(x)

    def argmax_rows(self, v: Any) -> Any:
        return v.argmax(axis=1)

    def bincount(self, x: Any, n: int) -> Any:
        return np.bincount(x, minlength=n).astype(np.int64)

    def scatter_min_(self, target: Any, idx: Any, values: Any) -> None:
        np.minimum.at(target, idx, values)

    def scatter_max_(self, target: Any, idx: Any, values: Any) -> None:
        np.maximum.at(target, idx, values)

    def nonzero(self, mask: Any) -> Any:
        return np.flatnonzero(mask)

    def any(self, mask: Any) -> bool:
        return bool(mask.any())

    def sum(self, x: Any) -> float:
        with np.errstate(over="ignore"):  # a total beyond float64's range is inf, honestly
            return float(x.sum())

    def cat(self, *xs: Any) -> Any:
        return np.concatenate(xs)

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        return np.where(cond, a, b)

    def clip_min(self, x: Any, lo: float) -> Any:
        return np.maximum(x, lo)

    # sorting ----------------------------------------------------------------------
    def order_by(self, group: Any, key: Any, tie: Any = None) -> Any:
        """Permutation sorting by ``group`` ascending, then ``key`` descending, then ``tie``
        ascending (a strict total order when ``tie`` is unique); with ``tie=None`` equal
        keys keep their input order."""
        if tie is not None:
            return np.lexsort((tie, -key, group))
        n = key.shape[0]
        # Unstable (SIMD) sort by key, then ties put back in input order: much faster than
        # a stable float sort; the group pass below is a stable radix sort.
        order = np.argsort(-key)
        k = key[order]
        if n > 1 and (k[1:] == k[:-1]).any():
            run = np.empty(n, dtype=np.int64)
            run[0] = 0
            np.cumsum(k[1:] != k[:-1], out=run[1:])
            order = order[np.argsort(run * n + order)]  # unique keys: any sort is exact
        small = group[order].astype(
            np.int16 if group.shape[0] and group.max() < 2**15 else np.int64
        )
        return order[np.argsort(small, kind="stable")]  # radix sort for int16

    def group_rank(self, sorted_group: Any) -> Any:
        """Position of each element within its run of equal values in a sorted array."""
        n = sorted_group.shape[0]
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        counts = np.bincount(sorted_group)
        start = np.cumsum(counts) - counts
        return np.arange(n, dtype=np.int64) - start[sorted_group]


class TorchOps:
    """torch implementations on the scores' device (float64 scores, int64 indices)."""

    name = "torch"

    def __init__(self, device: Any) -> None:
        import torch

        self.torch = torch
        self.device = device
        self.inf = float("inf")

    def full(self, n: int, value: float) -> Any:
        return self.torch.full((n,), value, dtype=self.torch.float64, device=self.device)

    def full_int(self, n: int, value: int) -> Any:
        return self.torch.full((n,), value, dtype=self.torch.int64, device=self.device)

    def arange(self, n: int) -> Any:
        return self.torch.arange(n, dtype=self.torch.int64, device=self.device)

    def zeros_bool(self, *shape: int) -> Any:
        return self.torch.zeros(shape, dtype=self.torch.bool, device=self.device)

    def as_int(self, x: Any) -> Any:
        return self.torch.as_tensor(np.asarray(x), dtype=self.torch.int64, device=self.device)

    def as_float(self, x: Any) -> Any:
        return self.torch.as_tensor(x, dtype=self.torch.float64, device=self.device)

    def to_numpy(self, x: Any) -> np.ndarray:
        return x.detach().cpu().numpy()

    def from_numpy(self, x: np.ndarray, like: Any) -> Any:
        return self.torch.as_tensor(x, device=self.device)

    def top2(self, v: Any) -> tuple[Any, Any, Any]:
        j1 = v.argmax(dim=1)
        rows = self.torch.arange(v.shape[0], device=v.device)
        w1 = v[rows, j1]
        v[rows, j1] = -self.inf
        w2 = v.max(dim=1).values
        return j1, w1, w2

    def row_max(self, v: Any) -> Any:
        return v.max(dim=1).values

    def row_min(self, v: Any) -> Any:
        return v.min(dim=1).values

    def isneginf(self, x: Any) -> Any:
        return self.torch.isneginf(x)

    def abs(self, x: Any) -> Any:
        return x.abs()

    def argmax_rows(self, v: Any) -> Any:
        return v.argmax(dim=1)

    def bincount(self, x: Any, n: int) -> Any:
        return self.torch.bincount(x, minlength=n).long()

    def scatter_min_(self, target: Any, idx: Any, values: Any) -> None:
        target.scatter_reduce_(0, idx, values, reduce="amin", include_self=True)

    def scatter_max_(self, target: Any, idx: Any, values: Any) -> None:
        target.scatter_reduce_(0, idx, values, reduce="amax", include_self=True)

    def nonzero(self, mask: Any) -> Any:
        return self.torch.nonzero(mask).flatten()

    def any(self, mask: Any) -> bool:
        return bool(mask.any())

    def sum(self, x: Any) -> float:
        return float(x.sum())

    def cat(self, *xs: Any) -> Any:
        return self.torch.cat(xs)

    def where(self, cond: Any, a: Any, b: Any) -> Any:
        return self.torch.where(cond, a, b)

    def clip_min(self, x: Any, lo: float) -> Any:
        return x.clamp_min(lo)

    def order_by(self, group: Any, key: Any, tie: Any = None) -> Any:
        torch = self.torch
        if tie is not None:
            order = torch.argsort(tie, stable=True)
            order = order[torch.argsort(-key[order], stable=True)]
        else:
            order = torch.argsort(-key, stable=True)
        return order[torch.argsort(group[order], stable=True)]

    def group_rank(self, sorted_group: Any) -> Any:
        torch = self.torch
        start = torch.searchsorted(sorted_group, sorted_group, right=False)
        return torch.arange(sorted_group.shape[0], device=sorted_group.device) - start


def ops_for(scores: Any) -> NumpyOps | TorchOps:
    """The back-end matching the type of ``scores`` (numpy array or torch tensor)."""
    if isinstance(scores, np.ndarray):
        return NumpyOps()
    return TorchOps(scores.device)

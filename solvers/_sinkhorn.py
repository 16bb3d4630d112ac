"""Entropic optimal transport (log-domain Sinkhorn) for balanced assignment.

Solves ``max_P <P, S> + tau * H(P)`` over ``P >= 0`` with row sums 1 and column sums ``c``
(a zero-score dummy row of mass ``sum(c) - T`` absorbs spare capacity). In the log domain
(stable for any score scale)::

    f_t = -tau * logsumexp_e ((S_te + g_e) / tau)
    g_e = tau * log c_e - tau * logsumexp_t ((S_te + f_t) / tau)
    P_te = exp((S_te + f_t + g_e) / tau)

The plan is rounded to an assignment that meets the capacities exactly by capacity-aware
greedy on ``log P`` (i.e. on ``S_te + g_e``: f_t is constant along a row), and ``p = -g``
serves as the expert prices of the dual certificate.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["sinkhorn_potentials", "sinkhorn_potentials_numpy"]


def _lse(A: np.ndarray, axis: int, *, overwrite: bool = False) -> np.ndarray:
    """logsumexp along ``axis``; ``overwrite``: ``A`` is a scratch buffer, computed in
    place (the same operations in the same order: bit-identical, 3-4x faster on CPU)."""
    m = A.max(axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    if overwrite:
        np.subtract(A, m, out=A)
        exps = np.exp(A, out=A)
    else:
        exps = np.exp(A - m)
    return (np.log(exps.sum(axis=axis, keepdims=True)) + m).squeeze(axis)


def sinkhorn_potentials_numpy(
    S: np.ndarray, cap: np.ndarray, *, tau: float, max_iter: int, tol: float
) -> tuple[np.ndarray, int]:
    """numpy twin of :func:`sinkhorn_potentials` (CPU inputs): ``(g [E], iterations)``."""
    T, E = S.shape
    K = float(cap.sum()) - T
    with np.errstate(divide="ignore"):
        log_c = np.where(cap > 0, np.log(np.maximum(cap, 1).astype(np.float64)), -np.inf)
    X = S / tau
    XT = np.ascontiguousarray(X.T)
    g = np.zeros(E)
    rows_buf, cols_buf = np.empty_like(X), np.empty((E, T + (K > 0)))  # scratch, reused
    it = 0
    while it < max_iter:
        it += 1
        f = -_lse(np.add(X, g, out=rows_buf), axis=1, overwrite=True)  # [T]
        np.add(XT, f, out=cols_buf[:, :T])  # [E, T]
        if K > 0:  # the dummy row's column (a concatenation, written in place)
            cols_buf[:, T] = np.log(K) - _lse(g[None, :], axis=1)[0]
        lse = _lse(cols_buf, axis=1, overwrite=True)
        g_new = np.where(cap > 0, log_c - lse, -1e300)
        err = float(np.abs(np.exp(lse + g) - cap).sum()) / max(T, 1)
        g = g_new
        if err < tol:
            break
    return g * tau, it


def sinkhorn_potentials(
    S: Any, cap: Any, *, tau: float, max_iter: int, tol: float
) -> tuple[Any, int]:
    """Column potentials ``g [E]`` of the entropic plan (torch float64, any device).

    Stops when the column marginals are within ``tol`` (relative to T) or after
    ``max_iter`` sweeps; returns ``(g, iterations)``.
    """
    import torch

    T, E = S.shape
    K = float(cap.sum()) - T  # dummy mass
    log_c = torch.log(cap.to(S.dtype).clamp_min(1e-300))
    log_c = torch.where(cap > 0, log_c, torch.full_like(log_c, float("-inf")))
    X = S / tau
    g = torch.zeros(E, dtype=S.dtype, device=S.device)
    it = 0
    while it < max_iter:
        it += 1
        f = -torch.logsumexp(X + g, dim=1)  # [T]   (potentials divided by tau)
        cols = X + f[:, None]
        if K > 0:  # the dummy row: zero scores, mass K
            fd = torch.log(torch.tensor(K, dtype=S.dtype, device=S.device)) - torch.logsumexp(g, 0)
            lse = torch.logsumexp(torch.cat([cols, fd.expand(1, E)], dim=0), dim=0)
        else:
            lse = torch.logsumexp(cols, dim=0)
        g_new = log_c - lse
        g_new = torch.where(cap > 0, g_new, torch.full_like(g_new, -1e300))
        # marginal error of the previous g (one sweep behind, saves a pass)
        err = float((torch.exp(lse + g) - cap).abs().sum()) / max(T, 1)
        g = g_new
        if err < tol:
            break
    return g * tau, it

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

__all__ = ["sinkhorn_potentials"]


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

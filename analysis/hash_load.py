"""Expected load of a hash-routing table (Roller et al. 2021) under token frequencies.

For a :class:`routelab.routers.HashRouter` with N hash functions over E experts each and
token frequencies ``counts [V]`` (e.g. ``torch.bincount(stream)`` of a training stream)::

    L_{j*E+e} = sum_{v: table[j, v] = e} counts[v]          [N*E]
    imbalance = max(L) / mean(L)                              (1.0 is perfectly even)

This is the load the table *would* give on a stream with those frequencies, computed from
the table alone (no forward pass); :func:`analysis.load_stats` measures a real Routing.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from routelab.routers.hash import HashRouter

__all__ = ["hash_expected_load", "hash_load_imbalance"]


def hash_expected_load(router: HashRouter, counts: object) -> Tensor:
    """Expected entries per expert, float64 ``[N*E]``, for token frequencies ``counts [V]``
    (torch, numpy or a sequence; finite, >= 0)."""
    if not isinstance(router, HashRouter):
        raise TypeError(f"router must be a HashRouter, got {type(router).__name__}")
    if isinstance(counts, Tensor):
        c = counts.detach().cpu()
    else:
        try:
            c = torch.from_numpy(np.asarray(counts))
        except TypeError as err:
            raise TypeError(f"counts must be a numeric vector [V]: {err}") from None
    if c.dtype == torch.bool or c.is_complex():
        raise TypeError(f"counts must be a real vector [V], got dtype {c.dtype}")
    c = c.to(torch.float64)
    if c.shape != (router.vocab_size,):
        raise ValueError(
            f"counts must have shape [V] = [{router.vocab_size}] (the table's vocab_size), "
            f"got {tuple(c.shape)}"
        )
    if not bool(torch.isfinite(c).all()) or bool((c < 0).any()):
        raise ValueError("counts must be finite and >= 0")
    table = router.table.view(router.num_hashes, -1).cpu()
    offsets = torch.arange(router.num_hashes)[:, None] * router.experts_per_hash
    flat = (table + offsets).reshape(-1)
    return torch.bincount(flat, weights=c.repeat(router.num_hashes), minlength=router.num_experts)


def hash_load_imbalance(router: HashRouter, counts: object) -> float:
    """``max / mean`` of :func:`hash_expected_load` (1.0 is perfectly even, also for an
    all-zero ``counts``)."""
    load = hash_expected_load(router, counts)
    mean = float(load.mean())
    return float(load.max()) / mean if mean > 0 else 1.0

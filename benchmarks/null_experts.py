"""Null experts cost nothing: MoE++'s zero / copy / constant experts beside FFN experts.

Run: ``python benchmarks/null_experts.py`` (``--quick`` for a small size). One run, side
by side, interleaved (``_timing.time_side_by_side``; CPU time of the one thread, which
other jobs on a shared machine disturb less than wall time), forward + backward, fp32,
at the fine-grained config (T = 8192, d = 512, h = 256, E_ffn = 64, k = 8) plus 4 null
experts (1 zero, 1 copy, 2 constant). Every token has k = 8 entries, of
which m go to null experts (m = 0, 2, 4: a null fraction f = m / k of 0, 25% and 50%).

- ``FFNExperts, k FFN entries``: plain top-8 over the 64 FFN experts (the reference).
- ``NullExperts, m null``: the MoE++ executor on the mixed routing.
- ``FFNExperts, k - m FFN entries``: FFNExperts on exactly the FFN entries of that
  routing, what the mixed routing must cost if its null entries are free.

Reported: ``NullExperts / FFNExperts(same FFN entries)`` (1.0 means the null entries
cost nothing beyond the FFN work; the excess is the copy/constant gather-scatter and
the entry filter) and ``NullExperts / FFNExperts(k entries)`` (about ``1 - f``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from _timing import single_thread_cli, time_side_by_side  # first: keeps benchmarks/ off sys.path

from routelab import FFNExperts, Routing
from routelab.null_experts import NullExperts

CONFIG = (8192, 512, 256, 64, 8)
QUICK = (1024, 128, 64, 64, 8)
NULL = {"num_zero": 1, "num_copy": 1, "num_constant": 2}
NULL_PER_TOKEN = (0, 2, 4)


def mixed_routing(T: int, E_ffn: int, k: int, m: int, gen: torch.Generator) -> Routing:
    """Every token: k - m distinct FFN experts and m distinct null experts (ids >= E_ffn)."""
    num_null = sum(NULL.values())
    ffn = torch.rand(T, E_ffn, generator=gen).argsort(dim=1)[:, : k - m]
    null = torch.rand(T, num_null, generator=gen).argsort(dim=1)[:, :m] + E_ffn
    idx = torch.cat([ffn, null], dim=1)
    weights = torch.softmax(torch.randn(T, k, generator=gen), dim=1).requires_grad_(True)
    return Routing.from_topk(idx, weights, E_ffn + num_null)


def step(experts: torch.nn.Module, x: torch.Tensor, routing: Routing, grad: torch.Tensor):
    def run() -> None:
        experts(x, routing).backward(grad)

    return run


def bench(T: int, d: int, h: int, E: int, k: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    ffn = FFNExperts(E, d, h)
    layer = NullExperts(ffn, **NULL)
    x = torch.randn(T, d, requires_grad=True)
    grad = torch.randn(T, d)
    variants: dict[str, Callable[[], None]] = {}
    for m in NULL_PER_TOKEN:
        routing = mixed_routing(T, E, k, m, gen)
        variants[f"NullExperts, {m} null"] = step(layer, x, routing, grad)
        subset = layer.ffn_routing(routing)
        subset = subset.with_weight(subset.weight.detach().requires_grad_(True))
        variants[f"FFNExperts, {k - m} FFN entries"] = step(ffn, x, subset, grad)
    return time_side_by_side(variants, repeats=repeats, clock=time.thread_time)


def main() -> None:
    args = single_thread_cli(__doc__)
    T, d, h, E, k = QUICK if args.quick else CONFIG
    print(f"T={T} d={d} h={h} E_ffn={E} k={k} null experts: {NULL}")
    times = bench(T, d, h, E, k, args.repeats)
    full = times[f"FFNExperts, {k} FFN entries"]
    for m in NULL_PER_TOKEN:
        null, same = times[f"NullExperts, {m} null"], times[f"FFNExperts, {k - m} FFN entries"]
        print(
            f"  {m} of {k} entries null ({m / k:4.0%}):  NullExperts {null * 1e3:8.1f} ms   "
            f"FFNExperts on its {k - m} FFN entries {same * 1e3:8.1f} ms   "
            f"ratio {null / same:.3f}   vs all-FFN top-{k} {null / full:.3f}"
        )


if __name__ == "__main__":
    main()

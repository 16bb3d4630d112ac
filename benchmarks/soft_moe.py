"""Soft MoE's cost beyond its experts: dispatch, combine and slot logits.

Run: ``python benchmarks/soft_moe.py`` (``--quick`` for a small size). One run, side by
side, interleaved (``_timing.time_side_by_side``, thread CPU time), forward + backward,
fp32, one thread, at the fine-grained config (T = 8192, d = 512, h = 256, E = 64):

- ``FFNExperts top-k``: E FFN experts on a fixed top-8 routing (the reference of
  ``benchmarks/routers.py``).
- ``SoftMoE``: the whole layer on groups of S = 512 tokens with ``n = E * p`` slots
  (p = S / E: as many slots as tokens, the paper's usual choice; so its experts run T
  rows, a top-1 layer's work).
- ``SoftMoE experts only``: the same experts on the same number of slot rows.

Reported: ``(SoftMoE - experts only) / FFNExperts top-k``, the layer's own overhead as a
fraction of the top-k expert time (the issue's measure for routers). Per group the
mixing costs about ``6 S n d`` FLOPs forward against ``4 n d h`` for the experts, so
the overhead grows with S / h.
"""

from __future__ import annotations

import time

import torch
from _timing import single_thread_cli, time_side_by_side  # first: keeps benchmarks/ off sys.path

from routelab import FFNExperts, Routing
from routelab.soft_moe import SoftMoE

CONFIG = (8192, 512, 256, 64, 8, 512)  # T, d, h, E, k, S
QUICK = (1024, 128, 64, 64, 8, 128)


def bench(T: int, d: int, h: int, E: int, k: int, S: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    x = torch.randn(T, d, requires_grad=True)
    grad = torch.randn(T, d)
    experts = FFNExperts(E, d, h)
    idx = torch.randn(T, E).topk(k, dim=1).indices
    topk = Routing.from_topk(idx, torch.full((T, k), 1.0 / k, requires_grad=True), E)
    p = max(1, S // E)
    soft = SoftMoE(d, E, FFNExperts(E, d, h), slots_per_expert=p, group_size=S)
    rows = -(-T // S) * E * p
    slot_x = torch.randn(rows, d, requires_grad=True)
    slot_ids = torch.arange(rows)
    slot_expert = slot_ids.remainder(E * p).div(p, rounding_mode="floor")
    slot_routing = Routing(slot_ids, slot_expert, torch.ones(rows), rows, E)
    slot_grad = torch.randn(rows, d)
    variants = {
        "FFNExperts top-k": lambda: experts(x, topk).backward(grad),
        "SoftMoE": lambda: soft(x).output.backward(grad),
        "SoftMoE experts only": lambda: soft.experts(slot_x, slot_routing).backward(slot_grad),
    }
    return time_side_by_side(variants, repeats=repeats, clock=time.thread_time)


def main() -> None:
    args = single_thread_cli(__doc__)
    T, d, h, E, k, S = QUICK if args.quick else CONFIG
    print(f"T={T} d={d} h={h} E={E} k={k} group size S={S}, slots per expert {max(1, S // E)}")
    times = bench(T, d, h, E, k, S, args.repeats)
    for name, seconds in times.items():
        print(f"  {name:22s} {seconds * 1e3:9.1f} ms")
    own = times["SoftMoE"] - times["SoftMoE experts only"]
    print(
        f"  SoftMoE beyond its experts / FFNExperts top-{k} = {own / times['FFNExperts top-k']:.3f}"
    )


if __name__ == "__main__":
    main()

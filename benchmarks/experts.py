"""Forward + backward of FFNExperts against the dense ceiling and the boolean-mask loop.

Run: ``python benchmarks/experts.py`` (``--quick`` for a small size). One run, side by
side, interleaved; prints the median times and the two ratios:

- ceiling: one dense FFN over T*k rows, the same FLOPs with no routing at all;
- mask loop: the per-expert loop of reference implementations (e.g. Hugging Face's
  Mixtral block): ``torch.where(indices == e)``, gather, expert, in-place ``index_add_``.

Targets (issue 2): FFNExperts at most 1.10x the ceiling and at least 2.5x faster than
the mask loop.
"""

from __future__ import annotations

import argparse

import torch
from _timing import time_side_by_side  # benchmarks/ is on sys.path when run as a script

from routelab import FFNExperts, Routing
from routelab.experts import expert_ffn


def mask_loop(experts: FFNExperts, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor):
    """The reference loop: per expert, find its (token, slot) pairs with a mask."""
    y = torch.zeros_like(x)
    params = experts.per_expert_params()  # per-expert weights, as a ModuleList would hold
    for e in range(experts.num_experts):
        token, slot = torch.where(idx == e)
        if token.numel() == 0:
            continue
        out = experts.run_expert(params[e], x[token]) * w[token, slot, None]
        y.index_add_(0, token, out)
    return y


def bench(T: int, d: int, h: int, E: int, k: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    experts = FFNExperts(E, d, h)
    dense = [torch.nn.Parameter(p.detach().clone()) for p in experts.per_expert_params()[0][:4]]
    x = torch.randn(T, d, requires_grad=True)
    logits = torch.randn(T, E)
    idx = logits.topk(k, dim=1).indices
    w = torch.softmax(logits.gather(1, idx), dim=1).requires_grad_(True)
    rows = torch.randn(T * k, d, requires_grad=True)
    grad_out = torch.randn(T, d)

    def sparse():
        experts(x, Routing.from_topk(idx, w, E)).backward(grad_out)

    def ceiling():
        expert_ffn(rows, *dense, None, "relu").backward(grad_out.repeat(k, 1))

    def reference():
        mask_loop(experts, x, idx, w).backward(grad_out)

    with torch.no_grad():  # the two paths agree before we time them
        torch.testing.assert_close(
            experts(x, Routing.from_topk(idx, w, E)),
            mask_loop(experts, x, idx, w),
            atol=1e-4,
            rtol=1e-4,
        )
    return time_side_by_side(
        {"FFNExperts": sparse, "dense ceiling": ceiling, "mask loop": reference},
        repeats=repeats,
    )


CONFIGS = {
    "issue": (8192, 512, 2048, 16, 2),  # the size issue 2 names
    "fine-grained": (8192, 256, 128, 64, 4),  # many small experts (DeepSeekMoE-like)
}
QUICK = {"issue": (1024, 128, 256, 16, 2), "fine-grained": (1024, 64, 32, 64, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"fp32, forward + backward, median of {args.repeats}, threads={torch.get_num_threads()}")
    for name, (T, d, h, E, k) in (QUICK if args.quick else CONFIGS).items():
        times = bench(T, d, h, E, k, args.repeats)
        print(f"[{name}] T={T} d={d} h={h} E={E} k={k}")
        for variant, seconds in times.items():
            print(f"  {variant:14s} {seconds * 1e3:9.1f} ms")
        ceiling = times["FFNExperts"] / times["dense ceiling"]
        loop = times["mask loop"] / times["FFNExperts"]
        print(f"  FFNExperts / dense ceiling = {ceiling:.3f}  (target <= 1.10)")
        print(f"  mask loop / FFNExperts     = {loop:.3f}  (target >= 2.5)")


if __name__ == "__main__":
    main()

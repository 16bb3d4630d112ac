"""bf16 router precision: how often a token's top-k expert set differs from the fp32
computation on the same bf16 values, for the old path (``x @ W`` in bf16, upcast after)
and for ``routelab.router.router_logits`` (fp32 operands), which every router now uses.

Run: ``python benchmarks/router_precision.py`` (``--quick`` for a small size). Prints,
per seed, the fraction of tokens whose top-k set differs from the fp32 reference and the
fraction of tokens whose k-th and (k+1)-th logits tie exactly, for both paths.
Default config (issue 10, item 1): d = 1024, E = 64, T = 8192, k = 2, a router
initialised as ``nn.Linear`` (uniform +-1/sqrt(d)), x ~ N(0, 1) rounded to bf16.
"""

from __future__ import annotations

import argparse

import _timing  # noqa: F401  (first: it keeps benchmarks/ off sys.path)
import torch

from routelab.router import router_logits


def topk_sets_differ(logits: torch.Tensor, reference: torch.Tensor, k: int) -> torch.Tensor:
    """bool ``[T]``: the top-k set of ``logits`` differs from ``reference``'s."""
    a = torch.topk(logits.float(), k, dim=-1).indices.sort(dim=-1).values
    b = torch.topk(reference, k, dim=-1).indices.sort(dim=-1).values
    return (a != b).any(dim=-1)


def kth_tie(logits: torch.Tensor, k: int) -> torch.Tensor:
    """bool ``[T]``: the k-th and (k+1)-th largest logits are exactly equal."""
    top = torch.topk(logits.float(), k + 1, dim=-1).values
    return top[:, k - 1] == top[:, k]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T = 1024, d = 256, one seed")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    d, E, T, k = (256, 64, 1024, 2) if args.quick else (1024, 64, 8192, 2)
    seeds = 1 if args.quick else args.seeds
    print(f"d = {d}, E = {E}, T = {T}, k = {k}; x and W rounded to bf16")
    print("seed  old path: differ  ties | router_logits: differ  ties")
    for seed in range(seeds):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(T, d, generator=gen).bfloat16()
        bound = 1 / d**0.5
        w = (torch.rand(d, E, generator=gen) * 2 * bound - bound).bfloat16()
        reference = x.double() @ w.double()  # exact on the bf16 values
        old = (x @ w).float()  # the pre-issue-10 path: bf16 matmul, upcast afterwards
        new = router_logits(x, w)
        row = []
        for logits in (old, new):
            row += [
                float(topk_sets_differ(logits, reference.float(), k).double().mean()),
                float(kth_tie(logits, k).double().mean()),
            ]
        print(f"{seed:4d}  {row[0]:15.4%} {row[1]:6.3%} | {row[2]:20.4%} {row[3]:6.3%}")


if __name__ == "__main__":
    main()

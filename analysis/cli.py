"""The ``routelab`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> int:
    """Route one batch through an MoE layer and print the load per expert."""
    import torch

    from routelab import FFNExperts, MoE
    from routelab.policies import CapacityPolicy
    from routelab.routers import TopKGate

    torch.manual_seed(args.seed)
    moe = MoE(
        TopKGate(args.d_model, args.experts, k=args.k),
        FFNExperts(args.experts, args.d_model, 4 * args.d_model),
        [CapacityPolicy(args.capacity_factor)],
    )
    x = torch.randn(args.tokens, args.d_model)
    out = moe(x)
    routing = out.routing
    load = routing.load().tolist()
    print(f"routed {routing.num_tokens} tokens to {routing.num_experts} experts (k={args.k})")
    print(f"capacity {routing.capacity} per expert, dropped {routing.dropped.num_entries} entries")
    width = max(load) if max(load) else 1
    for e, count in enumerate(load):
        print(f"expert {e:3d} {count:6d} {'#' * round(40 * count / width)}")
    print(f"output {tuple(out.output.shape)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="routelab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="route one batch through an MoE layer; print the load")
    demo.add_argument("--tokens", type=int, default=4096)
    demo.add_argument("--d-model", type=int, default=64)
    demo.add_argument("--experts", type=int, default=8)
    demo.add_argument("--k", type=int, default=2)
    demo.add_argument("--capacity-factor", type=float, default=1.25)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

"""The ``routelab`` command."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator, Sequence


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


def _settings(args: argparse.Namespace):
    from analysis.compare import CompareSettings

    settings = CompareSettings.quick_settings(args.seed) if args.quick else CompareSettings()
    settings.seed = args.seed
    for name in ("steps", "d_model", "num_experts", "batch_size", "lr"):
        value = getattr(args, name)
        if value is not None:
            setattr(settings, name, value)
    if settings.steps < 1:
        raise SystemExit(f"routelab: --steps must be >= 1, got {settings.steps}")
    return settings


@contextlib.contextmanager
def _threads(args: argparse.Namespace) -> Iterator[None]:
    """Run with ``--threads`` torch intra-op threads (default 1), restored afterwards.

    The models are tiny: one thread is fastest, and on a shared machine extra threads
    mostly spin.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads if args.threads is not None else 1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _compare(args: argparse.Namespace) -> int:
    """Train a small model per router on real data; write report.md, metrics.json, PNGs."""
    from analysis.compare import compare, results_table
    from analysis.data import DATASETS

    datasets = DATASETS if args.dataset == "all" else (args.dataset,)
    routers = [r for r in args.routers.split(",") if r] if args.routers else None
    with _threads(args):
        results = compare(
            args.out,
            routers=routers,
            datasets=datasets,
            settings=_settings(args),
            progress=not args.no_progress,
        )
    for name, rows in results.items():
        print(f"\n## {name}\n")
        print(results_table(rows))
    print(f"\nreport: {args.out}/report.md")
    return 0


def _parse_grid(specs: list[str]) -> dict[str, list[float]]:
    grid: dict[str, list[float]] = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        if not sep or not name or not values:
            raise SystemExit(f"routelab: --grid takes option=v1,v2,...; got {spec!r}")
        try:
            grid[name] = [float(v) for v in values.split(",")]
        except ValueError:
            raise SystemExit(f"routelab: --grid values must be numbers, got {spec!r}") from None
    return grid


def _sweep(args: argparse.Namespace) -> int:
    """A grid over loss coefficients; the balance table of every cell."""
    from analysis.compare import sweep

    grid = _parse_grid(args.grid) if args.grid else None
    with _threads(args):
        sweep(
            args.out,
            router=args.router,
            grid=grid,
            dataset=args.dataset,
            settings=_settings(args),
            progress=not args.no_progress,
        )
    print((__import__("pathlib").Path(args.out) / "sweep.md").read_text())
    return 0


def _training_options(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--out", default=out, help=f"report folder (default {out})")
    p.add_argument("--steps", type=int, default=None, help="training steps per router (300)")
    p.add_argument("--d-model", dest="d_model", type=int, default=None, help="width d (32)")
    p.add_argument("--experts", dest="num_experts", type=int, default=None, help="E (8)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=None, help="(256)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (3e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes and few steps (tests)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


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

    from analysis.registry import REGISTRY

    cmp = sub.add_parser(
        "compare",
        help="train a small MoE model per router on real data; write a report folder",
        description="Routers: " + ", ".join(REGISTRY),
    )
    cmp.add_argument(
        "--routers", default=None, help="comma-separated router names (default: all available)"
    )
    cmp.add_argument("--dataset", choices=("all", "tokens", "digits"), default="all")
    _training_options(cmp, "reports/compare")
    cmp.set_defaults(func=_compare)

    swp = sub.add_parser("sweep", help="grid over loss coefficients; balance table per cell")
    swp.add_argument("--router", default="noisy-top2", help="router name (noisy-top2)")
    swp.add_argument(
        "--grid",
        action="append",
        default=None,
        help="option=v1,v2,... (repeat for a second axis; default "
        "importance_weight and load_weight over 0,0.01,0.1,1)",
    )
    swp.add_argument("--dataset", choices=("tokens", "digits"), default="digits")
    _training_options(swp, "reports/sweep")
    swp.set_defaults(func=_sweep)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

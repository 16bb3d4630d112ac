"""routelab: compare Mixture-of-Experts routers on real data, sweep a router's options,
route a demo batch.

Every mistake on the command line prints one line "routelab: error: ..." and exits
with status 2 before any training starts.
"""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

__all__ = [
    "SUBCOMMANDS",
    "UsageError",
    "build_parser",
    "finite_float",
    "main",
    "nonnegative_int",
    "positive_float",
    "positive_int",
]


class UsageError(Exception):
    """A command-line mistake found after parsing; main() prints it as one line, exit 2."""


class _Formatter(argparse.HelpFormatter):
    """argparse's help layout without breaking lines inside hyphenated names."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return textwrap.fill(
            " ".join(text.split()),
            width,
            initial_indent=indent,
            subsequent_indent=indent,
            break_on_hyphens=False,
        )


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``routelab: error: MESSAGE (see ... --help)``) and
    help text that keeps hyphenated names whole."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"routelab: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------------- argument types
def _number(text: str, kind: type, what: str, test: Callable[[Any], bool]) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if not test(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    return _number(text, int, "an int >= 1", lambda v: v >= 1)


def nonnegative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    return _number(text, int, "an int >= 0", lambda v: v >= 0)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    return _number(text, float, "a finite number > 0", lambda v: math.isfinite(v) and v > 0)


def finite_float(text: str) -> float:
    """argparse type: a finite number."""
    return _number(text, float, "a finite number", math.isfinite)


def _router_names(text: str) -> list[str]:
    """``--routers a,b,c``: names separated by commas (no spaces, none empty)."""
    names = text.split(",")
    if any(not n for n in names):
        raise argparse.ArgumentTypeError(
            f"takes router names separated by commas, got {text!r} (an empty name)"
        )
    return names


# ---------------------------------------------------------------------- demo
def _add_demo(sub: Any) -> None:
    demo = sub.add_parser(
        "demo",
        help="route one random batch through an MoE layer; print the load per expert",
        description="Route one random batch through an MoE layer with a capacity policy "
        "and print the load per expert. --router takes any compare row (default: top-k).",
    )
    demo.add_argument("--router", default=None, help="a compare row name (default: top-k gate)")
    demo.add_argument("--tokens", type=positive_int, default=4096)
    demo.add_argument("--d-model", type=positive_int, default=64)
    demo.add_argument("--experts", type=positive_int, default=8)
    demo.add_argument("--k", type=positive_int, default=2, help="experts per token (top-k gate)")
    demo.add_argument("--capacity-factor", type=positive_float, default=1.25)
    demo.add_argument("--seed", type=nonnegative_int, default=0)
    demo.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    import torch

    from routelab import FFNExperts, MoE
    from routelab.policies import CapacityPolicy
    from routelab.routers import TopKGate

    if args.k > args.experts:
        raise UsageError(f"--k {args.k} needs at least as many --experts, got {args.experts}")
    torch.manual_seed(args.seed)
    token_ids = torch.randint(0, 1000, (args.tokens,))
    if args.router is None:
        moe = MoE(
            TopKGate(args.d_model, args.experts, k=args.k),
            FFNExperts(args.experts, args.d_model, 4 * args.d_model),
            [CapacityPolicy(args.capacity_factor)],
        )
        name = f"top-{args.k} gate"
    else:
        row = _row(args.router)
        moe = _build_checked(row, args.d_model, args.experts, _stand_in_data(token_ids))
        if hasattr(moe, "policies"):  # a SoftMoE layer has none (nothing is dropped)
            moe.policies.append(CapacityPolicy(args.capacity_factor))
        name = f"{row.name}: {row.configuration()}"
    x = torch.randn(args.tokens, args.d_model)
    out = moe(x, token_ids)
    routing = out.routing
    load = routing.load().tolist()
    print(f"routed {routing.num_tokens} tokens to {routing.num_experts} experts ({name})")
    dropped = routing.dropped.num_entries if routing.dropped is not None else 0
    print(f"capacity {routing.capacity} per expert, dropped {dropped} entries")
    width = max(load) if max(load) else 1
    for e, count in enumerate(load):
        print(f"expert {e:3d} {count:6d} {'#' * round(40 * count / width)}")
    print(f"output {tuple(out.output.shape)}")
    return 0


def _row(name: str):
    from analysis.registry import resolve_routers

    try:
        (row,) = resolve_routers([name])
    except ValueError as err:
        raise UsageError(str(err)) from None
    return row


class _StandIn:
    """Data a row's builder may ask for, made up (to check options before training)."""

    def __init__(self, token_ids: Any) -> None:
        import torch

        self.name = "stand-in"
        self.vocab_size = int(token_ids.max()) + 1 if token_ids.numel() else 1
        self.fit_token_ids = token_ids
        self.embeddings = torch.randn(
            self.vocab_size, 8, generator=torch.Generator().manual_seed(0)
        )


def _stand_in_data(token_ids: Any = None) -> _StandIn:
    import torch

    if token_ids is None:
        token_ids = torch.arange(64) % 32
    return _StandIn(token_ids)


def _build_checked(row: Any, d_model: int, num_experts: int, data: Any) -> Any:
    """``row.build_layer`` or a UsageError saying why this row cannot use these sizes."""
    try:
        return row.build_layer(d_model, num_experts, data)
    except (ValueError, TypeError) as err:
        raise UsageError(
            f"router {row.name!r} cannot run with --experts {num_experts} --d-model {d_model} "
            f"as {row.configuration()}: {err}"
        ) from None


# ---------------------------------------------------------------------- compare / sweep
def _training_options(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--out", default=out, help=f"report folder (default {out})")
    p.add_argument(
        "--overwrite", action="store_true", help="replace a different run already in --out"
    )
    p.add_argument(
        "--steps", type=positive_int, default=None, help="training steps per model (300)"
    )
    p.add_argument(
        "--d-model", dest="d_model", type=positive_int, default=None, help="width d (32)"
    )
    p.add_argument("--experts", dest="num_experts", type=positive_int, default=None, help="E (8)")
    p.add_argument("--batch-size", dest="batch_size", type=positive_int, default=None, help="(256)")
    p.add_argument("--lr", type=positive_float, default=None, help="Adam learning rate (3e-3)")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument(
        "--shuffles",
        type=positive_int,
        default=None,
        help="label shuffles for the chance level (10)",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes and few steps (tests)")
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads to use: this many worker processes, one training run and one torch "
        "thread each (default: every core available). The models are small, so torch's own "
        "intra-op threads do not pay: two of them per run were 10x slower on a busy 2-core "
        "machine (OpenMP threads spin-waiting for each other at every small operation).",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _settings(args: argparse.Namespace):
    from analysis.compare import CompareSettings

    settings = CompareSettings.quick_settings(args.seed) if args.quick else CompareSettings()
    settings.seed = args.seed
    for name in ("steps", "d_model", "num_experts", "batch_size", "lr", "shuffles"):
        value = getattr(args, name)
        if value is not None:
            setattr(settings, name, value)
    try:
        return settings.validate()
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from None


def _check_rows(rows: Sequence[Any], settings: Any) -> None:
    data = _stand_in_data()
    for row in rows:
        _build_checked(row, settings.d_model, settings.num_experts, data)


def _check_out(
    kind: str, out: str, settings: Any, jobs: Sequence[Any], overwrite: bool, extra=None
):
    from analysis.compare import RunDirectoryError, check_run_directory, run_fingerprint

    fingerprint = {**run_fingerprint(kind, settings, jobs), **(extra or {})}
    try:
        check_run_directory(out, fingerprint, overwrite)
    except RunDirectoryError as err:
        raise UsageError(str(err)) from None


def _add_compare(sub: Any) -> None:
    from analysis.registry import default_rows

    cmp = sub.add_parser(
        "compare",
        help="train a small MoE model per router on real data; write a report folder",
        description="Train one small MoE model per router row and data set (the same "
        "batches for every row), measure balance (the router's choice and what was "
        "executed), specialisation against a shuffled-label chance level, stability and "
        "the task metric, and write report.md, metrics.json and plots into --out. "
        "Default rows: " + ", ".join(r.name for r in default_rows()) + ".",
    )
    cmp.add_argument(
        "--routers",
        type=_router_names,
        default=None,
        help="comma-separated row names, no spaces (default: every default row)",
    )
    cmp.add_argument("--dataset", choices=("all", "tokens", "digits"), default="all")
    _training_options(cmp, "reports/compare")
    cmp.set_defaults(func=_compare)


def _compare(args: argparse.Namespace) -> int:
    from analysis.compare import compare, plan_jobs
    from analysis.data import DATASETS
    from analysis.registry import default_rows
    from analysis.report import results_table

    settings = _settings(args)
    datasets = DATASETS if args.dataset == "all" else (args.dataset,)
    rows = [_row(n) for n in args.routers] if args.routers else default_rows()
    if len({r.name for r in rows}) != len(rows):
        raise UsageError(f"--routers names a router twice: {','.join(args.routers)}")
    if args.routers and args.dataset != "all":
        for row in rows:
            if args.dataset not in row.datasets:
                raise UsageError(
                    f"router {row.name!r} runs on {', '.join(row.datasets)} only, not on "
                    f"{args.dataset} (see the report's notes on hash rows)"
                )
    jobs = plan_jobs(rows, datasets)
    _check_rows(rows, settings)
    _check_out("compare", args.out, settings, jobs, args.overwrite)
    results = compare(
        args.out,
        routers=[r.name for r in rows],
        datasets=datasets,
        settings=settings,
        workers=args.threads,
        progress=not args.no_progress,
        overwrite=args.overwrite,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    for name, rs in results.items():
        print(f"\n## {name}\n")
        print(results_table(rs))
    print(f"\nreport: {args.out}/report.md")
    return 0


def _parse_grid(specs: list[str]) -> dict[str, list[float]]:
    grid: dict[str, list[float]] = {}  # int or float values
    for spec in specs:
        name, sep, values = spec.partition("=")
        if not sep or not name or not values:
            raise UsageError(f"--grid takes OPTION=v1,v2,...; got {spec!r}")
        try:  # "10" is an int, "0.5" or "1e-3" a float
            numbers = [
                int(v) if v.strip().lstrip("+-").isdigit() else float(v) for v in values.split(",")
            ]
        except ValueError:
            raise UsageError(f"--grid values must be numbers, got {spec!r}") from None
        if not all(math.isfinite(v) for v in numbers):
            raise UsageError(f"--grid values must be finite numbers, got {spec!r}")
        if name in grid:
            raise UsageError(f"--grid names {name!r} twice")
        grid[name] = numbers
    if len(grid) > 2:
        raise UsageError(f"--grid varies one or two options, got {len(grid)}")
    return grid


def _add_sweep(sub: Any, router: str | None = None) -> None:
    from analysis.registry import REGISTRY

    default = "noisy-top2"
    chosen = router if router in REGISTRY else default
    row = REGISTRY[chosen]
    listing = "\n".join(
        f"  {name:<24} {o.value!r:<10} ({'router' if o.target == 'router' else o.target})"
        for name, o in row.sweepable().items()
    )
    description = textwrap.fill(
        "Train one router row for every cell of a grid over one or two of its options "
        "(router or policy options: capacity factor, loss weights, k, bias rate, ...) and "
        "write sweep.md, sweep.json and sweep.png.",
        width=88,
        break_on_hyphens=False,
    )
    swp = sub.add_parser(
        "sweep",
        help="train one router over a grid of its options; a table and a plot per quantity",
        description=description,
        epilog=f"Sweepable options of {chosen} ({row.configuration()}), now:\n"
        + (listing or "  (none)")
        + "\n\nroutelab sweep --router NAME --help lists another row's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    swp.add_argument("--router", default=default, help=f"a compare row name ({default})")
    swp.add_argument(
        "--grid",
        action="append",
        default=None,
        help="OPTION=v1,v2,... (repeat for a second axis; default for noisy-top2: "
        "importance_weight and load_weight over 0,0.01,0.1,1)",
    )
    swp.add_argument("--dataset", choices=("tokens", "digits"), default="digits")
    _training_options(swp, "reports/sweep")
    swp.set_defaults(func=_sweep)


def _sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    from analysis.compare import default_grid, sweep, sweep_jobs

    settings = _settings(args)
    row = _row(args.router)
    if args.dataset not in row.datasets:
        raise UsageError(
            f"router {row.name!r} runs on {', '.join(row.datasets)}, not {args.dataset}"
        )
    try:
        grid = _parse_grid(args.grid) if args.grid else default_grid(row)
        cells = [row.with_options(**{k: v}) for k, vs in grid.items() for v in vs]
    except ValueError as err:
        raise UsageError(str(err)) from None
    _check_rows(cells, settings)
    _, jobs = sweep_jobs(row.name, grid, args.dataset)
    _check_out("sweep", args.out, settings, jobs, args.overwrite, {"grid": grid})
    sweep(
        args.out,
        router=row.name,
        grid=grid,
        dataset=args.dataset,
        settings=settings,
        workers=args.threads,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    print((Path(args.out) / "sweep.md").read_text())
    return 0


def _add_inspect_model(sub: Any) -> None:
    p = sub.add_parser(
        "inspect-model",
        help="routing balance of a Hugging Face MoE checkpoint on a text; write a report",
        description="Load a local save_pretrained checkpoint (model and tokenizer; nothing is "
        "downloaded), run it over --text and write report.md, metrics.json and plots: load "
        "balance per layer, counterfactual capacity and balanced assignment, router swaps "
        "with the change in next-token loss, expert x domain specialisation.",
    )
    p.add_argument("path", help="checkpoint directory (save_pretrained)")
    p.add_argument(
        "--text",
        required=True,
        help="a text file, a directory of documents (domain: first path component), or "
        "'stdlib' (the standard library's source, domain: its package)",
    )
    p.add_argument("--out", default="reports/inspect-model", help="report folder")
    p.add_argument("--seq-len", dest="seq_len", type=positive_int, default=128)
    p.add_argument("--max-tokens", dest="max_tokens", type=positive_int, default=4096)
    p.add_argument(
        "--max-domains",
        dest="max_domains",
        type=positive_int,
        default=8,
        help="keep the domains with the most files (8)",
    )
    p.add_argument(
        "--batch-size",
        dest="batch_size",
        type=positive_int,
        default=1,
        help="windows per forward (1); capacity counterfactuals act per forward",
    )
    p.add_argument("--no-swaps", action="store_true", help="skip the router swaps")
    p.add_argument(
        "--swap-layers",
        default="auto",
        help="layers each swap replaces: auto (each alone, then all), all, or indices 0,3",
    )
    p.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads (1)")
    p.set_defaults(func=_inspect_model)


def _inspect_model(args: argparse.Namespace) -> int:
    from analysis.inspect_model import run_cli

    return run_cli(args, UsageError)


# ---------------------------------------------------------------------- lifelong
def _add_lifelong(sub: Any) -> None:
    p = sub.add_parser(
        "lifelong",
        help="Lifelong-MoE vs sequential fine-tuning on data streams; prune / merge; a report",
        description="Train a dense model, a fixed MoE and Lifelong-MoE (grow + freeze, with "
        "and without output distillation, with replay) phase after phase on the stdlib "
        "package families and class-incremental digits; measure every distribution after "
        "every phase (forgetting, forward transfer); prune and merge a trained layer by its "
        "routing loads and upcycle a dense one. Writes report.md, metrics.json and plots "
        "into --out.",
    )
    p.add_argument("--out", default="reports/lifelong", help="report folder")
    p.add_argument("--stream", choices=("all", "stdlib", "digits"), default="all")
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated subset of: dense, moe-finetune, lifelong-moe, lifelong-moe-noreg, "
        "lifelong-moe-replay, moe-replay (default: all)",
    )
    p.add_argument("--steps", type=positive_int, default=None, help="steps per phase (150)")
    p.add_argument("--grow", type=positive_int, default=None, help="experts added per phase (2)")
    p.add_argument(
        "--distill-weight",
        dest="distill_weight",
        type=positive_float,
        default=None,
        help="weight of Lifelong-MoE's output distillation (1.0)",
    )
    p.add_argument(
        "--no-prune", action="store_true", help="skip the prune / merge and upcycling studies"
    )
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes and few steps (tests)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads (1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_lifelong)


def _lifelong(args: argparse.Namespace) -> int:
    from analysis.lifelong import METHODS, run_cli

    methods = [m for m in (args.methods or "").split(",") if m] or list(METHODS)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise UsageError(
            f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}"
        )
    args.methods = methods
    return run_cli(args)


# ---------------------------------------------------------------------- the parser
# One function per subcommand: (subparsers) -> None, adding its parser with set_defaults(func=...).
# Add a subcommand by writing such a function and appending it here (notes/REGISTRY.txt).
SUBCOMMANDS: tuple[Callable[[Any], None], ...] = (
    _add_demo,
    _add_compare,
    _add_sweep,
    _add_inspect_model,
    _add_lifelong,
)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("routelab")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "unknown"


def _peek(argv: Sequence[str], option: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == option and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(option + "="):
            return arg.split("=", 1)[1]
    return None


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``routelab`` parser (``argv`` only selects which row ``sweep --help`` lists)."""
    parser = _Parser(prog="routelab", description=(__doc__ or "").strip())
    parser.add_argument("--version", action="version", version=f"routelab {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in SUBCOMMANDS:
        if add is _add_sweep:
            _add_sweep(sub, _peek(list(argv or []), "--router"))
        else:
            add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as err:
        print(f"routelab: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

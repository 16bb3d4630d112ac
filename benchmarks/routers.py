"""Router cost against expert execution: each gate's forward + backward, as a ratio to
FFNExperts forward + backward, at the fine-grained config of issue 17 (and the large one).

Run: ``python benchmarks/routers.py`` (``--quick`` for a small size). One run, side by
side, interleaved (``_timing.time_side_by_side``; the process's CPU time, ``--wall`` for
wall time); prints the median times and, for each gate, ``gate / FFNExperts``.

- FFNExperts: forward + backward of E FFN experts on a fixed top-k routing, fp32, at
  ``fine`` (T = 8192, d = 512, h = 256, E = 64, k = 8: the target's config) and
  ``large`` (T = 8192, d = 512, h = 2048, E = 16, k = 2); ``--configs`` picks.
- A gate: ``routing = gate(x)`` in training mode, then the backward of
  ``sum(weight * g) + aux_loss`` (g a fixed random upstream gradient for the combine
  weights), so routing, its auxiliary losses and their gradients are all counted.

Target (issue 17, item 3): every router at most 5% of the expert time at ``fine``, and
BASE's default at most the exact solver's time (the default is now ``method="exact"``). To add a router, add one line
to ``GATES``: a name and a factory ``(d_model, num_experts, k) -> Router``.
"""

from __future__ import annotations

import argparse
import subprocess
import time
from collections.abc import Callable

import torch
from _timing import time_side_by_side  # first: it keeps benchmarks/ off sys.path

from routelab import FFNExperts, Routing
from routelab.router import Router
from routelab.routers import (
    BASERouter,
    CosineTopKGate,
    DSelectKGate,
    ExpertChoiceRouter,
    HashRouter,
    MoEPlusPlusGate,
    NoisyTopKGate,
    ReMoEGate,
    SinkhornRouter,
    SoftmaxGate,
    SwitchGate,
    TopKGate,
    TopKRouter,
    TopPGate,
)

# name -> factory(d_model, num_experts, k)
GATES: dict[str, Callable[[int, int, int], Router]] = {
    "TopKGate": lambda d, E, k: TopKGate(d, E, k=k),
    "TopKRouter (DeepSeek-V3)": lambda d, E, k: TopKRouter.from_preset("deepseek-v3", d, E, k=k),
    "TopKRouter (Qwen global LBL)": lambda d, E, k: TopKRouter(
        d, E, k=k, global_balance_weight=1e-3
    ),
    "TopKRouter (sigmoid + bias)": lambda d, E, k: TopKRouter(
        d, E, k=k, score="sigmoid", selection_bias=True
    ),
    "NoisyTopKGate": lambda d, E, k: NoisyTopKGate(d, E, k=k),
    "SwitchGate": lambda d, E, k: SwitchGate(d, E, z_weight=1e-3),
    "CosineTopKGate": lambda d, E, k: CosineTopKGate(d, E, k=k),
    "TopPGate": lambda d, E, k: TopPGate(d, E),
    "ReMoEGate": lambda d, E, k: ReMoEGate(d, E, k=k),
    "MoEPlusPlusGate": lambda d, E, k: MoEPlusPlusGate(d, E, k=k),
    "SoftmaxGate": lambda d, E, k: SoftmaxGate(d, E),
    "DSelectKGate": lambda d, E, k: DSelectKGate(d, E, k=k, entropy_weight=1e-3),
    "DSelectKGate static": lambda d, E, k: DSelectKGate(
        d, E, k=k, entropy_weight=1e-3, per_example=False
    ),
    "ExpertChoiceRouter": lambda d, E, k: ExpertChoiceRouter(d, E, capacity_factor=float(k)),
    "BASERouter (default: exact)": lambda d, E, k: BASERouter(d, E),
    "BASERouter (auction)": lambda d, E, k: BASERouter(d, E, method="auction"),
    "SinkhornRouter": lambda d, E, k: SinkhornRouter(d, E),
    "HashRouter (random)": lambda d, E, k: HashRouter.fit(
        "random", E, d_model=d, vocab_size=VOCAB_SIZE
    ),
}

TARGET = 0.05
VOCAB_SIZE = 32000  # token ids for routers that need them


def gate_step(router: Router, x: torch.Tensor) -> Callable[[], None]:
    """One training step of the router alone: forward, then backward of weights + aux
    (a router without gradients, e.g. hashing, is timed on its forward only)."""
    gen = torch.Generator().manual_seed(1)
    upstream = torch.randn(x.shape[0] * router.num_experts, generator=gen)
    token_ids = None
    if router.requires_token_ids:  # hash routers
        token_ids = torch.randint(VOCAB_SIZE, (x.shape[0],), generator=gen)

    def step() -> None:
        routing = router(x, token_ids)
        loss = (routing.weight * upstream[: routing.num_entries]).sum() + routing.aux_loss
        if loss.requires_grad:
            loss.backward()

    return step


def bench(
    T: int, d: int, h: int, E: int, k: int, repeats: int, clock=time.process_time
) -> dict[str, float]:
    torch.manual_seed(0)
    experts = FFNExperts(E, d, h)
    x = torch.randn(T, d, requires_grad=True)
    logits = torch.randn(T, E)
    idx = logits.topk(k, dim=1).indices
    w = torch.softmax(logits.gather(1, idx), dim=1).requires_grad_(True)
    routing = Routing.from_topk(idx, w, E)
    grad_out = torch.randn(T, d)

    def run_experts() -> None:
        experts(x, routing).backward(grad_out)

    variants: dict[str, Callable[[], None]] = {"FFNExperts": run_experts}
    for name, factory in GATES.items():
        variants[name] = gate_step(factory(d, E, k).train(), x)
    return time_side_by_side(variants, repeats=repeats, clock=clock)


CONFIGS = {"fine": (8192, 512, 256, 64, 8), "large": (8192, 512, 2048, 16, 2)}
QUICK = {"fine": (1024, 128, 64, 64, 8), "large": (1024, 128, 256, 16, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--configs", default="fine,large", help="comma-separated subset")
    parser.add_argument("--markdown", action="store_true", help="a table row per router")
    parser.add_argument("--wall", action="store_true", help="wall time instead of CPU time")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    clock = "wall" if args.wall else "CPU (process)"
    print(f"fp32, forward + backward, median of {args.repeats}, threads=1, {clock} time")
    print(f"load: {load}")
    for config in args.configs.split(","):
        T, d, h, E, k = (QUICK if args.quick else CONFIGS)[config]
        print(f"[{config}] T={T} d={d} h={h} E={E} k={k}")
        times = bench(
            T, d, h, E, k, args.repeats, time.perf_counter if args.wall else time.process_time
        )
        reference = times["FFNExperts"]
        if args.markdown:
            print("| router | ms | router / FFNExperts |\n|---|---|---|")
            print(f"| FFNExperts | {reference * 1e3:.1f} | 1 |")
        else:
            print(f"  {'FFNExperts':26s} {reference * 1e3:9.2f} ms")
        for name in GATES:
            ratio = times[name] / reference
            if args.markdown:
                print(f"| {name} | {times[name] * 1e3:.1f} | {ratio:.2%} |")
            else:
                flag = "" if ratio <= TARGET else "  (over the 5% target)"
                print(f"  {name:26s} {times[name] * 1e3:9.2f} ms   {ratio:7.2%}{flag}")
        auction, exact = times["BASERouter (auction)"], times["BASERouter (default: exact)"]
        print(f"  BASE auction / exact (the default) = {auction / exact:.3f}")


if __name__ == "__main__":
    main()

"""Router cost against expert execution: each gate's forward + backward, as a ratio to
FFNExperts forward + backward at the foundation benchmark's size.

Run: ``python benchmarks/routers.py`` (``--quick`` for a small size). One run, side by
side, interleaved (``_timing.time_side_by_side``); prints the median times and, for each
gate, ``gate / FFNExperts``.

- FFNExperts: forward + backward of E FFN experts on a fixed top-k routing
  (T = 8192, d = 512, h = 2048, E = 16, k = 2, fp32).
- A gate: ``routing = gate(x)`` in training mode, then the backward of
  ``sum(weight * g) + aux_loss`` (g a fixed random upstream gradient for the combine
  weights), so routing, its auxiliary losses and their gradients are all counted.

Target (issue 3): the top-k family (TopKGate, NoisyTopKGate, SwitchGate) at most 5% of
the expert time. To add a router, add one line to ``GATES``: a name and a factory
``(d_model, num_experts, k) -> Router``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from _timing import time_side_by_side  # first: it keeps benchmarks/ off sys.path

from routelab import FFNExperts, Routing
from routelab.router import Router
from routelab.routers import (
    BASERouter,
    DSelectKGate,
    ExpertChoiceRouter,
    HashRouter,
    NoisyTopKGate,
    SinkhornRouter,
    SoftmaxGate,
    SwitchGate,
    TopKGate,
)

# name -> (factory(d_model, num_experts, k), in the top-k family with the 5% target)
GATES: dict[str, tuple[Callable[[int, int, int], Router], bool]] = {
    "TopKGate": (lambda d, E, k: TopKGate(d, E, k=k), True),
    "NoisyTopKGate": (lambda d, E, k: NoisyTopKGate(d, E, k=k), True),
    "SwitchGate": (lambda d, E, k: SwitchGate(d, E, z_weight=1e-3), True),
    "SoftmaxGate": (lambda d, E, k: SoftmaxGate(d, E), False),
    "DSelectKGate": (lambda d, E, k: DSelectKGate(d, E, k=k, entropy_weight=1e-3), False),
    "DSelectKGate static": (
        lambda d, E, k: DSelectKGate(d, E, k=k, entropy_weight=1e-3, per_example=False),
        False,
    ),
    "ExpertChoiceRouter": (
        lambda d, E, k: ExpertChoiceRouter(d, E, capacity_factor=float(k)),
        False,
    ),
    "BASERouter (auction)": (lambda d, E, k: BASERouter(d, E, method="auction"), False),
    "BASERouter (exact)": (lambda d, E, k: BASERouter(d, E, method="exact"), False),
    "SinkhornRouter": (lambda d, E, k: SinkhornRouter(d, E), False),
    "HashRouter (random)": (
        lambda d, E, k: HashRouter.fit("random", E, d_model=d, vocab_size=VOCAB_SIZE),
        False,
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


def bench(T: int, d: int, h: int, E: int, k: int, repeats: int) -> dict[str, float]:
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
    for name, (factory, _) in GATES.items():
        variants[name] = gate_step(factory(d, E, k).train(), x)
    return time_side_by_side(variants, repeats=repeats)


CONFIG = (8192, 512, 2048, 16, 2)  # the foundation benchmark's size
QUICK = (1024, 128, 256, 16, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    T, d, h, E, k = QUICK if args.quick else CONFIG
    print(f"fp32, forward + backward, median of {args.repeats}, threads={torch.get_num_threads()}")
    print(f"T={T} d={d} h={h} E={E} k={k}")
    times = bench(T, d, h, E, k, args.repeats)
    reference = times["FFNExperts"]
    print(f"  {'FFNExperts':22s} {reference * 1e3:9.2f} ms")
    for name, (_, topk_family) in GATES.items():
        ratio = times[name] / reference
        note = f"  (target <= {TARGET:.2f})" if topk_family else ""
        print(f"  {name:22s} {times[name] * 1e3:9.2f} ms   gate / FFNExperts = {ratio:.4f}{note}")


if __name__ == "__main__":
    main()

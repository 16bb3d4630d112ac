"""Forward + backward of FFNExperts against three peer implementations and the dense ceiling.

Run: ``python benchmarks/experts.py`` (``--quick`` for small sizes, ``--configs fine,many``
for a subset, ``--markdown`` for the README table). One run, side by side: the variants'
repeats are interleaved round-robin (``_timing.time_side_by_side``) so machine load hits
them alike; fp32, median of ``--repeats``, one intra-op thread unless ``--threads``. The
clock is the process's CPU time (``--wall`` for wall time): on a machine shared with other
jobs it is inflated far less than wall time (single-threaded; ``--threads`` > 1 needs
``--wall``).

Every variant computes the same layer, ``y_t = sum_j w_tj * FFN_{e_tj}(x_t)`` (ReLU FFN
with biases, the ``FFNExperts`` default), from the same top-k indices and weights, and
does only its own work inside the timing (inputs, upstream gradients and routings are
built before):

- FFNExperts: ``experts(x, routing).backward(grad_out)`` (routelab, default path), and
  "FFNExperts segment", the same with ``grouped_gemm=False`` (the segment kernel): the
  measurement behind the kernel rule in ``routelab/experts.py``;
- torchtitan-style: sort by expert, gather, ``torch._grouped_mm`` over the expert
  segments, weight, scatter-add (torchtitan's ``GroupedExperts``);
- HF loop: the Hugging Face Mixtral block's per-expert loop over separate per-expert
  weights (``torch.where`` on the expert mask, gather, expert, ``index_add_``);
- padded bmm: every expert's rows padded to the largest count, one ``torch.bmm`` per
  projection over ``[E, C, d]`` (GShard/Switch-style dispatch tensor without drops);
- dense ceiling: one dense FFN over ``T*k`` rows (the same FLOPs, no routing; its
  upstream gradient ``[T*k, d]`` is built before the timing).

Ratios printed per config: FFNExperts / dense ceiling, the fastest peer / FFNExperts
(>= 1 means FFNExperts is at least as fast), and ``MoE`` (TopKGate + FFNExperts)
against the sum of the router's own step and FFNExperts' step (issue 17, item 2).

``--compile`` times ``MoE(TopKGate, FFNExperts)`` eager against
``torch.compile(moe, fullgraph=True)`` (inductor, validation off) at the chosen configs;
``--routers`` picks other routers for it (``COMPILE_ROUTERS``).

Targets (issue 17): FFNExperts no slower than the fastest peer in every config; within
1.15x of the ceiling at the fine configs, 1.5x at E = 256, the HF loop's time or less at
the small batch; MoE within 1.05x of router + experts.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _timing import time_side_by_side  # benchmarks/ is on sys.path when run as a script

import routelab
from routelab import FFNExperts, MoE, Routing
from routelab.routers import TopKGate, TopKRouter

# name -> (T, d, h, E, k)
CONFIGS = {
    "large": (8192, 512, 2048, 16, 2),
    "fine": (8192, 512, 256, 64, 8),
    "fine-small": (8192, 256, 128, 64, 4),
    "many": (4096, 256, 64, 256, 8),
    "small batch": (64, 1024, 4096, 8, 2),
}
QUICK = {
    "large": (1024, 128, 256, 16, 2),
    "fine": (1024, 128, 64, 64, 8),
    "many": (512, 64, 16, 256, 8),
    "small batch": (16, 256, 512, 8, 2),
}
CEILING_TARGET = {"fine": 1.15, "fine-small": 1.15, "many": 1.5}


def _ffn(x, w_in, b_in, w_out, b_out):
    return torch.addmm(b_out, F.relu(torch.addmm(b_in, x, w_in)), w_out)


def torchtitan_style(x, idx, w, w_in, b_in, w_out, b_out):
    """Sort by expert, ``torch._grouped_mm`` over the segments, weight, scatter-add."""
    E = w_in.shape[0]
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token = order // idx.shape[1]
    expert = flat[order]
    offs = torch.cumsum(torch.bincount(flat, minlength=E), 0).to(torch.int32)
    xs = x[token]
    hidden = F.relu(torch._grouped_mm(xs, w_in, offs=offs) + b_in[expert])
    ys = torch._grouped_mm(hidden, w_out, offs=offs) + b_out[expert]
    ys = ys * w.reshape(-1)[order, None]
    return torch.zeros_like(x).index_add(0, token, ys)


def hf_loop(x, idx, w, params):
    """Hugging Face Mixtral's per-expert loop; ``params`` holds each expert's own tensors."""
    y = torch.zeros_like(x)
    mask = F.one_hot(idx, len(params)).permute(2, 1, 0)  # [E, k, T]
    hit = torch.nonzero(mask.sum(dim=(-1, -2)) > 0).flatten().tolist()
    for e in hit:
        slot, token = torch.where(mask[e])
        out = _ffn(x[token], *params[e]) * w[token, slot, None]
        y.index_add_(0, token, out)
    return y


def padded_bmm(x, idx, w, w_in, b_in, w_out, b_out):
    """Every expert's rows padded to the largest count: ``[E, C, d]``, one bmm each side."""
    E, d = w_in.shape[0], x.shape[1]
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E)
    capacity = int(counts.max())
    expert = flat[order]
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(flat.numel()) - starts[expert]
    token = order // idx.shape[1]
    buf = x.new_zeros(E, capacity, d).index_put((expert, slot), x[token])
    hidden = F.relu(torch.baddbmm(b_in[:, None], buf, w_in))
    out = torch.baddbmm(b_out[:, None], hidden, w_out)[expert, slot]
    return torch.zeros_like(x).index_add(0, token, out * w.reshape(-1)[order, None])


def router_step(router: TopKGate, x: torch.Tensor, upstream: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        routing = router(x)
        ((routing.weight * upstream).sum() + routing.aux_loss).backward()

    return step


def bench(
    T: int, d: int, h: int, E: int, k: int, repeats: int, clock=time.process_time
) -> dict[str, float]:
    torch.manual_seed(0)
    experts = FFNExperts(E, d, h)
    stacks = [experts.w_in, experts.b_in, experts.w_out, experts.b_out]
    peer = [torch.nn.Parameter(p.detach().clone()) for p in stacks]
    per_expert = [[torch.nn.Parameter(p[e].detach().clone()) for p in stacks] for e in range(E)]
    dense = [torch.nn.Parameter(p[0].detach().clone()) for p in stacks]
    x = torch.randn(T, d, requires_grad=True)
    logits = torch.randn(T, E)
    idx = logits.topk(k, dim=1).indices
    w = torch.softmax(logits.gather(1, idx), dim=1).requires_grad_(True)
    routing = Routing.from_topk(idx, w, E)
    grad_out = torch.randn(T, d)
    rows = torch.randn(T * k, d, requires_grad=True)
    grad_rows = torch.randn(T * k, d)
    router = TopKGate(d, E, k=k)
    moe = MoE(router, experts)
    upstream = torch.randn(T * k)

    segment = copy.copy(experts)  # the same parameters, the other kernel
    segment.grouped_gemm = False
    variants: dict[str, Callable[[], None]] = {
        "FFNExperts": lambda: experts(x, routing).backward(grad_out),
        "FFNExperts segment": lambda: segment(x, routing).backward(grad_out),
        "torchtitan-style": lambda: torchtitan_style(x, idx, w, *peer).backward(grad_out),
        "HF loop": lambda: hf_loop(x, idx, w, per_expert).backward(grad_out),
        "padded bmm": lambda: padded_bmm(x, idx, w, *peer).backward(grad_out),
        "dense ceiling": lambda: _ffn(rows, *dense).backward(grad_rows),
        "MoE (TopKGate)": lambda: moe(x).output.backward(grad_out),
        "TopKGate alone": router_step(router, x, upstream),
    }
    with torch.no_grad():  # every implementation computes the same layer
        reference = experts.dense_forward(x, routing) if T * E <= 2**16 else experts(x, routing)
        for name, fn in (
            ("torchtitan-style", lambda: torchtitan_style(x, idx, w, *peer)),
            ("HF loop", lambda: hf_loop(x, idx, w, per_expert)),
            ("padded bmm", lambda: padded_bmm(x, idx, w, *peer)),
            ("FFNExperts", lambda: experts(x, routing)),
        ):
            torch.testing.assert_close(fn(), reference, atol=1e-4, rtol=1e-4, msg=name)
    return time_side_by_side(variants, repeats=repeats, clock=clock)


# routers for --compile: name -> factory(d_model, num_experts, k)
COMPILE_ROUTERS: dict[str, Callable[[int, int, int], torch.nn.Module]] = {
    "TopKGate": lambda d, E, k: TopKGate(d, E, k=k),
    "deepseek-v3": lambda d, E, k: TopKRouter.from_preset("deepseek-v3", d, E, k=k),
    "qwen3-moe": lambda d, E, k: TopKRouter.from_preset("qwen3-moe", d, E, k=k),
}


def bench_compiled(
    T: int, d: int, h: int, E: int, k: int, repeats: int, clock, router: str = "TopKGate"
) -> dict[str, float]:
    """``MoE(router, FFNExperts)`` forward + backward, eager against
    ``torch.compile(fullgraph=True)`` (inductor), validation off (issue 17, item 5)."""
    torch.manual_seed(0)
    moe = MoE(COMPILE_ROUTERS[router](d, E, k), FFNExperts(E, d, h))
    x = torch.randn(T, d, requires_grad=True)
    grad_out = torch.randn(T, d)
    with routelab.validation(False):
        compiled = torch.compile(moe, fullgraph=True)
        start = time.perf_counter()
        compiled(x).output.backward(grad_out)
        print(f"  compile (first call): {time.perf_counter() - start:.1f} s wall", flush=True)
        eager_out, compiled_out = moe(x).output, compiled(x).output
        torch.testing.assert_close(compiled_out, eager_out, atol=1e-4, rtol=1e-4)
        return time_side_by_side(
            {
                "MoE eager": lambda: moe(x).output.backward(grad_out),
                "MoE compiled": lambda: compiled(x).output.backward(grad_out),
            },
            repeats=repeats,
            clock=clock,
        )


PEERS = ("torchtitan-style", "HF loop", "padded bmm")


def report(name: str, shape: tuple[int, ...], times: dict[str, float], markdown: bool) -> str:
    T, d, h, E, k = shape
    ours = times["FFNExperts"]
    fastest = min(PEERS, key=times.__getitem__)
    ceiling = ours / times["dense ceiling"]
    layer = times["MoE (TopKGate)"] / (times["TopKGate alone"] + ours)
    if markdown:
        cells = [f"{name}: T={T} d={d} h={h} E={E} k={k}"]
        cells += [f"{times[v] * 1e3:.1f}" for v in ("FFNExperts", *PEERS, "dense ceiling")]
        cells += [f"{ceiling:.2f}", f"{times[fastest] / ours:.2f} ({fastest})", f"{layer:.2f}"]
        return "| " + " | ".join(cells) + " |"
    lines = [f"[{name}] T={T} d={d} h={h} E={E} k={k}"]
    lines += [f"  {v:18s} {s * 1e3:9.1f} ms" for v, s in times.items()]
    target = CEILING_TARGET.get(name)
    note = f"  (target <= {target})" if target else ""
    lines.append(f"  FFNExperts / dense ceiling      = {ceiling:.3f}{note}")
    lines.append(f"  fastest peer / FFNExperts       = {times[fastest] / ours:.3f} ({fastest})")
    lines.append(f"  HF loop / FFNExperts            = {times['HF loop'] / ours:.3f}")
    lines.append(f"  MoE / (TopKGate + FFNExperts)   = {layer:.3f}  (target <= 1.05)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--configs", default="", help="comma-separated subset of the configs")
    parser.add_argument("--markdown", action="store_true", help="one table row per config")
    parser.add_argument("--wall", action="store_true", help="wall time instead of CPU time")
    parser.add_argument(
        "--compile", action="store_true", help="MoE eager vs torch.compile (fullgraph) instead"
    )
    parser.add_argument(
        "--routers", default="TopKGate", help=f"for --compile: some of {', '.join(COMPILE_ROUTERS)}"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    configs = QUICK if args.quick else CONFIGS
    if args.configs:
        configs = {n: configs[n] for n in args.configs.split(",")}
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    clock = "wall" if args.wall else "CPU (process)"
    print(
        f"fp32, forward + backward, median of {args.repeats}, threads={args.threads}, {clock} time"
    )
    print(f"load at start: {load} ({os.cpu_count()} cores)")
    if args.markdown:
        print(
            "| config | FFNExperts ms | torchtitan-style ms | HF loop ms | padded bmm ms | "
            "dense ceiling ms | FFNExperts / ceiling | fastest peer / FFNExperts | "
            "MoE / (router + experts) |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
    clock_fn = time.perf_counter if args.wall else time.process_time
    for name, shape in configs.items():
        if args.compile:
            for router in args.routers.split(","):
                T, d, h, E, k = shape
                print(f"[{name}] T={T} d={d} h={h} E={E} k={k}, router {router}", flush=True)
                times = bench_compiled(*shape, args.repeats, clock_fn, router)
                for variant, seconds in times.items():
                    print(f"  {variant:18s} {seconds * 1e3:9.1f} ms")
                print(f"  compiled / eager = {times['MoE compiled'] / times['MoE eager']:.3f}")
            continue
        times = bench(*shape, args.repeats, clock_fn)
        print(report(name, shape, times, args.markdown), flush=True)
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"load at end: {load}")


if __name__ == "__main__":
    main()

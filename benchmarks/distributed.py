"""Expert-parallel MoE on 2 CPU processes (gloo) against the single-process layer.

Run: ``python benchmarks/distributed.py`` (``--quick`` for a small size). Two processes
on 127.0.0.1, one intra-op thread each. One step is forward + backward of a top-2 MoE
layer; the same total batch T is split evenly over the ranks for the expert-parallel
layer, and run whole in one process for the single-process layer (once with 1 thread,
once with 2 threads: the same cores as the two processes). Interleaved repeats, medians
on rank 0; every expert-parallel step ends with a barrier, so it is the slower rank's
time. Prints the ratios and the fraction of an expert-parallel step spent inside the
all-to-all exchanges (the count exchange and both token exchanges, forward and
backward; waiting for the slower rank counts as exchange time).
"""

from __future__ import annotations

import argparse
import datetime
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

try:
    from _timing import time_side_by_side  # benchmarks/ is on sys.path when run as a script
except ModuleNotFoundError:  # a spawned worker: the parent's _timing took benchmarks/ off it
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _timing import time_side_by_side  # (and takes it off again)

import routelab.distributed as rd
from routelab import FFNExperts, MoE
from routelab.routers import TopKGate

CONFIGS = {
    "medium": (4096, 256, 1024, 8, 2),
    "many small experts": (4096, 128, 256, 32, 2),
}
QUICK = {"medium": (512, 64, 128, 8, 2)}
WORLD = 2


def _timed_exchange(totals: list[float]):
    inner = rd._exchange

    def exchange(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            totals[0] += time.perf_counter() - start

    return exchange


def bench(rank: int, T: int, d: int, h: int, E: int, k: int, repeats: int) -> dict | None:
    torch.manual_seed(0)
    moe = MoE(TopKGate(d, E, k=k), FFNExperts(E, d, h))
    layer = rd.ExpertParallelMoE.from_moe(moe)
    x_full = torch.randn(T, d)
    grad_full = torch.randn(T, d)
    lo, hi = rank * T // WORLD, (rank + 1) * T // WORLD
    x_full.requires_grad_()
    x = x_full[lo:hi].detach().clone().requires_grad_()

    def expert_parallel():
        layer(x).output.backward(grad_full[lo:hi])
        dist.barrier()

    def single(threads: int):
        def run():
            if rank == 0:
                torch.set_num_threads(threads)
                moe(x_full).output.backward(grad_full)
                torch.set_num_threads(1)

        return run

    times = time_side_by_side(
        {
            "expert-parallel (2 procs x 1 thread)": expert_parallel,
            "single process, 1 thread": single(1),
            "single process, 2 threads": single(2),
        },
        repeats=repeats,
    )
    # the share of the exchanges in an expert-parallel step
    totals = [0.0]
    original = rd._exchange
    rd._exchange = _timed_exchange(totals)
    fractions = []
    for _ in range(repeats):
        totals[0] = 0.0
        start = time.perf_counter()
        expert_parallel()
        fractions.append(totals[0] / (time.perf_counter() - start))
    rd._exchange = original
    share = torch.tensor([statistics.median(fractions)])
    shares = [torch.zeros(1) for _ in range(WORLD)]
    dist.all_gather(shares, share)
    times["a2a share per rank"] = [float(s) for s in shares]
    return times if rank == 0 else None


def worker(rank: int, port: int, quick: bool, repeats: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=120),
    )
    if rank == 0:
        print(f"fp32, forward + backward, top-2, gloo, {WORLD} processes, median of {repeats}")
    for name, (T, d, h, E, k) in (QUICK if quick else CONFIGS).items():
        times = bench(rank, T, d, h, E, k, repeats)
        if times is not None:
            ep = times["expert-parallel (2 procs x 1 thread)"]
            share = times.pop("a2a share per rank")
            print(f"[{name}] T={T} (T/2 per rank) d={d} h={h} E={E} k={k}")
            for variant, seconds in times.items():
                print(f"  {variant:38s} {seconds * 1e3:9.1f} ms")
            one, two = times["single process, 1 thread"], times["single process, 2 threads"]
            print(f"  expert-parallel / single (1 thread)  = {ep / one:.3f}")
            print(f"  expert-parallel / single (2 threads) = {ep / two:.3f}")
            print(
                "  time in all-to-all / expert-parallel step = "
                + ", ".join(f"rank {r}: {s:.1%}" for r, s in enumerate(share))
            )
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(
        worker, args=(port, args.quick, args.repeats), nprocs=WORLD, start_method="spawn"
    )


if __name__ == "__main__":
    main()

"""Shared timing helpers for the benchmarks: interleaved repeats, median seconds.

Every benchmark imports this module first. Run as ``python benchmarks/<name>.py``, a
script has this folder at the head of ``sys.path``, where ``benchmarks/solvers.py``
would shadow the ``solvers`` package; importing this module removes the folder again
(it is already imported by then).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != _HERE]


def time_side_by_side(
    variants: dict[str, Callable[[], object]],
    *,
    repeats: int = 5,
    warmup: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median time of each variant; runs are interleaved so machine noise hits all alike.

    ``clock`` is wall time by default; ``time.thread_time`` (the CPU time of this thread)
    is steadier on a machine shared with other jobs, for single-threaded runs.
    """
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = clock()
            fn()
            samples[name].append(clock() - start)
    return {name: statistics.median(times) for name, times in samples.items()}


def single_thread_cli(description: str | None) -> argparse.Namespace:
    """The command line of a one-thread CPU benchmark: ``--quick`` and ``--repeats``.

    Sets torch to one thread and prints the header line (fp32, forward + backward, the
    median thread CPU time and the machine's load average)."""
    import torch

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"fp32, forward + backward, median thread CPU time of {args.repeats}; load: {load}")
    return args

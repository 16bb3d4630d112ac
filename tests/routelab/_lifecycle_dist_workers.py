"""Spawned workers for the lifecycle sharding test (gloo on 127.0.0.1, world size 2).

Every rank builds the same seeded layers (grown, pruned, merged), runs its expert-parallel
copy on its chunk of one batch and compares with the single-process layer; it writes the
errors (never asserts, so every rank keeps joining the collectives) for the parent.
"""

from __future__ import annotations

import datetime
import os
import pickle
import traceback

import torch
import torch.distributed as dist

from routelab import FFNExperts, MoE
from routelab.distributed import ExpertParallelMoE, gather_experts
from routelab.lifecycle import grow_experts, merge_experts, prune_experts
from routelab.routers import TopKGate

D, H = 6, 8


def layers() -> dict[str, MoE]:
    """The re-indexed layers, identical on every rank (seeded)."""
    torch.manual_seed(0)
    base = MoE(TopKGate(D, 6, k=2), FFNExperts(6, D, H))
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.3 * torch.randn_like(p))
    loads = torch.tensor([5.0, 1.0, 4.0, 2.0, 6.0, 3.0])
    return {
        "grown": grow_experts(base, 2, gate="scratch", init="scratch", seed=1),
        "pruned": prune_experts(base, loads, num_remove=2).moe,
        "merged": merge_experts(base, loads, num_groups=2).moe,
    }


def worker(rank: int, world: int, port: int, out: str) -> None:
    record: dict = {}
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=60),
        )
        torch.manual_seed(123)
        x = torch.randn(10, D)
        chunk = x.chunk(world)[rank]
        for name, moe in layers().items():
            parallel = ExpertParallelMoE.from_moe(moe)
            y = parallel(chunk).output
            reference = moe(x).output.chunk(world)[rank]
            full = gather_experts(parallel.experts)
            same = all(
                torch.equal(getattr(full, n), getattr(moe.experts, n))
                for n in ("w_in", "w_out", "b_in", "b_out")
            )
            record[name] = {"error": float((y - reference).abs().max()), "gathered": same}
        dist.destroy_process_group()
    except BaseException as err:  # reported to the parent
        record["failure"] = "".join(traceback.format_exception(err))[-3000:]
    with open(os.path.join(out, f"{rank}.pkl"), "wb") as f:
        pickle.dump(record, f)

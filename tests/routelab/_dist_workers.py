"""Spawned-process harness for the expert-parallel tests (gloo on 127.0.0.1).

:func:`run_group` starts ``world_size`` real processes (start method "spawn"), each of
which joins a gloo group on a free loopback port and runs one worker function from this
module; it returns every rank's outcome and never waits past its deadline (stragglers
are killed and reported as hung). Workers compute errors instead of asserting, so that
every rank keeps joining the same collectives; the test process asserts on the results.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

GROUP_TIMEOUT_S = 60.0


@dataclass
class Outcome:
    """One rank's result: ``exitcode`` (None: still running at the deadline, killed)."""

    rank: int
    exitcode: int | None
    result: Any = None
    error: str | None = None
    error_type: str | None = None
    elapsed: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_group(
    worker: str,
    world_size: int,
    *,
    config: dict[str, Any] | None = None,
    deadline_s: float = 120.0,
    release_after: list[int] | None = None,
) -> list[Outcome]:
    """Run ``worker`` (a function name in this module) on ``world_size`` processes.

    ``release_after``: ranks whose completion the parent waits for before it sets the
    shared event that lingering workers wait on (the failing-rank test).
    """
    ctx = mp.get_context("spawn")
    port = free_port()
    release = ctx.Event()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [
            ctx.Process(
                target=_entry,
                args=(worker, rank, world_size, port, tmp, config or {}, release),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        end = time.monotonic() + deadline_s
        first = release_after if release_after is not None else []
        for rank in first:
            procs[rank].join(max(0.0, end - time.monotonic()))
        release.set()
        for p in procs:
            p.join(max(0.0, end - time.monotonic()))
        outcomes = []
        for rank, p in enumerate(procs):
            if p.is_alive():
                p.kill()
                p.join(5)
                outcomes.append(Outcome(rank, None, error="hung past the deadline"))
                continue
            path = os.path.join(tmp, f"{rank}.pkl")
            if os.path.exists(path):
                with open(path, "rb") as f:
                    record = pickle.load(f)
                outcomes.append(Outcome(rank, p.exitcode, **record))
            else:
                outcomes.append(Outcome(rank, p.exitcode, error="no result written"))
        return outcomes


def _entry(
    worker: str,
    rank: int,
    world_size: int,
    port: int,
    tmp: str,
    config: dict[str, Any],
    release: Any,
) -> None:
    torch.set_num_threads(1)
    start = time.monotonic()
    record: dict[str, Any] = {}
    code = 0
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S),
        )
        record["result"] = globals()[worker](rank, world_size, config)
    except BaseException as err:  # record any failure for the parent, then exit non-zero
        record["error"] = "".join(traceback.format_exception(err))[-4000:]
        record["error_type"] = type(err).__name__
        code = 1
        if config.get("linger_rank") == rank:  # stay alive: peers cannot see a closed socket
            release.wait(config.get("linger_s", 60.0))
    record["elapsed"] = time.monotonic() - start
    with open(os.path.join(tmp, f"{rank}.pkl.part"), "wb") as f:
        pickle.dump(record, f)
    os.replace(os.path.join(tmp, f"{rank}.pkl.part"), os.path.join(tmp, f"{rank}.pkl"))
    if code == 0 and dist.is_initialized():
        dist.destroy_process_group()
    # skip interpreter teardown: a peer may be gone, and a failed rank must not block
    os._exit(code)


# ---------------------------------------------------------------------- equivalence
D_MODEL, D_HIDDEN, VOCAB = 6, 8, 50


def make_router(kind: str, num_experts: int) -> Any:
    """A router of the named family over ``num_experts`` experts (seeded by the caller)."""
    if kind == "topk":
        from routelab.routers import TopKGate

        return TopKGate(D_MODEL, num_experts, k=2)
    if kind == "hash":
        from routelab.routers.hash import HashRouter

        return HashRouter.fit("random", num_experts, d_model=D_MODEL, vocab_size=VOCAB, seed=3)
    if kind == "multi-hash":  # two hash functions, each over half of the experts
        from routelab.routers.hash import HashRouter

        return HashRouter.fit(
            "multi-hash", num_experts // 2, d_model=D_MODEL, vocab_size=VOCAB, num_hashes=2
        )
    if kind == "base":
        from routelab.routers.base_layer import BASERouter

        return BASERouter(D_MODEL, num_experts)
    import routelab.routers as routers

    others = {  # any other router: routelab.routers.<class>(d, E, **options)
        "softmax": ("SoftmaxGate", {}),
        "switch": ("SwitchGate", {}),
        "noisy_topk": ("NoisyTopKGate", {}),
        "dselect_k": ("DSelectKGate", {"k": 2}),
        "expert_choice": ("ExpertChoiceRouter", {}),
        "sinkhorn": ("SinkhornRouter", {}),
        "top_p": ("TopPGate", {"p": 0.6}),  # variable experts per token
        "remoe": ("ReMoEGate", {"k": 2}),
        "deepseek": (  # sigmoid, 2 groups (top 1), selection bias, scaled, sequence loss
            "TopKRouter",
            {
                "k": 2,
                "score": "sigmoid",
                "num_groups": 2,
                "top_groups": 1,
                "scaling_factor": 2.5,
                "selection_bias": True,
                "sequence_balance_weight": 1e-3,
            },
        ),
    }
    if kind in others:
        name, options = others[kind]
        return getattr(routers, name)(D_MODEL, num_experts, **options)
    raise ValueError(f"unknown router kind {kind!r}")


def concat_routings(parts: list[Any], sizes: list[int]) -> Any:
    """The routings of consecutive chunks of ``sizes[r]`` tokens as one Routing."""
    from routelab import Routing

    offsets = [sum(sizes[:r]) for r in range(len(sizes))]
    return Routing(
        token=torch.cat([p.token + o for p, o in zip(parts, offsets)]),
        expert=torch.cat([p.expert for p in parts]),
        weight=torch.cat([p.weight for p in parts]),
        num_tokens=sum(sizes),
        num_experts=parts[0].num_experts,
    )


def _max_err(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    if a is None and b is None:
        return 0.0
    if a is None or b is None:  # one side has no gradient: fine only if the other is 0
        other = a if a is not None else b
        return float(other.abs().max()) if other.numel() else 0.0
    if a.shape != b.shape:
        return float("inf")
    return float((a - b).abs().max()) if a.numel() else 0.0


def compare_case(rank: int, world: int, case: dict[str, Any]) -> dict[str, Any]:
    """Max abs errors (``errs``) of the expert-parallel layer against the single-process
    reference, and ``info``: this rank's T, its routing's load, and for BASE whether the
    per-rank and global assignments differ on this batch.

    ``case``: ``router`` kind, per-rank ``sizes``, ``assignment`` ("per_rank"/"global"),
    ``reference`` ("full": MoE on the concatenation; "chunks": router and policies on
    each rank's chunk, experts on the concatenation), optional ``capacity`` (a factor)
    ``batched`` (feed ``[1, T_r, d]``), ``activation`` of the experts, ``eval`` (the
    router in evaluation mode) and ``shared`` (a gated shared expert, replicated).
    """
    import copy

    from routelab import FFNExperts, MoE
    from routelab.distributed import (
        ExpertParallelMoE,
        all_reduce_replicated_grads,
        broadcast_replicated,
        shard_experts,
    )
    from routelab.moe import SharedExperts
    from routelab.policies import CapacityPolicy

    torch.manual_seed(case.get("seed", 0))
    num_experts = case["num_experts"]
    router = make_router(case["router"], num_experts)
    router.train(not case.get("eval", False))
    experts = FFNExperts(num_experts, D_MODEL, D_HIDDEN, activation=case.get("activation", "relu"))
    policies = [CapacityPolicy(case["capacity"])] if case.get("capacity") else []
    shared = SharedExperts(D_MODEL, D_HIDDEN, gated=True) if case.get("shared") else None
    sizes = case["sizes"]
    total = sum(sizes)
    x_full = torch.randn(total, D_MODEL)
    ids_full = torch.randint(0, VOCAB, (total,))
    g_full = torch.randn(total, D_MODEL)
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    router_ep = copy.deepcopy(router)
    policies_ep = copy.deepcopy(policies)

    # the single-process reference, on every rank alike
    moe = MoE(router, experts, policies, shared_experts=shared)
    xr = x_full.clone().requires_grad_()
    if case["reference"] == "full":
        y_ref = moe(xr, ids_full).output
    else:
        parts = []
        for r in range(world):
            a, b = sum(sizes[:r]), sum(sizes[: r + 1])
            routing = router(xr[a:b], ids_full[a:b])
            for policy in policies:
                routing = policy(routing)
            parts.append(routing)
        y_ref = experts(xr, concat_routings(parts, sizes))
    (y_ref * g_full).sum().backward()

    # the expert-parallel layer on this rank's chunk
    layer = ExpertParallelMoE(
        router_ep,
        shard_experts(experts, rank, world),
        policies_ep,
        assignment=case.get("assignment", "per_rank"),
        shared_experts=copy.deepcopy(shared),
    )
    broadcast_replicated(layer)
    x = x_full[lo:hi].clone().requires_grad_()
    ids = ids_full[lo:hi]
    if case.get("batched"):
        result = layer(x.unsqueeze(0), ids.unsqueeze(0))
        out = result.output.squeeze(0)
    else:
        result = layer(x, ids)
        out = result.output
    (out * g_full[lo:hi]).sum().backward()
    all_reduce_replicated_grads(layer)

    errs = {
        "output": _max_err(out.detach(), y_ref.detach()[lo:hi]),
        "grad_x": _max_err(x.grad, xr.grad[lo:hi]),
    }
    ref_router = dict(router.named_parameters())
    for name, p in router_ep.named_parameters():
        errs[f"router.{name}"] = _max_err(p.grad, ref_router[name].grad)
    if shared is not None:
        ref_shared = dict(shared.named_parameters())
        for name, p in layer.shared_experts.named_parameters():
            errs[f"shared.{name}"] = _max_err(p.grad, ref_shared[name].grad)
    ids_local = layer.local_experts
    for name, p in layer.experts.named_parameters():
        full = getattr(experts, name)
        grad = None if full.grad is None else full.grad[ids_local.start : ids_local.stop]
        errs[f"experts.{name}"] = _max_err(p.grad, grad)
    info = {"tokens": int(out.shape[0]), "load": result.routing.load().tolist()}
    if hasattr(router, "assign"):  # BASE: do the two assignment modes differ on this batch?
        with torch.no_grad():
            scores = router.expert_scores(x_full)
            chunks = [
                router.assign(scores[sum(sizes[:r]) : sum(sizes[: r + 1])]) for r in range(world)
            ]
            info["modes_differ"] = bool((torch.cat(chunks) != router.assign(scores)).any())
    return {"errs": errs, "info": info}


def equivalence(rank: int, world: int, config: dict[str, Any]) -> dict[str, Any]:
    """Every case of ``config["cases"]``, then the constructor's and helpers' checks."""
    results: dict[str, Any] = {}
    for case in config["cases"]:
        results[case["name"]] = compare_case(rank, world, case)
    results["checks"] = helper_checks(rank, world)
    results["global_balance"] = global_balance_checks(rank, world)
    results["replay"] = replay_checks(rank, world)
    return results


def _router_grads(router: Any) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in router.parameters()])


def global_balance_checks(rank: int, world: int) -> dict[str, Any]:
    """The global-batch balance loss (Qiu et al. 2025) with counts all-reduced over the
    world, against single-process references on every rank alike (max abs errors):

    - one micro-batch per step (``one_*``): each rank holds its share of the global batch
      (unequal sizes); the mean of the ranks' losses and the summed gradients of
      ``loss / W`` equal the loss and gradient on the concatenated global batch;
    - two accumulated micro-batches (``acc_*``): every rank's m-th micro-batch is its
      slice of the global m-th micro-batch; the losses and the accumulated gradients
      equal a single process accumulating the concatenated micro-batches, and the
      update step's ``step_loss`` / ``step_load`` equal the concatenated global batch's.
    """
    from routelab.balancing import update_balancing
    from routelab.routers import TopKRouter

    E, A = 2 * world, 2
    sizes = [[5, 3], [2, 6]] if world == 2 else [[3, 1, 4, 2], [2, 5, 0, 3]]
    group = dist.group.WORLD

    def build(group_: Any) -> Any:
        torch.manual_seed(11)
        return TopKRouter(D_MODEL, E, k=2, global_balance_weight=1.0, global_balance_group=group_)

    gen = torch.Generator().manual_seed(12)
    micro = [torch.randn(sum(s), D_MODEL, generator=gen, dtype=torch.float64) for s in sizes]

    def mine(m: int) -> torch.Tensor:
        lo = sum(sizes[m][:rank])
        return micro[m][lo : lo + sizes[m][rank]]

    errs: dict[str, float] = {}
    # references: the concatenated global batch in one forward, and accumulated
    ref = build(None).double()
    whole = ref(torch.cat(micro))
    whole_loss = whole.aux["global_balance"]
    whole_loss.backward()
    whole_grad = _router_grads(ref).clone()
    whole_load = torch.bincount(whole.expert, minlength=E).double()
    update_balancing(ref)
    ref.zero_grad()
    acc_losses = []
    for x in micro:
        loss = ref(x).aux["global_balance"]
        (loss / A).backward()
        acc_losses.append(loss.detach())
    acc_grad = _router_grads(ref).clone()
    update_balancing(ref)

    # one micro-batch per step, split unevenly over the ranks
    router = build(group).double()
    x_one = torch.cat([mine(m) for m in range(A)])
    loss = router(x_one).aux["global_balance"]
    (loss / world).backward()
    grad = _router_grads(router)
    dist.all_reduce(grad, group=group)
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss, group=group)
    errs["one_loss"] = _max_err(mean_loss / world, whole_loss.detach())
    errs["one_grad"] = _max_err(grad, whole_grad)
    update_balancing(router, group)
    errs["one_step_load"] = _max_err(router.global_counts.step_load, whole_load)
    errs["one_step_loss"] = _max_err(router.global_counts.step_loss, whole_loss.detach())

    # two accumulated micro-batches
    router.zero_grad()
    for m in range(A):
        loss = router(mine(m)).aux["global_balance"]
        (loss / (world * A)).backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss, group=group)
        errs[f"acc_loss_{m}"] = _max_err(mean_loss / world, acc_losses[m])
    grad = _router_grads(router)
    dist.all_reduce(grad, group=group)
    errs["acc_grad"] = _max_err(grad, acc_grad)
    update_balancing(router, group)
    errs["acc_step_load"] = _max_err(router.global_counts.step_load, whole_load)
    errs["acc_step_loss"] = _max_err(router.global_counts.step_loss, whole_loss.detach())
    return errs


def replay_checks(rank: int, world: int) -> dict[str, Any]:
    """Router replay through ExpertParallelMoE (with a shared expert): recorded on every
    rank, router perturbed, replayed; the output equals a single-process MoE replaying
    its own recording of the concatenated batch, and the experts are the recorded ones."""
    from routelab import FFNExperts, MoE
    from routelab.distributed import ExpertParallelMoE
    from routelab.moe import SharedExperts
    from routelab.replay import RouterReplay
    from routelab.routers import TopKRouter

    E = 2 * world
    sizes = [4, 6] if world == 2 else [3, 0, 5, 2]
    torch.manual_seed(21)
    router = TopKRouter(D_MODEL, E, k=2, score="sigmoid", num_groups=2, top_groups=1)
    moe = MoE(router, FFNExperts(E, D_MODEL, D_HIDDEN), shared_experts=SharedExperts(6, 8))
    layer = ExpertParallelMoE.from_moe(moe)  # shares the router and the shared expert
    x_full = torch.randn(sum(sizes), D_MODEL)
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    on_ranks, single = RouterReplay(), RouterReplay()
    with on_ranks.record(layer):
        layer(x_full[lo:hi])
    with single.record(moe):
        moe(x_full)
    with torch.no_grad():
        router.weight.add_(
            torch.randn(router.weight.shape, generator=torch.Generator().manual_seed(3))
        )
    fresh = layer(x_full[lo:hi]).routing
    with on_ranks.replay(layer):
        replayed = layer(x_full[lo:hi])
    with single.replay(moe):
        reference = moe(x_full)
    recorded = on_ranks.records[""][0]
    ref_recorded = single.records[""][0]
    same_experts = torch.equal(replayed.routing.expert, recorded.expert) and torch.equal(
        recorded.expert, ref_recorded.expert[2 * lo : 2 * hi]
    )
    changed = not torch.equal(fresh.expert, recorded.expert)
    return {
        "output": _max_err(replayed.output.detach(), reference.output.detach()[lo:hi]),
        "same_experts": same_experts,
        "fresh_routing_changed": changed,
    }


def helper_checks(rank: int, world: int) -> dict[str, Any]:
    """Constructor errors (raised before any collective) and the shard round trip."""
    from routelab import FFNExperts
    from routelab.distributed import ExpertParallelMoE, gather_experts, shard_experts
    from routelab.routers import TopKGate

    out: dict[str, Any] = {}

    def raised(fn: Any) -> str:
        try:
            fn()
        except Exception as err:
            return f"{type(err).__name__}: {err}"
        return "no error"

    torch.manual_seed(1)
    bad_e = world * 2 + 1
    out["indivisible"] = raised(
        lambda: ExpertParallelMoE(TopKGate(D_MODEL, bad_e), FFNExperts(1, D_MODEL, D_HIDDEN))
    )
    out["wrong_shard"] = raised(
        lambda: ExpertParallelMoE(TopKGate(D_MODEL, 2 * world), FFNExperts(3, D_MODEL, D_HIDDEN))
    )
    out["global_needs_base"] = raised(
        lambda: ExpertParallelMoE(
            TopKGate(D_MODEL, 2 * world), FFNExperts(2, D_MODEL, D_HIDDEN), assignment="global"
        )
    )
    out["bad_mode"] = raised(
        lambda: ExpertParallelMoE(
            TopKGate(D_MODEL, 2 * world), FFNExperts(2, D_MODEL, D_HIDDEN), assignment="all"
        )
    )
    full = FFNExperts(2 * world, D_MODEL, D_HIDDEN, activation="swiglu")
    back = gather_experts(shard_experts(full, rank, world))
    out["roundtrip"] = max(
        _max_err(p.detach(), q.detach()) for p, q in zip(full.parameters(), back.parameters())
    )
    return out


# ---------------------------------------------------------------------- failing rank
def failing_rank(rank: int, world: int, config: dict[str, Any]) -> None:
    """Rank ``config["bad_rank"]`` raises (bad input, before any collective); the others
    run a forward on a group with a short timeout and must fail with an error."""
    from routelab import FFNExperts
    from routelab.distributed import ExpertParallelMoE, shard_experts
    from routelab.routers import TopKGate

    group = dist.new_group(timeout=datetime.timedelta(seconds=config["timeout_s"]))
    torch.manual_seed(0)
    layer = ExpertParallelMoE(
        TopKGate(D_MODEL, 2 * world),
        shard_experts(FFNExperts(2 * world, D_MODEL, D_HIDDEN), rank, world),
        group=group,
    )
    dist.barrier()  # everybody is ready: from here on, only the exchange can block
    width = D_MODEL + 1 if rank == config["bad_rank"] else D_MODEL
    out = layer(torch.randn(5, width)).output
    out.sum().backward()


# ---------------------------------------------------------------------- balancing state
def balancing_state(rank: int, world: int, config: dict[str, Any]) -> dict[str, Any]:
    """Every rank runs an expert-parallel layer (replicated top-2 gate, loss-free bias and
    pausing; sharded experts) on its own, rank-skewed data for a few steps, with a
    checkpointed micro-batch; the update step all-reduces the loads. Returns the final state and the per-step local
    loads and masses (so the parent can recompute the update independently)."""
    from torch.utils.checkpoint import checkpoint

    from routelab import FFNExperts
    from routelab.balancing import update_balancing
    from routelab.distributed import ExpertParallelMoE, shard_experts
    from routelab.policies import LossFreeBalancingPolicy, PausingPolicy
    from routelab.routers import TopKGate

    E = 2 * world
    torch.manual_seed(0)  # identical replicas of the router and the policies
    bias = LossFreeBalancingPolicy(E, rate=0.25)
    pausing = PausingPolicy(E, margin=0.5)
    experts = shard_experts(FFNExperts(E, D_MODEL, D_HIDDEN), rank, world)
    layer = ExpertParallelMoE(TopKGate(D_MODEL, E, k=2), experts, [bias, pausing])
    gen = torch.Generator().manual_seed(1000 + rank)
    loads, masses = [], []
    for step in range(config["steps"]):
        step_mass = torch.zeros(E, dtype=torch.float64)
        for micro in range(2):  # gradient accumulation: two micro-batches per update
            size = 6 + 5 * rank + step  # the ranks' batches differ in size and content
            x = torch.randn(size, D_MODEL, generator=gen) + rank * torch.arange(D_MODEL) * 0.3
            x.requires_grad_(True)
            out = {}

            def run(t: torch.Tensor, out: dict = out) -> torch.Tensor:
                result = layer(t)
                out["routing"] = result.routing
                return result.output

            if micro == 1:  # the second micro-batch is checkpointed (recomputed in backward)
                y = checkpoint(run, x, use_reentrant=False)
            else:
                y = run(x)
            y.square().sum().backward()
            routing = out["routing"]
            step_mass += torch.zeros(E, dtype=torch.float64).index_add(
                0, routing.expert, routing.weight.detach().double()
            )
        loads.append(bias.pending("load").clone())
        masses.append(step_mass)
        update_balancing(layer, group=dist.group.WORLD)
    return {
        "bias": bias.bias.clone(),
        "totals": pausing.totals.clone(),
        "loads": torch.stack(loads),
        "masses": torch.stack(masses),
        "observations": float(bias.pending_observations),
    }

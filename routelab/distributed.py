"""Expert parallelism on ``torch.distributed``: all-to-all dispatch and combine of a Routing.

When the experts outgrow one device they are sharded across the ranks of a process
group: data parallel for the rest of the model, model parallel for the experts
(Shazeer et al. 2017, section 3.1, the answer to the shrinking batch; GShard,
Lepikhin et al. 2020; Switch, Fedus et al. 2021). With E experts and W ranks, rank r
holds the ``E / W`` experts ``[r * E/W, (r+1) * E/W)`` as a shard of its executor
(``FFNExperts``, or any ``Experts`` whose tensors are stacked per expert: the experts
shard and gather themselves, :meth:`~routelab.experts.Experts.select_experts`).

Forward of :class:`ExpertParallelMoE` on every rank, with its local ``x [T_r, d]``::

    routing   = router(x)                          local Routing, global expert ids
    plan      = ExpertDispatch.plan(routing)       entries sorted by expert, counts [E]
    counts    -> all_to_all -> recv_counts [W, E/W] entries each rank sends me, per expert
    xs        = plan.gather(x)                     [N_r, d], contiguous per destination rank
    xr        = all_to_all(xs, send = per-rank sums of counts, recv = sums of recv_counts)
                                                   [M_r, d], by source rank, then expert
    yr        = experts.run_sorted(xr[order], recv_counts.sum(0))[inverse]
                                                   order: to expert order from the counts
                                                   (no sort, no second plan)
    ys        = all_to_all(yr, the transposed split sizes)   [N_r, d], back in plan order
    y         = plan.combine(ys)                   weighted scatter-add into [T_r, d]

Both exchanges are an autograd function whose backward is the reverse exchange (the
transpose of the split sizes), so gradients reach ``x``, the routing weights (hence the
router) and the local expert weights. Every rank joins every collective whatever its
number of tokens, so ranks with different T, or with T = 0, cannot hang.

Gloo (CPU) and NCCL (GPU) run the same code: ``dist.all_to_all_single`` with variable
split sizes, which both backends support on torch >= 2.0.

Gradient semantics: an expert-shard gradient already sums the contributions of every
rank's tokens; a replicated parameter (the router, anything outside the experts) gets
only the local part. :func:`all_reduce_replicated_grads` sums those over the group, so
that every gradient is the gradient of the sum of the per-rank losses (divide each
rank's loss by the world size for the gradient of the global mean).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from routelab.experts import ExpertDispatch, Experts, ExpertSegments
from routelab.moe import (
    MoE,
    MoEOutput,
    check_shared_experts,
    flatten_tokens,
    sequence_length_of,
)
from routelab.policies import policy_list
from routelab.replay import run_router
from routelab.router import Router
from routelab.routers.base_layer import BalancedAssignmentRouter
from routelab.routing import Routing

__all__ = [
    "ASSIGNMENT_MODES",
    "ExpertParallelMoE",
    "all_gather_rows",
    "all_reduce_replicated_grads",
    "all_to_all",
    "broadcast_replicated",
    "expert_range",
    "gather_experts",
    "replicated_parameters",
    "shard_experts",
]

ASSIGNMENT_MODES = ("per_rank", "global")


# ---------------------------------------------------------------------- group helpers
def _group_info(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group "
            "(e.g. via torchrun) before building or running an ExpertParallelMoE"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def expert_range(num_experts: int, rank: int, world_size: int) -> range:
    """The global expert ids held by ``rank``: ``[rank * E/W, (rank + 1) * E/W)``."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size = {world_size}), got {rank}")
    if num_experts % world_size:
        raise ValueError(
            f"num_experts = {num_experts} must be divisible by the world size {world_size} "
            "to shard the experts evenly"
        )
    per_rank = num_experts // world_size
    return range(rank * per_rank, (rank + 1) * per_rank)


# ---------------------------------------------------------------------- the exchange
def _exchange(
    x: Tensor, send_splits: list[int], recv_splits: list[int], group: dist.ProcessGroup | None
) -> Tensor:
    """One all-to-all of the rows of ``x [sum(send_splits), ...]``; returns ``[sum(recv_splits), ...]``.

    Rows ``send_splits[:r]`` to ``send_splits[:r+1]`` go to rank r; the result holds the
    rows received from rank 0, then rank 1, ... (``recv_splits[s]`` from rank s).
    """
    x = x.contiguous()
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x, recv_splits, send_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """Differentiable all-to-all; backward is the reverse exchange (splits transposed).

    ``anchor`` is an empty tensor that requires grad whenever grad mode is on, so that the
    node, and hence its backward collective, exists on every rank alike (a rank whose rows
    do not require grad would otherwise skip the backward exchange and hang the others).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        anchor: Tensor,
        send_splits: list[int],
        recv_splits: list[int],
        group: dist.ProcessGroup | None,
    ) -> Tensor:
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        return _exchange(x, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grad_x = _exchange(grad, ctx.recv_splits, ctx.send_splits, ctx.group)
        return grad_x, None, None, None, None


def all_to_all(
    x: Tensor,
    send_splits: Sequence[int],
    recv_splits: Sequence[int],
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Differentiable variable-size all-to-all of the rows of ``x [sum(send_splits), ...]``.

    Rank r receives ``send_splits[r]`` rows from this rank; this rank receives
    ``recv_splits[s]`` rows from rank s, concatenated in rank order. The backward pass
    sends the gradient rows back the same way (the transposed split sizes). Every rank of
    ``group`` must call it (with zero-row splits where it has nothing to send).
    """
    send, recv = [int(s) for s in send_splits], [int(s) for s in recv_splits]
    if x.shape[0] != sum(send):
        raise ValueError(f"x has {x.shape[0]} rows but send_splits sum to {sum(send)}")
    if torch.is_grad_enabled():
        anchor = torch.empty(0, device=x.device, dtype=x.dtype, requires_grad=True)
        return _AllToAll.apply(x, anchor, send, recv, group)
    return _exchange(x, send, recv, group)


def all_gather_rows(x: Tensor, group: dist.ProcessGroup | None = None) -> tuple[Tensor, list[int]]:
    """Concatenate every rank's ``x [T_r, ...]`` in rank order (variable T_r; not differentiable).

    The sizes are gathered first, every block is padded to the largest T_r for the
    fixed-size ``all_gather``, then the padding is cut. Returns ``(x_all [sum T_r, ...],
    sizes [W])``.
    """
    _, world = _group_info(group)
    size = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    sizes_t = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes_t, size, group=group)
    sizes = [int(s) for s in torch.cat(sizes_t).tolist()]
    longest = max(sizes)
    if longest == 0:
        return x.detach()[:0].clone(), sizes
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x.detach()
    blocks = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(blocks, padded, group=group)
    return torch.cat([b[:n] for b, n in zip(blocks, sizes)]), sizes


# ---------------------------------------------------------------------- expert shards
def shard_experts(experts: Experts, rank: int, world_size: int) -> Experts:
    """The shard of full experts ``(E, ...)`` held by ``rank``: the experts
    ``expert_range(E, rank, world_size)``, copied by the experts themselves
    (:meth:`routelab.experts.Experts.select_experts`: every per-expert tensor, a parameter
    added later included), on the same device and dtype. Use it to build the shards from
    one seeded model in tests, or to load a single-process checkpoint into an
    expert-parallel model.
    """
    if not isinstance(experts, Experts):
        raise TypeError(f"experts must be a routelab Experts, got {type(experts).__name__}")
    return experts.select_experts(expert_range(experts.num_experts, rank, world_size))


def gather_experts(shard: Experts, group: dist.ProcessGroup | None = None) -> Experts:
    """The inverse of :func:`shard_experts`: every rank's shard, all-gathered into the full
    experts (on every rank; e.g. to save a single-process checkpoint). Each per-expert
    tensor of :meth:`~routelab.experts.Experts.expert_tensors` is gathered in turn."""
    if not isinstance(shard, Experts):
        raise TypeError(f"shard must be a routelab Experts, got {type(shard).__name__}")
    _, world = _group_info(group)
    gathered = {}
    for name, local in shard.expert_tensors().items():
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.detach().contiguous(), group=group)
        gathered[name] = torch.cat(parts)
    return shard.with_expert_tensors(gathered)


# ---------------------------------------------------------------------- the layer
class ExpertParallelMoE(nn.Module):
    """An MoE layer whose E experts are sharded over the W ranks of a process group.

    ``forward(x [..., d], token_ids [...] | None) -> MoEOutput(output [..., d], routing)``
    on every rank with its own tokens (any number, zero included). The result equals a
    single-process :class:`~routelab.MoE` with the same weights on the concatenation of
    every rank's batch (for routers that route each token on its own; see
    ``assignment`` for BASE). ``routing`` is the local routing (global expert ids).

    The router and the policies are replicated and run on the local tokens: a capacity
    policy therefore limits each expert per source rank (as GShard's local groups do),
    batch-level routers (expert choice, BASE in ``"per_rank"`` mode) see the local batch,
    and the auxiliary losses in ``routing.aux`` are those of the local tokens (as with
    per-device balance losses; average them over the ranks, e.g. ``aux / world_size``
    in each rank's loss).
    The experts are the local shard, e.g. an ``FFNExperts(E / W, d, h)`` holding the global
    experts ``expert_range(E, rank, W)`` (build it with :func:`shard_experts`).

    Args:
        router: any :class:`~routelab.Router` over E experts (gates, hash routers, BASE);
            its parameters must be identical on every rank (same seed, or
            :func:`broadcast_replicated`).
        experts: this rank's ``Experts`` shard with ``E / W`` experts (``FFNExperts``, or
            any executor with ``run_sorted`` and per-expert tensors).
        policies: ``Routing -> Routing`` transforms applied to the local routing.
        group: the expert-parallel process group (default: the world).
        assignment: for a ``routelab.routers.BalancedAssignmentRouter`` (BASE,
            Sinkhorn-BASE), ``"per_rank"`` solves the
            balanced assignment over each rank's own tokens (as fairseq does: every expert
            takes an equal share of every rank's tokens), ``"global"`` all-gathers the
            ``[T_r, E]`` scores, solves one assignment over all ranks' tokens (every rank
            solves the same deterministic problem) and keeps this rank's slice; the
            combine weights come from the local scores, so gradients stay local. Other
            routers ignore it unless it is ``"global"``, which is an error for them.
        shared_experts: always-on experts (``routelab.moe.SharedExperts``) replicated on
            every rank (not sharded), run on the local tokens and added to the output;
            their gradients are those of replicated parameters.

    Like ``MoE``, the router gets the sequence layout and the layer supports router
    replay (``routelab.replay.RouterReplay``: record on every rank, replay on
    every rank).

    Backward must run on every rank of the group (each exchange's backward is a
    collective), which it does when every rank backpropagates a loss built from its
    output.
    """

    supports_router_replay = True

    def __init__(
        self,
        router: Router,
        experts: Experts,
        policies: Sequence[nn.Module] = (),
        *,
        group: dist.ProcessGroup | None = None,
        assignment: str = "per_rank",
        shared_experts: nn.Module | None = None,
    ) -> None:
        super().__init__()
        rank, world = _group_info(group)
        if not isinstance(router, nn.Module) or not hasattr(router, "num_experts"):
            raise TypeError(f"router must be a routelab.Router, got {type(router).__name__}")
        if not isinstance(experts, Experts):
            raise TypeError(
                f"experts must be this rank's Experts shard (e.g. FFNExperts), got "
                f"{type(experts).__name__}"
            )
        if assignment not in ASSIGNMENT_MODES:
            raise ValueError(f"assignment must be one of {ASSIGNMENT_MODES}, got {assignment!r}")
        if assignment == "global" and not isinstance(router, BalancedAssignmentRouter):
            raise TypeError(
                "assignment='global' needs a routelab.routers.BalancedAssignmentRouter "
                f"(BASERouter, SinkhornRouter), got {type(router).__name__}"
            )
        num_experts = router.num_experts
        local = expert_range(num_experts, rank, world)
        if experts.num_experts != len(local):
            raise ValueError(
                f"experts has {experts.num_experts} experts, but a shard of num_experts = "
                f"{num_experts} over world size {world} holds {len(local)}"
            )
        if experts.d_model is not None and router.d_model != experts.d_model:
            raise ValueError(
                f"router has d_model = {router.d_model} but experts has {experts.d_model}"
            )
        self.router = router
        self.experts = experts
        self.policies = policy_list(policies)
        self.shared_experts = check_shared_experts(shared_experts, router)
        self._router_replay = None
        self.group = group
        self.assignment = assignment
        self.rank, self.world_size = rank, world
        self.num_experts = num_experts
        self.local_experts = local

    @classmethod
    def from_moe(
        cls,
        moe: MoE,
        *,
        group: dist.ProcessGroup | None = None,
        assignment: str = "per_rank",
    ) -> ExpertParallelMoE:
        """This rank's expert-parallel copy of a single-process ``MoE`` with ``FFNExperts``.

        The router and policies are shared (not copied) with ``moe``; the experts are this
        rank's :func:`shard_experts` of ``moe.experts``.
        """
        if not isinstance(moe, MoE):
            raise TypeError(f"moe must be a routelab.MoE, got {type(moe).__name__}")
        rank, world = _group_info(group)
        return cls(
            moe.router,
            shard_experts(moe.experts, rank, world),
            list(moe.policies),
            group=group,
            assignment=assignment,
            shared_experts=moe.shared_experts,
        )

    # ------------------------------------------------------------------ forward
    def route(
        self, x: Tensor, token_ids: Tensor | None = None, *, sequence_length: int | None = None
    ) -> Routing:
        """The local routing of ``x [T_r, d]`` (global expert ids), before the policies
        (recorded or replayed inside ``routelab.replay.RouterReplay``)."""
        fresh = None
        if self.assignment == "global":

            def fresh() -> Routing:
                return self._global_assignment(x, token_ids)

        return run_router(
            self, self.router, x, token_ids, sequence_length=sequence_length, fresh=fresh
        )

    def _global_assignment(self, x: Tensor, token_ids: Tensor | None) -> Routing:
        """BASE over all ranks' tokens: gather the scores, solve once, keep my slice."""
        router = self.router
        assert isinstance(router, BalancedAssignmentRouter)

        def solve_over_all_ranks(scores: Tensor) -> Tensor:
            all_scores, sizes = all_gather_rows(scores, self.group)  # [sum T_r, E]
            start = sum(sizes[: self.rank])
            return router.assign(all_scores)[start : start + scores.shape[0]]

        return router.route_with_assignment(x, token_ids, assign=solve_over_all_ranks)

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> MoEOutput:
        """``x [..., d]`` (and ``token_ids [...]``) -> ``MoEOutput(output [..., d], routing)``."""
        flat_x, flat_ids, leading = flatten_tokens(x, token_ids)
        weight = next(self.experts.parameters(), None)  # checked before any collective
        if weight is not None and (flat_x.dtype != weight.dtype or flat_x.device != weight.device):
            raise TypeError(
                f"x is {flat_x.dtype} on {flat_x.device} but the expert shard is "
                f"{weight.dtype} on {weight.device}"
            )
        routing = self.route(flat_x, flat_ids, sequence_length=sequence_length_of(x))
        for policy in self.policies:
            routing = policy(routing)
        y = self.dispatch_combine(flat_x, routing)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat_x)
        return MoEOutput(y.reshape(*leading, y.shape[-1]), routing)

    def dispatch_combine(self, x: Tensor, routing: Routing) -> Tensor:
        """Run any local Routing over ``x [T_r, d]`` on the sharded experts -> ``y [T_r, d]``.

        ``y_t = sum over entries n of token t: weight_n * FFN_{expert_n}(x_t)``, the same as
        ``FFNExperts.forward`` on the full experts, with each entry's FFN evaluated on the
        rank that holds its expert.
        """
        if routing.num_experts != self.num_experts or routing.num_tokens != x.shape[0]:
            raise ValueError(
                f"routing is over T = {routing.num_tokens}, E = {routing.num_experts}; "
                f"expected T = {x.shape[0]}, E = {self.num_experts}"
            )
        world, e_local = self.world_size, len(self.local_experts)
        plan = ExpertDispatch.plan(routing)  # the one sort, on the sending side
        # [W, E/W]: row s holds what rank s sends to each of my experts
        recv_counts = _exchange(plan.counts, [e_local] * world, [e_local] * world, self.group)
        recv_counts = recv_counts.view(world, e_local)
        # one host transfer for every size the exchanges and the local experts need
        host = torch.cat(
            [plan.counts.view(world, e_local).sum(1), recv_counts.sum(1), recv_counts.sum(0)]
        ).tolist()
        send_splits, recv_splits = host[:world], host[world : 2 * world]
        local_counts = ExpertSegments(recv_counts.sum(0), sizes=host[2 * world :])

        received = all_to_all(plan.gather(x), send_splits, recv_splits, self.group)  # [M, d]
        # the rows arrive by source rank, then by local expert: put them in expert order
        # (a permutation computed from the counts, no sort), run, and put them back
        order = _source_to_expert_order(recv_counts, received.shape[0])
        if order is None:
            outputs = self.experts.run_sorted(received, local_counts)
        else:
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(order.shape[0], device=order.device)
            sorted_out = self.experts.run_sorted(received.index_select(0, order), local_counts)
            outputs = sorted_out.index_select(0, inverse)
        returned = all_to_all(outputs, recv_splits, send_splits, self.group)  # [N, d]
        return plan.combine(returned, x.shape[0], x.dtype)

    def expert_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters of this rank's expert shard (not replicated)."""
        return self.experts.parameters()

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, rank={self.rank}, world_size={self.world_size}, "
            f"local_experts=[{self.local_experts.start}, {self.local_experts.stop}), "
            f"assignment={self.assignment!r}"
        )


def _source_to_expert_order(chunks: Tensor, num_rows: int) -> Tensor | None:
    """The rows of chunks laid out source-major (``chunks [W, E_l]``: rank s's rows for
    local expert e) read in expert-major order: int64 ``[num_rows]`` with
    ``rows[order]`` sorted by expert (stable within an expert, by source rank). None when
    the layout is expert-major already (one rank or one local expert)."""
    world, e_local = chunks.shape
    if world == 1 or e_local == 1:
        return None
    sizes = chunks.reshape(-1)
    source_start = (torch.cumsum(sizes, 0) - sizes).view(world, e_local).t().reshape(-1)
    by_expert = chunks.t().reshape(-1)  # chunk sizes in (expert, source) order
    expert_start = torch.cumsum(by_expert, 0) - by_expert
    shift = torch.repeat_interleave(source_start - expert_start, by_expert, output_size=num_rows)
    return torch.arange(num_rows, device=chunks.device) + shift


# ---------------------------------------------------------------------- data parallel
def _sharded_ids(model: nn.Module) -> set[int]:
    return {
        id(p)
        for module in model.modules()
        if isinstance(module, ExpertParallelMoE)
        for p in module.expert_parameters()
    }


def replicated_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter of ``model`` except the expert shards of its ExpertParallelMoE layers."""
    sharded = _sharded_ids(model)
    return [p for p in model.parameters() if id(p) not in sharded]


def all_reduce_replicated_grads(
    model: nn.Module, group: dist.ProcessGroup | None = None, *, average: bool = False
) -> None:
    """Sum (or average) the gradients of the replicated parameters over ``group``.

    The expert shards are left alone: their gradients already hold every rank's tokens.
    With the default sum, every gradient is that of the sum of the per-rank losses.
    One flat all-reduce per dtype; parameters without a gradient count as zero.
    """
    _, world = _group_info(group)
    params = [p for p in replicated_parameters(model) if p.requires_grad]
    by_dtype: dict[tuple[torch.dtype, torch.device], list[nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault((p.dtype, p.device), []).append(p)
    for plist in by_dtype.values():
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in plist]
        )
        dist.all_reduce(flat, group=group)
        if average:
            flat /= world
        offset = 0
        for p in plist:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n


def broadcast_replicated(
    model: nn.Module, src: int = 0, group: dist.ProcessGroup | None = None
) -> None:
    """Copy the replicated parameters and buffers of global rank ``src`` to every rank."""
    _group_info(group)
    sharded = _sharded_ids(model)
    with torch.no_grad():
        for p in replicated_parameters(model):
            dist.broadcast(p.data, src=src, group=group)
        for b in model.buffers():
            if id(b) not in sharded:
                dist.broadcast(b, src=src, group=group)

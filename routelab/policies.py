"""Policies: ``Routing -> Routing`` transforms that compose with any router.

A policy is an ``nn.Module`` (it may hold state, e.g. running loads) whose
``forward(routing)`` returns a new Routing over the same tokens and experts.
``MoE(router, experts, policies=[...])`` applies them in order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from routelab.router import check_k
from routelab.routing import Routing, _require_int, capacity_from_factor, require_routing

__all__ = ["CapacityPolicy", "LossFreeBalancingPolicy", "PausingPolicy", "Policy"]


class Policy(nn.Module):
    """Base class: ``forward(routing: Routing) -> Routing``."""

    def forward(self, routing: Routing) -> Routing:
        raise NotImplementedError

    @staticmethod
    def check_routing_arg(routing: object) -> Routing:
        return require_routing(routing)


def policy_list(policies: Sequence[nn.Module]) -> nn.ModuleList:
    """Validate an MoE layer's ``policies`` argument: every entry a Policy module."""
    for i, policy in enumerate(policies):
        if not isinstance(policy, nn.Module):
            raise TypeError(f"policies[{i}] must be a Policy module, got {type(policy).__name__}")
    return nn.ModuleList(policies)


class CapacityPolicy(Policy):
    """Limit every expert to a capacity C; drop the overflow (Switch / GShard).

    Capacity is either absolute (``capacity=C``) or a factor
    ``C = ceil(capacity_factor * N / E)`` with N the number of entries (T*k for a top-k
    gate), as in Fedus et al. 2021 (Switch Transformers) and Lepikhin et al. 2020
    (GShard). Which entries an over-full expert keeps:

    - ``drop_order="position"``: in token order (earlier tokens first; entries of one
      token in their routing order), as in Switch/GShard.
    - ``drop_order="score"``: by descending combine weight (batch-prioritised routing,
      Riquelme et al. 2021): confident entries are kept, ties broken by position.

    The kept entries keep their weights (a dropped token passes through the residual).
    The result records ``dropped`` (the removed entries, as a Routing) and ``capacity``.
    """

    DROP_ORDERS = ("position", "score")

    def __init__(
        self,
        capacity_factor: float | None = None,
        *,
        capacity: int | None = None,
        drop_order: str = "position",
        min_capacity: int = 0,
    ) -> None:
        super().__init__()
        if (capacity_factor is None) == (capacity is None):
            raise ValueError(
                "give exactly one of capacity_factor and capacity, got "
                f"capacity_factor={capacity_factor!r}, capacity={capacity!r}"
            )
        if capacity_factor is not None and (
            isinstance(capacity_factor, bool)
            or not isinstance(capacity_factor, (int, float))
            or not capacity_factor > 0
        ):
            raise ValueError(f"capacity_factor must be a number > 0, got {capacity_factor!r}")
        if capacity is not None and (
            isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0
        ):
            raise ValueError(f"capacity must be an int >= 0, got {capacity!r}")
        if drop_order not in self.DROP_ORDERS:
            raise ValueError(f"drop_order must be one of {self.DROP_ORDERS}, got {drop_order!r}")
        if isinstance(min_capacity, bool) or not isinstance(min_capacity, int) or min_capacity < 0:
            raise ValueError(f"min_capacity must be an int >= 0, got {min_capacity!r}")
        self.capacity_factor = capacity_factor
        self.capacity = capacity
        self.drop_order = drop_order
        self.min_capacity = min_capacity

    def capacity_for(self, routing: Routing) -> int:
        """The capacity C this policy enforces on ``routing``."""
        if self.capacity is not None:
            return self.capacity
        assert self.capacity_factor is not None
        factor_cap = capacity_from_factor(
            self.capacity_factor, routing.num_entries, routing.num_experts
        )
        return max(factor_cap, self.min_capacity)

    def priority_order(self, routing: Routing) -> Tensor:
        """int64 ``[N]``: entry indices, most deserving of a slot first."""
        if self.drop_order == "score":
            return torch.argsort(routing.weight.detach(), descending=True, stable=True)
        return torch.argsort(routing.token, stable=True)

    def forward(self, routing: Routing) -> Routing:
        routing = self.check_routing_arg(routing)
        capacity = self.capacity_for(routing)
        keep = keep_within_capacity(
            routing.expert, self.priority_order(routing), routing.num_experts, capacity
        )
        kept = routing.select(keep)
        kept.dropped, kept.capacity = all_dropped(routing, ~keep), capacity
        return kept

    def extra_repr(self) -> str:
        size = (
            f"capacity={self.capacity}"
            if self.capacity is not None
            else f"capacity_factor={self.capacity_factor}"
        )
        return f"{size}, drop_order={self.drop_order!r}"


def keep_within_capacity(
    expert: Tensor, priority: Tensor, num_experts: int, capacity: int | Tensor
) -> Tensor:
    """bool ``[N]``: which entries fit when each expert takes its first ``capacity`` entries.

    ``expert int64 [N]``; ``priority int64 [N]`` lists entry indices best first;
    ``capacity`` an int or int64 ``[E]``. Vectorised: sort by (expert, priority rank) and
    keep each entry whose rank inside its expert's segment is below the capacity.
    """
    n = expert.shape[0]
    by_expert = priority[torch.argsort(expert[priority], stable=True)]
    counts = torch.bincount(expert, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    sorted_expert = expert[by_expert]
    rank_in_expert = torch.arange(n, device=expert.device) - starts[sorted_expert]
    cap = torch.as_tensor(capacity, device=expert.device)
    limit = cap if cap.dim() == 0 else cap[sorted_expert]
    keep = torch.zeros(n, dtype=torch.bool, device=expert.device)
    keep[by_expert] = rank_in_expert < limit
    return keep


def all_dropped(routing: Routing, removed: Tensor) -> Routing:
    """The entries a policy removes from ``routing`` (bool ``removed [N]``), together with
    those earlier policies already dropped: the new ``routing.dropped``."""
    dropped = routing.select(removed)
    dropped.dropped, dropped.capacity = None, None
    if routing.dropped is not None:  # accumulate over stacked policies
        dropped = _concat_entries(routing.dropped, dropped)
    return dropped


def _concat_entries(first: Routing, second: Routing) -> Routing:
    """The entries of two Routings over the same T and E, one after the other."""
    return Routing(
        token=torch.cat([first.token, second.token]),
        expert=torch.cat([first.expert, second.expert]),
        weight=torch.cat([first.weight, second.weight]),
        num_tokens=first.num_tokens,
        num_experts=first.num_experts,
    )


class PausingPolicy(Policy):
    """Pause over-assigned experts (Eigen, Ranzato and Sutskever 2013, Deep MoE).

    Keeps each expert's running total assignment ``A_e`` (a buffer ``totals [E]``: the
    number of entries the expert has received in training, after this policy) and,
    before routing a training batch, pauses every expert whose total exceeds the mean
    by a relative margin::

        paused_e  <=>  A_e > mean_j(A_j) * (1 + margin)

    A paused expert receives no tokens. Its entries are

    - re-routed (``reroute=True`` and the routing has ``probs``): each moves to the
      token's most probable expert that is neither paused nor already chosen by that
      token, keeping its combine weight (so a top-k token keeps k entries summing to 1);
      an entry with no such expert left is dropped;
    - dropped otherwise, and recorded in ``routing.dropped`` like a capacity policy's
      overflow (the token passes through the residual).

    A paused expert's total stops growing while the mean grows, so it is released as
    soon as ``A_e <= mean * (1 + margin)`` again. Since the mean never exceeds the
    largest total, at least one expert is always unpaused. In eval mode the policy
    passes the routing through unchanged (the paper uses the constraint in training
    only) unless ``active_in_eval``; totals are updated in training only.
    ``paused`` (a bool buffer ``[E]``) holds the set used on the last batch.

    Args:
        num_experts: E.
        margin: relative margin >= 0 above the mean total.
        reroute: re-route a paused expert's entries where probs exist (else drop them).
        active_in_eval: also pause (with frozen totals) in eval mode.
    """

    def __init__(
        self,
        num_experts: int,
        *,
        margin: float = 0.1,
        reroute: bool = True,
        active_in_eval: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be an int >= 1, got {num_experts!r}")
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not margin >= 0:
            raise ValueError(f"margin must be a number >= 0, got {margin!r}")
        self.num_experts = num_experts
        self.margin = float(margin)
        self.reroute = bool(reroute)
        self.active_in_eval = bool(active_in_eval)
        self.register_buffer("totals", torch.zeros(num_experts, dtype=torch.float64))
        self.register_buffer("paused", torch.zeros(num_experts, dtype=torch.bool))

    def paused_experts(self) -> Tensor:
        """bool ``[E]``: the experts the current totals pause."""
        return self.totals > self.totals.mean() * (1.0 + self.margin)

    def forward(self, routing: Routing) -> Routing:
        routing = self.check_routing_arg(routing)
        if routing.num_experts != self.num_experts:
            raise ValueError(
                f"routing has num_experts = {routing.num_experts}, policy has {self.num_experts}"
            )
        if not self.training and not self.active_in_eval:
            return routing
        paused = self.paused_experts()
        self.paused.copy_(paused)
        paused = paused.to(routing.device)
        hit = paused[routing.expert]
        expert = routing.expert
        keep = ~hit
        if self.reroute and routing.probs is not None and bool(hit.any()):
            expert, moved = _reroute(routing, paused, hit)
            keep = keep | moved
        out = routing.select(keep)
        out.expert = expert[keep]
        if bool((~keep).any()):
            out.dropped = all_dropped(routing, ~keep)
        if self.training:
            self.totals += out.load().to(self.totals)
        return out

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, margin={self.margin}, reroute={self.reroute}"


def _reroute(routing: Routing, paused: Tensor, hit: Tensor) -> tuple[Tensor, Tensor]:
    """Move the ``hit`` entries to each token's best free expert by ``probs``.

    Returns the new ``expert [N]`` and a bool ``[N]`` of the hit entries that found a
    free expert (not paused, not already chosen by the token; distinct per token).
    """
    assert routing.probs is not None
    T, E = routing.num_tokens, routing.num_experts
    blocked = paused.unsqueeze(0).expand(T, E).clone()
    blocked[routing.token, routing.expert] = True
    scores = routing.probs.detach().masked_fill(blocked, float("-inf"))
    order = torch.argsort(scores, dim=1, descending=True, stable=True)  # [T, E]
    free = (~blocked).sum(1)  # [T]
    idx = torch.nonzero(hit).squeeze(1)
    idx = idx[torch.argsort(routing.token[idx], stable=True)]
    tokens = routing.token[idx]
    counts = torch.bincount(tokens, minlength=T)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(idx.shape[0], device=idx.device) - starts[tokens]
    ok = rank < free[tokens]
    expert = routing.expert.clone()
    expert[idx[ok]] = order[tokens[ok], rank[ok]]
    moved = torch.zeros_like(hit)
    moved[idx[ok]] = True
    return expert, moved


class LossFreeBalancingPolicy(Policy):
    """Balancing without an auxiliary loss: a per-expert selection bias (Wang, Gao, Zhao,
    Dai & Lin 2024, Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts;
    used by DeepSeek-V3).

    Formula (``s = routing.probs [T, E]`` the router's scores, ``b [E]`` the bias)::

        chosen(x) = TopK(s(x) + b, k)                          selection uses the bias
        weight(x, i) = s_i(x) / sum_{j in chosen(x)} s_j(x)    weights use the UNBIASED s

    For softmax scores the renormalised probabilities equal ``softmax`` over the chosen
    logits (``topk_softmax_routing(..., select_logits=...)``); we renormalise the probs, so
    the weights stay differentiable into the router through ``probs``. Each token gets
    exactly k entries summing to 1 (uniform 1/k if all chosen scores underflow to 0); with
    k = 1 the weight is therefore 1 (as for ``TopKGate(k=1)``, not Switch's ``p_i(x)``).
    After each call in training mode, with ``load_e`` the entries of expert e::

        b_e += rate * sign(T * k / E - load_e)

    (overloaded experts become less attractive, underloaded ones more). ``bias`` is a
    registered buffer (saved in the ``state_dict``, not trained); eval mode leaves it
    alone. The incoming routing's entries are replaced; its ``probs`` and ``aux`` are kept.
    Place it before any capacity policy (it needs the router's full ``probs``).

    Args:
        num_experts: E.
        k: experts per token, ``1 <= k <= E``.
        rate: the bias update speed (gamma in the paper; DeepSeek-V3 uses 1e-3).
    """

    def __init__(self, num_experts: int, *, k: int = 2, rate: float = 1e-3) -> None:
        super().__init__()
        self.num_experts = _require_int("num_experts", num_experts, 1)
        self.k = check_k(k, num_experts)
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate >= 0:
            raise ValueError(f"rate must be a number >= 0, got {rate!r}")
        self.rate = float(rate)
        self.register_buffer("bias", torch.zeros(num_experts))

    def forward(self, routing: Routing) -> Routing:
        routing = self.check_routing_arg(routing)
        if routing.probs is None:
            raise ValueError(
                "LossFreeBalancingPolicy needs routing.probs [T, E] (the router's scores); "
                "this routing has probs=None"
            )
        if routing.num_experts != self.num_experts:
            raise ValueError(
                f"routing has num_experts = {routing.num_experts}, "
                f"this policy was built for {self.num_experts}"
            )
        if routing.dropped is not None:
            raise ValueError("LossFreeBalancingPolicy must run before any capacity policy")
        scores = routing.probs  # [T, E]
        biased = scores.detach() + self.bias.to(scores.dtype)
        chosen = torch.topk(biased, self.k, dim=-1).indices  # [T, k]
        picked = scores.gather(-1, chosen)  # unbiased scores of the chosen experts
        total = picked.sum(dim=-1, keepdim=True)
        positive = total > 0
        weights = torch.where(
            positive,
            picked / torch.where(positive, total, torch.ones_like(total)),
            torch.full_like(picked, 1.0 / self.k),
        )
        out = Routing.from_topk(chosen, weights, self.num_experts, probs=scores, aux=routing.aux)
        if self.training and routing.num_tokens > 0 and self.rate > 0:
            with torch.no_grad():
                load = torch.bincount(chosen.reshape(-1), minlength=self.num_experts)
                mean_load = routing.num_tokens * self.k / self.num_experts
                step = torch.sign(mean_load - load.to(self.bias.dtype))
                self.bias.add_(self.rate * step)
        return out

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, k={self.k}, rate={self.rate}"

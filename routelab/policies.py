"""Policies: ``Routing -> Routing`` transforms that compose with any router.

A policy is an ``nn.Module`` whose ``forward(routing)`` returns a new Routing over the
same tokens and experts (Routings are immutable: build the result, never edit the input).
``MoE(router, experts, policies=[...])`` applies them in order. A policy with state
(running loads, a bias) also subclasses :class:`routelab.balancing.BalancingState`: it
observes in ``forward`` and changes its state only in the explicit update step
(``update_balancing(model, group)`` after ``optimizer.step()``). Every policy passes
:class:`routelab.testing.PolicyContract`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from routelab._validate import (
    INT64_MAX,
    exact_fraction,
    require_bool,
    require_float,
    require_int,
    require_optional_int,
)
from routelab.balancing import BalancingState, SelectionBias
from routelab.router import check_k
from routelab.routers.topk import TopKSelection
from routelab.routing import Routing, capacity_from_factor, require_routing

__all__ = [
    "CapacityPolicy",
    "LossFreeBalancingPolicy",
    "PausingPolicy",
    "Policy",
    "choice_rank",
    "pause_experts",
]


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
    ``C = max(min_capacity, ceil(capacity_factor * N / E))`` with N the number of entries
    (T*k for a top-k gate), as in Fedus et al. 2021 (Switch Transformers) and Lepikhin
    et al. 2020 (GShard), computed exactly on the decimal written (``1.1`` is 11/10; see
    :func:`routelab.routing.capacity_from_factor`).

    Which entries an over-full expert keeps (``drop_order``; ``DROP_ORDERS`` lists them).
    An entry's *choice rank* j is its position among its token's entries in routing order
    (0 for the first choice: ``Routing.from_topk`` lays out each token's experts by
    descending score), see :func:`choice_rank`:

    - ``"token"`` (token-major): by token index, a token's entries in their routing order.
      Token t's second choice beats token t+1's first choice for the same expert. This
      is Megatron-Core's ``moe_token_drop_policy="position"``. ``"position"`` is accepted
      as a deprecated alias of ``"token"`` (it was routelab's name for this order).
    - ``"choice"`` (choice-major): every token's first choice is queued before any second
      choice, earlier tokens first within a choice rank: sort by (j, t). This is GShard's
      Algorithm 1 (Lepikhin et al. 2020) as mesh-tensorflow and flaxformer implement it
      (the position in an expert's buffer counts the first choices before the second).
    - ``"batch_priority"``: batch-prioritised routing (Riquelme et al. 2021, V-MoE): tokens
      are ranked by their top gate value ``max_e probs[t, e]`` (the largest combine weight
      of the token when the routing has no ``probs``), descending, ties to the earlier
      token; then choice-major over that ranking: sort by (j, rank of t).
    - ``"score"``: per entry, by descending combine weight, ties to the earlier entry
      (Megatron-Core's ``moe_token_drop_policy="probs"``). Not Riquelme's BPR, which
      ranks tokens, not entries.

    For top-1 routing ``token`` and ``choice`` coincide. The kept entries keep their
    weights (a dropped token passes through the residual). The result records
    ``dropped`` (the removed entries, as a Routing) and ``capacity``.
    """

    DROP_ORDERS: ClassVar[tuple[str, ...]] = ("token", "choice", "batch_priority", "score")
    DROP_ORDER_ALIASES: ClassVar[Mapping[str, str]] = {"position": "token"}

    def __init__(
        self,
        capacity_factor: float | None = None,
        *,
        capacity: int | None = None,
        drop_order: str = "token",
        min_capacity: int = 0,
    ) -> None:
        super().__init__()
        if (capacity_factor is None) == (capacity is None):
            raise ValueError(
                "give exactly one of capacity_factor and capacity, got "
                f"capacity_factor={capacity_factor!r}, capacity={capacity!r}"
            )
        self._factor = (
            None if capacity_factor is None else exact_fraction("capacity_factor", capacity_factor)
        )
        self.capacity = require_optional_int("capacity", capacity, 0, INT64_MAX)
        self.drop_order = resolve_drop_order(drop_order)
        self.min_capacity = require_int("min_capacity", min_capacity, 0, INT64_MAX)
        self.capacity_factor = None if capacity_factor is None else float(capacity_factor)

    def capacity_for(self, routing: Routing) -> int:
        """The capacity C this policy enforces on ``routing`` (an exact integer)."""
        if self.capacity is not None:
            return self.capacity
        assert self._factor is not None
        factor_cap = capacity_from_factor(self._factor, routing.num_entries, routing.num_experts)
        return max(factor_cap, self.min_capacity)

    def priority_order(self, routing: Routing) -> Tensor:
        """int64 ``[N]``: entry indices, most deserving of a slot first."""
        return drop_priority(routing, self.drop_order)

    def forward(self, routing: Routing) -> Routing:
        routing = self.check_routing_arg(routing)
        capacity = self.capacity_for(routing)
        # No expert can hold more than N entries: clamp before it meets an int64 tensor.
        limit = min(capacity, routing.num_entries)
        keep = keep_within_capacity(
            routing.expert, self.priority_order(routing), routing.num_experts, limit
        )
        return routing.select(keep, dropped=all_dropped(routing, ~keep), capacity=capacity)

    def extra_repr(self) -> str:
        size = (
            f"capacity={self.capacity}"
            if self.capacity is not None
            else f"capacity_factor={self.capacity_factor}"
        )
        return f"{size}, drop_order={self.drop_order!r}"


def resolve_drop_order(drop_order: object) -> str:
    """The canonical name of ``drop_order`` (one of ``CapacityPolicy.DROP_ORDERS``);
    ``"position"`` maps to ``"token"`` with a DeprecationWarning."""
    if isinstance(drop_order, str) and drop_order in CapacityPolicy.DROP_ORDER_ALIASES:
        canonical = CapacityPolicy.DROP_ORDER_ALIASES[drop_order]
        warnings.warn(
            f"drop_order={drop_order!r} is deprecated: it is the token-major order, now "
            f"named {canonical!r} (GShard's choice-major order is 'choice')",
            DeprecationWarning,
            stacklevel=3,
        )
        return canonical
    if not isinstance(drop_order, str) or drop_order not in CapacityPolicy.DROP_ORDERS:
        raise ValueError(
            f"drop_order must be one of {CapacityPolicy.DROP_ORDERS}, got {drop_order!r}"
        )
    return drop_order


def choice_rank(routing: Routing) -> Tensor:
    """int64 ``[N]``: each entry's position among its token's entries, in routing order
    (0 = the token's first choice for a ``Routing.from_topk`` layout)."""
    token = routing.token
    order = torch.argsort(token, stable=True)
    counts = torch.bincount(token, minlength=routing.num_tokens)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(token)
    rank[order] = torch.arange(token.shape[0], device=token.device) - starts[token[order]]
    return rank


def token_priority(routing: Routing) -> Tensor:
    """float ``[T]``: each token's top gate value, ``probs.max(dim=1)`` where the routing
    has probs, else the token's largest combine weight (0 for a token without entries)."""
    if routing.probs is not None:
        return routing.probs.detach().amax(dim=1) if routing.num_experts else routing.probs
    top = routing.weight.detach().new_zeros(routing.num_tokens)
    return top.scatter_reduce(0, routing.token, routing.weight.detach(), "amax")


def drop_priority(routing: Routing, drop_order: str) -> Tensor:
    """int64 ``[N]``: entry indices, best first, for one of ``CapacityPolicy.DROP_ORDERS``."""
    if drop_order == "token":
        return torch.argsort(routing.token, stable=True)
    if drop_order == "score":
        return torch.argsort(routing.weight.detach(), descending=True, stable=True)
    T = max(routing.num_tokens, 1)
    if drop_order == "choice":
        token_rank = routing.token
    elif drop_order == "batch_priority":
        by_priority = torch.argsort(token_priority(routing), descending=True, stable=True)
        rank_of_token = torch.empty_like(by_priority)
        rank_of_token[by_priority] = torch.arange(T, device=by_priority.device)[
            : by_priority.shape[0]
        ]
        token_rank = rank_of_token[routing.token]
    else:
        raise ValueError(f"drop_order must be one of {CapacityPolicy.DROP_ORDERS}")
    return torch.argsort(choice_rank(routing) * T + token_rank, stable=True)


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
    dropped = routing.select(removed, dropped=None, capacity=None, aux={})
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


def _per_token_sum(routing: Routing, values: Tensor) -> Tensor:
    """``[T]``: the sum of ``values [N]`` over each token's entries."""
    return values.new_zeros(routing.num_tokens).index_add(0, routing.token, values)


def is_normalised(routing: Routing, atol: float = 1e-5) -> bool:
    """Whether every token with entries has weights summing to 1 (a normalised gate:
    softmax, top-k with renormalisation, DSelect-k), as opposed to Switch's ``p_i(x)``."""
    if not routing.num_entries:
        return True
    sums = _per_token_sum(routing, routing.weight.detach().double())
    has = routing.entries_per_token() > 0
    return bool(((sums - 1).abs()[has] <= atol).all())


class PausingPolicy(Policy, BalancingState):
    """Pause over-assigned experts (Eigen, Ranzato and Sutskever 2013, Learning Factored
    Representations in a Deep Mixture of Experts: their training constraint).

    State: each expert's running total assignment *mass* ``A_e = sum over training tokens
    of g_e(x)``, the gate values it received after this policy (a float64 buffer
    ``totals [E]``). An expert whose total exceeds the mean total by more than the margin
    m is paused::

        paused_e  <=>  A_e - mean_j(A_j) > m          (m = margin, in units of gate mass)

    A paused expert receives nothing. In a paused expert's place:

    - ``reroute=True`` and the routing has ``probs``: each of its entries moves to the
      token's most probable expert (by ``probs``) that is neither paused nor already
      chosen by that token (an entry with no such expert left is dropped);
    - otherwise the entry is dropped, and recorded in ``routing.dropped`` like a capacity
      policy's overflow.

    Weights. For a normalised gate (every token's weights summed to 1: dense softmax,
    top-k with renormalisation) paused experts leave the gate's normalisation, as in the
    paper: each touched token's weights are renormalised over the experts it keeps, so
    they still sum to 1 (a dense ``SoftmaxGate`` gives ``softmax`` over the unpaused
    experts; a top-k gate gives the top-k of the unpaused experts, renormalised). A
    re-routed entry first gets the router's weight for the new expert,
    ``probs[t, new] * sum_j w_tj / sum_j probs[t, e_j]`` (the token's own weight-to-prob
    scale). For a gate whose weights are not normalised (Switch's ``p_i(x)``) a
    re-routed entry's weight is ``probs[t, new]`` and the others are left alone.
    Weights stay differentiable in the router's ``weight`` and ``probs``.

    Life cycle (``routelab.balancing``): ``forward`` observes the mass it assigned; the
    totals change only in the explicit update step (:func:`routelab.balancing.update_balancing`
    after ``optimizer.step()``), all-reduced over the process group when one is given,
    so every rank pauses the same experts and a checkpoint recompute never counts twice.
    The paused set is a function of the totals (:meth:`paused_experts`), so it is the same
    for every micro-batch between two updates. Since the mean never exceeds the largest
    total, at least one expert is always unpaused. In eval mode the policy passes the
    routing through unchanged unless ``active_in_eval`` (then with the frozen totals).

    Deliberate differences from the paper: the paper updates its totals per example and
    applies the constraint in the early part of training (stop it by removing the policy
    or with ``margin=float("inf")``); here totals move once per update step, summed over
    its micro-batches (and ranks). Re-routing (for sparse gates) is routelab's addition:
    the paper's gate is dense.

    Args:
        num_experts: E.
        margin: m >= 0, the excess over the mean total (in gate mass, i.e. tokens'
            worth of assignment) an expert may accumulate before it is paused.
        reroute: re-route a paused expert's entries where probs exist (else drop them).
        active_in_eval: also pause (with frozen totals) in eval mode.
    """

    totals: Tensor

    def __init__(
        self,
        num_experts: int,
        *,
        margin: float = 0.1,
        reroute: bool = True,
        active_in_eval: bool = False,
    ) -> None:
        super().__init__()
        self.num_experts = require_int("num_experts", num_experts, 1)
        self.margin = require_float("margin", margin, minimum=0.0, finite=False)
        self.reroute = require_bool("reroute", reroute)
        self.active_in_eval = require_bool("active_in_eval", active_in_eval)
        self.register_statistic("mass", self.num_experts)
        self.register_buffer("totals", torch.zeros(self.num_experts, dtype=torch.float64))

    def paused_experts(self) -> Tensor:
        """bool ``[E]``: the experts the current totals pause."""
        return (self.totals - self.totals.mean()) > self.margin

    @property
    def paused(self) -> Tensor:
        """bool ``[E]``: the experts paused now (a function of ``totals``)."""
        return self.paused_experts()

    def forward(self, routing: Routing) -> Routing:
        routing = self.check_routing_arg(routing)
        if routing.num_experts != self.num_experts:
            raise ValueError(
                f"routing has num_experts = {routing.num_experts}, policy has {self.num_experts}"
            )
        if not self.training and not self.active_in_eval:
            return routing
        out = pause_experts(routing, self.paused_experts(), reroute=self.reroute)
        mass = out.weight.detach().double()
        self.observe(mass=mass.new_zeros(self.num_experts).index_add(0, out.expert, mass))
        return out

    def apply_update(self, statistics: Mapping[str, Tensor]) -> None:
        self.totals += statistics["mass"].to(self.totals)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, margin={self.margin}, reroute={self.reroute}"


def pause_experts(routing: Routing, paused: Tensor, *, reroute: bool = True) -> Routing:
    """``routing`` with no entry on a ``paused`` expert (bool ``[E]``); the rules are
    :class:`PausingPolicy`'s (re-route by probs where ``reroute``, renormalise the weights
    of a normalised gate, record what is dropped)."""
    paused = paused.to(routing.device)
    hit = paused[routing.expert]
    if not bool(hit.any()):
        return routing
    expert, weight = routing.expert, routing.weight
    keep = ~hit
    moved = torch.zeros_like(hit)
    if reroute and routing.probs is not None:
        expert, moved = _reroute(routing, paused, hit)
        keep = keep | moved
    normalised = is_normalised(routing)
    if bool(moved.any()):
        assert routing.probs is not None
        new_prob = routing.probs[routing.token, expert].to(weight.dtype)
        if normalised:
            prob_sum = _per_token_sum(routing, routing.probs[routing.token, routing.expert])
            weight_sum = _per_token_sum(routing, weight)
            scale = weight_sum / torch.where(prob_sum > 0, prob_sum, torch.ones_like(prob_sum))
            new_prob = new_prob * scale.to(weight.dtype)[routing.token]
        weight = torch.where(moved, new_prob, weight)
    if normalised:
        kept_weight = torch.where(keep, weight, torch.zeros_like(weight))
        total = _per_token_sum(routing, kept_weight)[routing.token]
        weight = torch.where(total > 0, weight / torch.where(total > 0, total, 1.0), weight)
    removed = ~keep
    dropped = all_dropped(routing, removed) if bool(removed.any()) else routing.dropped
    return dataclasses.replace(routing, expert=expert, weight=weight).select(keep, dropped=dropped)


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


class LossFreeBalancingPolicy(Policy, SelectionBias):
    """Balancing without an auxiliary loss: a per-expert selection bias (Wang, Gao, Zhao,
    Dai & Lin 2024, Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts;
    used by DeepSeek-V3), applied to any token-choice router that has ``probs``.

    Formula (``s = routing.probs [T, E]`` the router's scores, ``b [E]`` the bias, k the
    router's number of entries per token)::

        chosen(x) = TopK(s(x) + b, k)                      selection uses the bias
        weight(x, i) = the router's own weight rule on the UNBIASED s:
            normalised gates (each token's weights summed to 1: TopKGate, NoisyTopKGate,
            SoftmaxGate):   s_i(x) / sum_{j in chosen(x)} s_j(x)
            others (SwitchGate's p_i(x)):                    s_i(x)

    The rule is read off the incoming routing: weights equal to ``probs`` at their
    entries mean the second rule, per-token sums of 1 the first; anything else (BASE's
    sigmoid, expert choice, a varying number of entries per token) is refused with a
    ValueError. For softmax scores the renormalised probabilities equal ``softmax`` over
    the chosen logits, so TopKGate's weights keep their meaning; SwitchGate keeps
    ``p_i(x)`` and its task gradient. The weights stay differentiable through ``probs``.
    ``k`` is the router's: pass ``k`` only as a check (a mismatch raises).

    The bias is a :class:`routelab.balancing.SelectionBias`: ``forward`` observes the
    selection, and ``b_i += rate * sign(mean_j load_j - load_i)`` happens only in the
    explicit update step (:func:`routelab.balancing.update_balancing` after
    ``optimizer.step()``), on the loads all-reduced over the process group, so every rank
    holds the same bias and a checkpoint recompute never updates twice. ``bias`` is a
    buffer (in the ``state_dict``; a non-finite bias is refused on load). The incoming
    routing's ``probs`` and ``aux`` are kept. Place it before any capacity policy.

    DeepSeek-V3 applies the bias inside the gate (``TopK(s + b)``); a token-choice router
    that holds a SelectionBias itself does the same without this policy.

    Args:
        num_experts: E.
        k: None (take the router's k) or the k the router must have.
        rate: the bias update speed u >= 0 (DeepSeek-V3 uses 1e-3).
    """

    def __init__(self, num_experts: int, *, k: int | None = None, rate: float = 1e-3) -> None:
        SelectionBias.__init__(self, num_experts, rate=rate)
        self.k = None if k is None else check_k(k, self.num_experts)

    def routing_k(self, routing: Routing) -> int:
        """The router's number of entries per token (the same for every token), checked
        against ``k`` where given."""
        per_token = routing.entries_per_token()
        k = int(per_token.max()) if routing.num_tokens else (self.k or 1)
        if k == 0:
            raise ValueError("LossFreeBalancingPolicy got a routing without entries to reselect")
        if routing.num_tokens and int(per_token.min()) != k:
            raise ValueError(
                "LossFreeBalancingPolicy needs a token-choice routing with the same number "
                f"of entries k per token; got between {int(per_token.min())} and {k}"
            )
        if self.k is not None and routing.num_tokens and k != self.k:
            raise ValueError(
                f"LossFreeBalancingPolicy was built with k = {self.k} but the router gives "
                f"{k} entries per token"
            )
        return k

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
        k = self.routing_k(routing)
        if routing.num_tokens == 0:
            return routing
        scores = routing.probs  # [T, E]
        keeps_probability = bool(
            torch.allclose(
                routing.weight.detach().to(scores.dtype),
                scores.detach()[routing.token, routing.expert],
                rtol=1e-5,
                atol=1e-7,
            )
        )
        if not keeps_probability and not is_normalised(routing):
            raise ValueError(
                "LossFreeBalancingPolicy keeps the router's weight rule, but this routing's "
                "weights are neither its probs nor normalised per token (e.g. BASE's sigmoid "
                "weights); put a SelectionBias inside such a router instead"
            )
        # the one token-choice selection: TopK(s + b), weights from the unbiased s (rows
        # normalised, uniform 1/k where every chosen score underflows to 0); observed
        selection = TopKSelection(k, normalize=not keeps_probability)
        chosen = selection.select_scores(scores, selection_bias=self)
        return chosen.routing(self.num_experts, dict(routing.aux))

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, k={self.k}, rate={self.rate}"

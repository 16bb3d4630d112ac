"""Dynamic top-p routing: each token takes experts until their probability reaches p
(Huang et al. 2024)."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from routelab._validate import require_float
from routelab.losses import check_loss_weight, load_balance_loss
from routelab.router import Router, router_logits
from routelab.routing import Routing

__all__ = ["TopPGate", "router_entropy_loss", "top_p_routing"]


class TopPGate(Router):
    """Dynamic top-p gate (Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic
    Routing in MoE Models").

    Formula (``x [T, d]``)::

        P = softmax(x W + b)                              [T, E]   (= ``probs``)
        I = argsort(P, descending)                        per token, ties: lower id first
        n(x) = min { n : sum_{j <= n} P_{I_j} >= p }      at least 1, at most E
        entries of x: experts I_1 .. I_n(x), weight P_{I_j} (the probability itself)

    The number of entries varies per token: a confident token takes one expert, an
    uncertain one several. As in the paper the combine weights are the router
    probabilities, not renormalised (a token's weights sum to at least p).

    Losses (a weight of 0 switches one off; its key is then absent from ``aux``):

    - ``aux["dynamic"] = dynamic_weight * (1/T) sum_x H(P(x))`` with
      ``H(P) = -sum_i P_i log P_i``, the paper's dynamic loss: without it the router
      learns to spread its probability so that every token takes many experts
      (``router_entropy_loss``; the paper uses 1e-4).
    - ``aux["balance"] = balance_weight * E * sum_i f_i P_i`` with ``f_i`` the fraction of
      routing entries on expert i (``routelab.losses.load_balance_loss``; the
      paper uses 1e-2).

    Logits are computed in at least fp32.

    Args:
        d_model: d.
        num_experts: E.
        p: the cumulative-probability threshold, ``0 < p <= 1`` (the paper uses 0.4).
        dynamic_weight: >= 0, the coefficient of the entropy (dynamic) loss.
        balance_weight: >= 0, the coefficient of the balance loss.
        bias: whether the gate has a bias b.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        p: float = 0.4,
        dynamic_weight: float = 1e-4,
        balance_weight: float = 1e-2,
        bias: bool = False,
    ) -> None:
        super().__init__(d_model, num_experts)
        self.p = require_float("p", p, above=0.0, maximum=1.0)
        self.dynamic_weight = check_loss_weight("dynamic_weight", dynamic_weight)
        self.balance_weight = check_loss_weight("balance_weight", balance_weight)
        self.proj = nn.Linear(d_model, num_experts, bias=bias)

    def route(self, x: Tensor, token_ids: Tensor | None) -> Routing:
        logits = router_logits(x, self.proj.weight.t(), self.proj.bias)  # [T, E]
        probs = torch.softmax(logits, dim=-1)
        routing = top_p_routing(probs, self.p)
        aux: dict[str, Tensor] = {}
        if self.dynamic_weight > 0:
            aux["dynamic"] = self.dynamic_weight * router_entropy_loss(probs)
        if self.balance_weight > 0:
            aux["balance"] = self.balance_weight * load_balance_loss(probs, routing.load())
        return replace(routing, probs=probs, aux=aux)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, p={self.p}, dynamic_weight={self.dynamic_weight}, "
            f"balance_weight={self.balance_weight}"
        )


def top_p_routing(probs: Tensor, p: float) -> Routing:
    """The top-p selection of ``probs [T, E]`` as a Routing (weights = the probabilities).

    Token t keeps its experts in descending probability (ties: lower expert id first)
    up to and including the first at which the cumulative probability reaches ``p``:
    expert ``I_j`` is kept iff ``sum_{i < j} P_{I_i} < p`` (so at least one). Entries are
    token-major, each token's in descending probability. ``weight`` is differentiable.
    """
    num_tokens, num_experts = probs.shape
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    cumulative = torch.cumsum(sorted_probs.detach(), dim=-1)
    before = torch.cat([torch.zeros_like(cumulative[:, :1]), cumulative[:, :-1]], dim=-1)
    keep = before < p  # [T, E] in rank order; the top expert always (0 < p)
    token = torch.arange(num_tokens, device=probs.device)[:, None].expand_as(keep)[keep]
    return Routing(token, order[keep], sorted_probs[keep], num_tokens, num_experts)


def router_entropy_loss(probs: Tensor) -> Tensor:
    """The mean entropy of the router distribution, ``(1/T) sum_x -sum_i P_i log P_i``.

    Huang et al. 2024 (the dynamic loss). ``probs [T, E]``; ``0 log 0 = 0`` (finite
    gradients where a probability underflows); 0 for an empty batch.
    """
    if probs.shape[0] == 0:
        return probs.sum() * 0.0
    safe = torch.where(probs > 0, probs, torch.ones_like(probs))
    return -(probs * safe.log()).sum(dim=-1).mean()

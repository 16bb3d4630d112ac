"""Switch routing: top-1 with the router probability as combine weight (Fedus et al. 2021)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from routelab._validate import require_bool
from routelab.losses import check_loss_weight, router_z_loss, switch_balance_loss
from routelab.router import Router, router_logits, upcast_half
from routelab.routers.topk import TopKSelection
from routelab.routing import Routing

__all__ = ["SwitchGate"]

_SWITCH_SELECTION = TopKSelection(1, score="softmax", normalize=False)


class SwitchGate(Router):
    """Switch Transformer router (Fedus, Zoph & Shazeer 2021): top-1 routing.

    Formula (``x [T, d]``)::

        x' = x * U(1 - jitter, 1 + jitter)       multiplicative jitter, training only
        logits = x' W + b                        [T, E], computed in at least fp32
        p(x) = softmax(logits)                   [T, E]   (= ``probs``)
        expert(x) = argmax_i p_i(x)              one entry per token
        weight(x) = p_{expert(x)}(x)             the router probability of that expert

    As in the paper the combine weight is the probability ``p_i(x)`` of the chosen expert,
    so the router learns from the task loss; a token's single weight therefore does NOT
    sum to 1 (it is ``probs.max(dim=1)``). The selection is
    ``routelab.routers.topk.TopKSelection(1, normalize=False)``, the one token-choice
    top-k (ties broken by ``torch.topk``). The router
    runs in fp32 even for half-precision inputs ("selective precision"); fp64 stays fp64.

    Losses (a weight of 0 switches one off; its key is then absent from ``aux``):

    - ``aux["balance"] = balance_weight * E * sum_i f_i * P_i`` (alpha = ``balance_weight``;
      f_i the fraction of tokens sent to expert i, P_i the mean router probability of
      expert i; :func:`routelab.losses.switch_balance_loss`); equals alpha for perfectly
      uniform routing.
    - ``aux["z"] = z_weight * (1/T) sum_x logsumexp(logits(x))^2``, the router z-loss of
      Zoph et al. 2022 (ST-MoE; :func:`routelab.losses.router_z_loss`).

    Capacity factor and token dropping: compose with
    ``routelab.policies.CapacityPolicy(capacity_factor)`` (e.g. in ``MoE(..., policies=)``).

    Args:
        d_model: d.
        num_experts: E.
        balance_weight: alpha >= 0 (the paper uses 1e-2).
        z_weight: >= 0 (ST-MoE uses 1e-3).
        jitter: multiplicative input jitter epsilon in ``[0, 1)`` (the paper tried 1e-2).
        bias: whether the router has a bias b.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        balance_weight: float = 1e-2,
        z_weight: float = 0.0,
        jitter: float = 0.0,
        bias: bool = False,
    ) -> None:
        super().__init__(d_model, num_experts)
        self.balance_weight = check_loss_weight("balance_weight", balance_weight)
        self.z_weight = check_loss_weight("z_weight", z_weight)
        jitter = check_loss_weight("jitter", jitter)
        if jitter >= 1:
            raise ValueError(f"jitter must be in [0, 1), got {jitter!r}")
        self.jitter = jitter
        self.stochastic_in_training = jitter > 0
        self.proj = nn.Linear(d_model, num_experts, bias=require_bool("bias", bias))

    def logits(self, x: Tensor) -> Tensor:
        """The router logits ``[T, E]`` in at least fp32 (jittered in training)."""
        x = upcast_half(x)
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        return router_logits(x, self.proj.weight.t(), self.proj.bias)

    def route(self, x: Tensor, token_ids: Tensor | None) -> Routing:
        logits = self.logits(x)  # [T, E]
        # the one token-choice selection: softmax, top-1, weight p_i(x) (not normalised)
        selection = _SWITCH_SELECTION.select(logits)
        aux: dict[str, Tensor] = {}
        if self.balance_weight > 0:
            index = selection.indices[:, 0]
            aux["balance"] = self.balance_weight * switch_balance_loss(selection.probs, index)
        if self.z_weight > 0:
            aux["z"] = self.z_weight * router_z_loss(logits)
        return selection.routing(self.num_experts, aux)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, balance_weight={self.balance_weight}, "
            f"z_weight={self.z_weight}, jitter={self.jitter}"
        )

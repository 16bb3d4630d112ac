"""Expert-choice routing: each expert picks its top-c tokens (Zhou et al. 2022)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from routelab.router import Router, upcast_half
from routelab.routing import Routing

__all__ = ["ExpertChoiceRouter"]


class ExpertChoiceRouter(Router):
    """Expert-choice router (Zhou, Lei, Liu, Du, Huang, Zhao, Dai, Chen, Le & Laudon 2022,
    Mixture-of-Experts with Expert Choice Routing).

    Formula (``x [T, d]``)::

        S = softmax(x W + b, dim=experts)          [T, E] token-to-expert affinity (probs)
        c = min(T, ceil(capacity_factor * T / E))  the capacity of every expert
        I_e = TopK(S[:, e], c)                     expert e takes its c best tokens
        weight(t, e) = S[t, e]  for t in I_e

    Every expert gets exactly c entries (N = E*c; ties are broken by ``torch.topk``);
    a token may get zero, one or several experts and its weights need not sum to 1. The
    Routing records ``capacity = c``. Perfect load balance by construction, so no
    auxiliary loss.

    Args:
        d_model: d.
        num_experts: E.
        capacity_factor: > 0, the average number of experts per token (the paper's
            EC-CF2 uses 2).
        bias: whether the router has a bias b.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        capacity_factor: float = 2.0,
        bias: bool = True,
    ) -> None:
        super().__init__(d_model, num_experts)
        if (
            isinstance(capacity_factor, bool)
            or not isinstance(capacity_factor, (int, float))
            or not math.isfinite(capacity_factor)
            or capacity_factor <= 0
        ):
            raise ValueError(
                f"capacity_factor must be a finite number > 0, got {capacity_factor!r}"
            )
        self.capacity_factor = float(capacity_factor)
        self.proj = nn.Linear(d_model, num_experts, bias=bias)

    def capacity_for(self, num_tokens: int) -> int:
        """``c = min(T, ceil(capacity_factor * T / E))``."""
        return min(num_tokens, math.ceil(self.capacity_factor * num_tokens / self.num_experts))

    def route(self, x: Tensor, token_ids: Tensor | None) -> Routing:
        num_tokens = x.shape[0]
        probs = torch.softmax(upcast_half(self.proj(x)), dim=-1)  # [T, E]
        c = self.capacity_for(num_tokens)
        top = torch.topk(probs.t(), c, dim=-1)  # values, indices [E, c]
        expert = torch.arange(self.num_experts, device=x.device).repeat_interleave(c)
        routing = Routing(
            token=top.indices.reshape(-1),
            expert=expert,
            weight=top.values.reshape(-1),
            num_tokens=num_tokens,
            num_experts=self.num_experts,
            probs=probs,
        )
        routing.capacity = c
        return routing

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, capacity_factor={self.capacity_factor}"

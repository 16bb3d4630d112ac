"""Expert-choice routing: each expert picks its top-c tokens (Zhou et al. 2022)."""

from __future__ import annotations

from fractions import Fraction

import torch
from torch import Tensor, nn

from routelab._validate import exact_fraction, require_bool, require_int
from routelab.router import Router, router_logits
from routelab.routing import Routing, capacity_from_factor

__all__ = ["ExpertChoiceRouter"]


class ExpertChoiceRouter(Router):
    """Expert-choice router (Zhou, Lei, Liu, Du, Huang, Zhao, Dai, Chen, Le & Laudon 2022,
    Mixture-of-Experts with Expert Choice Routing).

    Formula (``x [T, d]``)::

        S = softmax(x W + b, dim=experts)          [T, E] token-to-expert affinity (probs)
        c = min(T, ceil(capacity_factor * T / E))  the capacity of every expert
        I_e = TopK(S[:, e], c)                     expert e takes its c best tokens
        weight(t, e) = S[t, e]  for t in I_e

    The capacity is rounded up and computed exactly on the decimal written
    (``capacity_factor=1.1`` is 11/10, so T = 100, E = 10 gives c = 11; the float
    product would give 12); the paper writes ``c = T * cf / E`` for sizes that divide.
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
        self._factor = exact_fraction("capacity_factor", capacity_factor)
        self.capacity_factor = float(capacity_factor)  # type: ignore[arg-type]
        self.proj = nn.Linear(d_model, num_experts, bias=require_bool("bias", bias))

    @property
    def capacity_fraction(self) -> Fraction:
        """The capacity factor as the exact rational the capacity is computed from."""
        return self._factor

    def set_capacity_factor(self, capacity_factor: object) -> None:
        """Change the capacity factor (a finite number > 0, or an exact ``Fraction``),
        e.g. to keep c when the number of experts changes."""
        self._factor = exact_fraction("capacity_factor", capacity_factor)
        self.capacity_factor = float(self._factor)

    def capacity_for(self, num_tokens: int) -> int:
        """``c = min(T, ceil(capacity_factor * T / E))``, computed exactly on the decimal
        written (``capacity_factor=1.1`` is 11/10; see
        :func:`routelab.routing.capacity_from_factor`)."""
        num_tokens = require_int("num_tokens", num_tokens, 0)
        return min(num_tokens, capacity_from_factor(self._factor, num_tokens, self.num_experts))

    def route(self, x: Tensor, token_ids: Tensor | None) -> Routing:
        num_tokens = x.shape[0]
        probs = torch.softmax(router_logits(x, self.proj.weight.t(), self.proj.bias), dim=-1)
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
            capacity=c,
        )
        return routing

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, capacity_factor={self.capacity_factor}"

"""Dense softmax gating: every expert gets every token (Jacobs et al. 1991)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from routelab._validate import require_bool, require_float
from routelab.router import MIN_TEMPERATURE, Router, router_logits
from routelab.routing import Routing

__all__ = ["SoftmaxGate"]


class SoftmaxGate(Router):
    """Dense softmax gate (Jacobs, Jordan, Nowlan & Hinton 1991, Adaptive Mixtures of
    Local Experts).

    Formula::

        logits = (x W + b) / temperature                   [T, E]
        G(x) = softmax(logits)                             [T, E], every entry kept

    The Routing holds all N = T*E entries, token-major (entry ``t * E + e``), even where a
    weight underflows to 0; each token's weights sum to 1. ``probs`` is ``G(x)`` itself.
    Logits are computed in at least fp32.

    Args:
        d_model: d.
        num_experts: E.
        temperature: in ``[1e-6, 1e6]``; below 1 sharpens, above 1 flattens the
            distribution (below 1e-6 the softmax is an argmax at fp32 resolution and
            the logits may overflow, so such values are refused).
        bias: whether the gate has a bias b.
    """

    def __init__(
        self, d_model: int, num_experts: int, *, temperature: float = 1.0, bias: bool = True
    ) -> None:
        super().__init__(d_model, num_experts)
        self.temperature = require_float(
            "temperature", temperature, minimum=MIN_TEMPERATURE, maximum=1 / MIN_TEMPERATURE
        )
        bias = require_bool("bias", bias)
        self.differentiable = num_experts > 1  # one expert: the weight is constantly 1
        self.proj = nn.Linear(d_model, num_experts, bias=bias)

    def route(self, x: Tensor, token_ids: Tensor | None) -> Routing:
        logits = router_logits(x, self.proj.weight.t(), self.proj.bias) / self.temperature
        probs = torch.softmax(logits, dim=-1)
        return Routing.from_dense(probs, probs=probs, keep_zeros=True)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature}"

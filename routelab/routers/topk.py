"""Top-k softmax gating: ``G(x) = softmax(TopK(x W + b, k))``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from routelab.router import Router, check_k, upcast_half
from routelab.routing import Routing

__all__ = ["TopKGate"]


class TopKGate(Router):
    """Top-k gate (Shazeer et al. 2017 without noise; GShard/Mixtral-style routing).

    Formula::

        logits = x W + b                                   [T, E]
        TopK(v, k)_i = v_i if v_i is among the k largest of v, else -inf
        G(x) = softmax(TopK(logits, k))                    [T, E], k non-zeros per row

    Each token gets exactly k entries (ties broken by torch.topk, deterministically)
    whose weights sum to 1. ``probs`` holds the full ``softmax(logits) [T, E]``.
    With k = 1 the weight is exactly 1, so no gradient reaches the gate
    (``differentiable`` is False); SwitchGate keeps the probability as the weight.

    Args:
        d_model: d.
        num_experts: E.
        k: experts per token, ``1 <= k <= E``.
        bias: whether the gate has a bias b.
    """

    def __init__(self, d_model: int, num_experts: int, *, k: int = 2, bias: bool = True) -> None:
        super().__init__(d_model, num_experts)
        self.k = check_k(k, num_experts)
        self.differentiable = self.k > 1
        self.proj = nn.Linear(d_model, num_experts, bias=bias)

    def route(self, x: Tensor, token_ids: Tensor | None) -> Routing:
        logits = upcast_half(self.proj(x))  # [T, E]
        return topk_softmax_routing(logits, self.k)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}"


def topk_softmax_routing(
    logits: Tensor,
    k: int,
    aux: dict[str, Tensor] | None = None,
    *,
    select_logits: Tensor | None = None,
) -> Routing:
    """``softmax(KeepTopK(logits, k))`` as a Routing; ``logits [T, E]``.

    ``select_logits [T, E]`` (default: ``logits``) chooses which k experts are kept, the
    weights always come from ``logits``: noisy gating selects on the noisy logits, and
    loss-free balancing on biased ones.
    """
    chooser = logits if select_logits is None else select_logits
    top_idx = torch.topk(chooser, k, dim=-1).indices  # [T, k]
    top_logits = logits.gather(-1, top_idx)
    weights = torch.softmax(top_logits, dim=-1)
    probs = torch.softmax(logits, dim=-1)
    return Routing.from_topk(top_idx, weights, logits.shape[-1], probs=probs, aux=aux)

"""S-BASE: BASE routing balanced by Sinkhorn (Clark et al. 2022)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from routelab.routers.base_layer import BASERouter
from routelab.routing import Routing

__all__ = ["SinkhornRouter"]


class SinkhornRouter(BASERouter):
    """Sinkhorn-BASE router (S-BASE; Clark et al. 2022, "Unified Scaling Laws for Routed
    Language Models").

    Formula (``x [T, d]``, router weights ``W [E, d]``)::

        logits = x W^T                                          [T, E]
        training:   P = argmax_P <P, logits> + tau H(P),  P 1 = 1,  1^T P = c
                    (log-domain Sinkhorn; c the even split of T over E), rounded to an
                    assignment a meeting c exactly (capacity-aware greedy on log P)
        evaluation: a_t = argmax_e logits_te                    (greedy top-1)
        weight_t = softmax(logits)_{t, a_t}                     [T]

    The Sinkhorn plan only chooses the experts; the combine weight comes from the raw router
    scores (the softmax of the logits), which is what trains the router. Every expert gets
    exactly its quota in training. ``probs`` is ``softmax(logits) [T, E]``.

    Args:
        d_model: d.
        num_experts: E.
        temperature: tau relative to the score spread (default 1e-2).
        max_iter: Sinkhorn sweeps at most (default 100).
        solver_options: further :func:`solvers.balanced_assignment` sinkhorn options (``tol``).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        temperature: float = 1e-2,
        max_iter: int = 100,
        **solver_options: Any,
    ) -> None:
        super().__init__(
            d_model,
            num_experts,
            method="sinkhorn",
            temperature=temperature,
            max_iter=max_iter,
            **solver_options,
        )

    def routing_from_assignment(self, scores: Tensor, assignment: Tensor) -> Routing:
        """The Routing of ``assignment [T]``: weight ``softmax(logits)[t, a_t]``."""
        T, E = scores.shape
        probs = torch.softmax(scores, dim=-1)
        return Routing(
            token=torch.arange(T, device=scores.device),
            expert=assignment,
            weight=probs.gather(1, assignment.view(-1, 1)).view(-1),
            num_tokens=T,
            num_experts=E,
            probs=probs,
        )

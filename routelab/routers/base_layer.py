"""BASE layers: routing as a balanced linear assignment (Lewis et al. 2021)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from routelab.router import Router, check_router_input, router_logits
from routelab.routing import Routing
from solvers import balanced_assignment

__all__ = ["BASERouter", "BalancedAssignmentRouter"]


class BalancedAssignmentRouter(Router):
    """Base class of routers whose routing is an assignment solved over scores ``[T, E]``.

    ``route(x) = routing_from_assignment(s, assign(s))`` with ``s = expert_scores(x)``.
    Subclasses implement the three steps:

    - :meth:`expert_scores`: ``x [T, d] -> s [T, E]`` (differentiable);
    - :meth:`assign`: ``s [T, E] -> a`` int64 ``[T]`` (the balanced assignment in
      training; deterministic, so every process solving the same scores agrees);
    - :meth:`routing_from_assignment`: ``(s, a) -> Routing`` (the combine weights).

    Expert parallelism solves one problem over every rank's tokens through
    :meth:`route_with_assignment`, which replaces :meth:`assign` for one call and keeps
    the router's own input checks and weights.
    """

    def expert_scores(self, x: Tensor) -> Tensor:
        """The scores ``[T, E]`` of validated ``x [T, d]`` (at least fp32)."""
        raise NotImplementedError

    def assign(self, scores: Tensor) -> Tensor:
        """int64 ``[T]``: the expert of each token for ``scores [T, E]``."""
        raise NotImplementedError

    def routing_from_assignment(self, scores: Tensor, assignment: Tensor) -> Routing:
        """The Routing of ``assignment [T]`` over ``scores [T, E]``."""
        raise NotImplementedError

    def route(self, x: Tensor, token_ids: Tensor | None) -> Routing:
        scores = self.expert_scores(x)
        return self.routing_from_assignment(scores, self.assign(scores))

    def route_with_assignment(
        self,
        x: Tensor,
        token_ids: Tensor | None = None,
        *,
        assign: Callable[[Tensor], Tensor],
    ) -> Routing:
        """The routing of ``x [T, d]`` with ``assign(scores [T, E]) -> int64 [T]`` in place
        of :meth:`assign` (e.g. gather every rank's scores, solve once, keep this rank's
        slice). ``x`` and ``token_ids`` are validated as in ``forward``."""
        check_router_input(x, self.d_model, token_ids, need_token_ids=self.requires_token_ids)
        scores = self.expert_scores(x)
        assignment = assign(scores)
        if not isinstance(assignment, Tensor) or tuple(assignment.shape) != (x.shape[0],):
            raise ValueError(
                f"assign must return an int64 tensor [T] = [{x.shape[0]}], got "
                f"{getattr(assignment, 'shape', type(assignment).__name__)}"
            )
        return self.routing_from_assignment(scores, assignment)


class BASERouter(BalancedAssignmentRouter):
    """BASE layer router (Lewis et al. 2021, "BASE Layers: Simplifying Training of Large,
    Sparse Models").

    Formula (``h [T, d]`` the tokens, ``w [E, d]`` learnable expert embeddings)::

        s_te = h_t . w_e                                        scores [T, E]
        training:   a = argmax_{a : |{t : a_t = e}| = c_e}  sum_t s_{t, a_t}
                        (balanced linear assignment; c = even split of T over E,
                         T // E each and the first T % E experts one more)
        evaluation: a_t = argmax_e s_te                         (greedy top-1, as in the paper)
        weight_t = sigmoid(s_{t, a_t})                          [T]

    Every token gets exactly one expert; in training every expert gets exactly its quota,
    for any T (also when E does not divide it). The assignment is solved by
    :func:`solvers.balanced_assignment` on the detached scores (no gradient through it); the
    embeddings learn through the sigmoid combine weight. ``probs`` is
    ``softmax(s) [T, E]``, the affinity distribution (for analysis; BASE does not use it).

    A :class:`BalancedAssignmentRouter`: expert parallelism can all-gather the scores,
    solve the one global problem (deterministic: every process gets the same answer) and
    build its local routing (:meth:`BalancedAssignmentRouter.route_with_assignment`).

    Args:
        d_model: d.
        num_experts: E.
        method: the :func:`solvers.balanced_assignment` method used in training:
            ``"exact"`` by default (the optimum, the same on every device, and on CPU faster
            than the torch auction: benchmarks/README.md); ``"auction"`` runs the
            eps-optimal auction in torch on the scores' device.
        solver_options: passed to :func:`solvers.balanced_assignment` (e.g. ``tol=1e-4``).
    """

    def __init__(
        self, d_model: int, num_experts: int, *, method: str = "exact", **solver_options: Any
    ) -> None:
        super().__init__(d_model, num_experts)
        # Validate the method and option names up front (an empty problem solves instantly).
        balanced_assignment(np.zeros((0, num_experts)), method=method, **solver_options)
        self.method = method
        self.solver_options = dict(solver_options)
        self.expert_embeddings = nn.Parameter(torch.empty(num_experts, d_model))
        nn.init.orthogonal_(self.expert_embeddings, gain=0.1)

    def expert_scores(self, x: Tensor) -> Tensor:
        """``s = h w^T``: ``x [T, d] -> [T, E]`` (at least fp32)."""
        return router_logits(x, self.expert_embeddings.t())

    def assign(self, scores: Tensor) -> Tensor:
        """int64 ``[T]``: balanced assignment in training, greedy argmax in evaluation."""
        if not self.training:
            return scores.detach().argmax(dim=-1)
        result = balanced_assignment(scores.detach(), method=self.method, **self.solver_options)
        return result.assignment

    def routing_from_assignment(self, scores: Tensor, assignment: Tensor) -> Routing:
        """The Routing of ``assignment [T]``: weight ``sigmoid(s[t, a_t])``, probs
        ``softmax(s)``."""
        T, E = scores.shape
        chosen = scores.gather(1, assignment.view(-1, 1)).view(-1)
        return Routing(
            token=torch.arange(T, device=scores.device),
            expert=assignment,
            weight=torch.sigmoid(chosen),
            num_tokens=T,
            num_experts=E,
            probs=torch.softmax(scores, dim=-1),
        )

    def extra_repr(self) -> str:
        options = "".join(f", {k}={v!r}" for k, v in self.solver_options.items())
        return f"{super().extra_repr()}, method={self.method!r}{options}"

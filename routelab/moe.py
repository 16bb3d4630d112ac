"""The MoE layer: router -> policies -> experts, for inputs of any leading shape."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from routelab.experts import Experts
from routelab.policies import Policy, policy_list
from routelab.router import Router
from routelab.routing import Routing

__all__ = ["MoE", "MoEOutput", "flatten_tokens"]


class MoEOutput(NamedTuple):
    """``output`` in the input's shape ``[..., d]``; ``routing`` over the flattened tokens."""

    output: Tensor
    routing: Routing

    @property
    def aux_loss(self) -> Tensor:
        """The routing's summed auxiliary losses, to add to the task loss."""
        return self.routing.aux_loss


class MoE(nn.Module):
    """A Mixture-of-Experts layer: ``y = sum over routed experts e of G(x)_e * E_e(x)``.

    Pipeline: ``x [..., d] -> [T, d] -> router -> Routing -> policies -> experts ->
    y [T, d] -> [..., d]`` (Shazeer et al. 2017, with the router, the capacity and
    balancing policies and the expert executor each pluggable).

    Args:
        router: a :class:`~routelab.Router` with ``num_experts`` E.
        experts: an :class:`~routelab.experts.Experts` executor over the same E experts.
        policies: ``Routing -> Routing`` transforms applied in order (capacity, balancing).
    """

    def __init__(self, router: Router, experts: Experts, policies: Sequence[Policy] = ()) -> None:
        super().__init__()
        if not isinstance(router, nn.Module) or not hasattr(router, "num_experts"):
            raise TypeError(f"router must be a routelab.Router, got {type(router).__name__}")
        if not isinstance(experts, nn.Module) or not hasattr(experts, "num_experts"):
            raise TypeError(f"experts must be an Experts module, got {type(experts).__name__}")
        if router.num_experts != experts.num_experts:
            raise ValueError(
                f"router has num_experts = {router.num_experts} but experts has "
                f"{experts.num_experts}"
            )
        self.router = router
        self.experts = experts
        self.policies = policy_list(policies)

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> MoEOutput:
        """``x [..., d]`` (and ``token_ids [...]``) -> ``MoEOutput(output [..., d], routing)``."""
        flat_x, flat_ids, leading = flatten_tokens(x, token_ids)
        routing = self.router(flat_x, flat_ids)
        for policy in self.policies:
            routing = policy(routing)
        y = self.experts(flat_x, routing)
        return MoEOutput(y.reshape(*leading, y.shape[-1]), routing)


def flatten_tokens(x: object, token_ids: object = None) -> tuple[Tensor, Tensor | None, torch.Size]:
    """``x [..., d] -> [T, d]`` and ``token_ids [...] -> [T]``, plus the leading shape.

    Raises a clear error for a non-tensor, a 0-d ``x`` or ``token_ids`` whose shape is not
    ``x``'s without its last dimension.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension [..., d_model]")
    leading = x.shape[:-1]
    flat_ids = None
    if token_ids is not None:
        if not isinstance(token_ids, Tensor):
            raise TypeError(f"token_ids must be a torch.Tensor, got {type(token_ids).__name__}")
        if token_ids.shape != leading:
            raise ValueError(
                f"token_ids must have the shape of x without its last dimension, "
                f"{tuple(leading)}, got {tuple(token_ids.shape)}"
            )
        flat_ids = token_ids.reshape(-1)
    return x.reshape(-1, x.shape[-1]), flat_ids, leading

"""Deep Mixture of Experts: stacked MoE layers (Eigen, Ranzato and Sutskever 2013).

Eigen et al. stack two MoE layers, each ``z_l = sum_i g_il(z_{l-1}) f_il(z_{l-1})``
with ReLU experts, then a classifier ``F(x) = softmax(f_3(z_2))``. Stacking gives
``E1 * E2`` combinations of experts from ``E1 + E2`` of them ("factored
representations"); their balancing rule is :class:`routelab.policies.PausingPolicy`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from routelab._validate import require_bool, require_int
from routelab.experts import FFNExperts
from routelab.moe import MoE
from routelab.policies import Policy
from routelab.router import Router
from routelab.routers.moe_plus_plus import link_gating_residuals
from routelab.routers.topk import TopKGate
from routelab.routing import Routing
from routelab.soft_moe import SoftMoE

__all__ = ["DeepMoE", "DeepMoEOutput", "build_deep_moe"]

RouterFactory = Callable[[int, int], Router]
PolicyFactory = Callable[[int], Sequence[Policy]]
LayerFactory = Callable[[int], "MoE | SoftMoE"]


class DeepMoEOutput(NamedTuple):
    """``logits [..., C]``; ``routings``, one per MoE layer over the flattened inputs."""

    logits: Tensor
    routings: list[Routing]

    @property
    def aux_loss(self) -> Tensor:
        """The summed auxiliary losses of every layer's routing."""
        return torch.stack([r.aux_loss.reshape(()) for r in self.routings]).sum()


class DeepMoE(nn.Module):
    """Stacked MoE layers with ReLU in between, then a linear classifier.

    Shapes: ``x [..., in_features] -> Linear -> [..., d] -> (MoE -> ReLU) x L ->
    Linear -> logits [..., num_classes]``. Each MoE layer is ``MoE(make_router(d, E),
    FFNExperts(E, d, d_hidden, activation="relu"), make_policies(layer))``.

    Args:
        in_features: input size.
        num_classes: C, the classifier's outputs.
        d_model: d, the width of every MoE layer.
        num_experts: E per layer.
        num_layers: L (Eigen et al.: 2).
        d_hidden: experts' hidden width (default ``2 * d_model``).
        make_router: ``(d_model, num_experts) -> Router`` (default ``TopKGate(k=2)``;
            Eigen et al. use a dense softmax gate).
        make_policies: ``layer index -> policies`` for that layer (default none; e.g.
            ``lambda i: [PausingPolicy(E)]`` for Eigen's balancing).
        residual: add each MoE layer's input to its output (off, as in the paper). With a
            capacity or pausing policy, turn it on: a dropped token then passes through
            unchanged instead of becoming a zero vector.
        make_layer: ``layer index -> MoE`` (or ``SoftMoE``) of width ``d_model`` with
            ``num_experts`` experts, built by the caller (e.g. from a registry entry);
            replaces ``make_router``, ``make_policies`` and ``d_hidden``. MoE++ gates of
            consecutive layers are linked for gating residuals
            (``routelab.routers.moe_plus_plus.link_gating_residuals``).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        d_model: int = 64,
        num_experts: int = 8,
        num_layers: int = 2,
        d_hidden: int | None = None,
        make_router: RouterFactory | None = None,
        make_policies: PolicyFactory | None = None,
        residual: bool = False,
        make_layer: LayerFactory | None = None,
    ) -> None:
        super().__init__()
        require_int("in_features", in_features, 1)
        require_int("num_classes", num_classes, 1)
        require_int("d_model", d_model, 1)
        require_int("num_experts", num_experts, 1)
        require_int("num_layers", num_layers, 1)
        d_hidden = 2 * d_model if d_hidden is None else require_int("d_hidden", d_hidden, 1)
        self.residual = require_bool("residual", residual)
        self.embed = nn.Linear(in_features, d_model)
        if make_layer is not None and (make_policies is not None or make_router is not None):
            raise ValueError("give make_layer or make_router / make_policies, not both")

        def default_layer(i: int) -> MoE:
            router = (make_router or _default_router)(d_model, num_experts)
            policies = list(make_policies(i)) if make_policies is not None else []
            experts = FFNExperts(num_experts, d_model, d_hidden, activation="relu")
            return MoE(router, experts, policies)

        layers = []
        for i in range(num_layers):
            layer = (make_layer or default_layer)(i)
            if not isinstance(layer, (MoE, SoftMoE)) or layer.num_experts != num_experts:
                raise ValueError(
                    f"make_layer({i}) must return an MoE (or SoftMoE) with num_experts = "
                    f"{num_experts}, got {layer!r:.80}"
                )
            layers.append(layer)
        self.layers = nn.ModuleList(layers)
        link_gating_residuals(self.layers)  # MoE++ gates of consecutive layers
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> DeepMoEOutput:
        """``x [..., in_features]`` (``token_ids [...]`` for hash routers) -> output."""
        h = torch.relu(self.embed(x))
        routings = []
        for layer in self.layers:
            out = layer(h, token_ids)
            h = torch.relu(out.output + h if self.residual else out.output)
            routings.append(out.routing)
        return DeepMoEOutput(self.head(h), routings)


def _default_router(d: int, e: int) -> Router:
    return TopKGate(d, e, k=min(2, e))


def build_deep_moe(in_features: int, num_classes: int, **options: object) -> DeepMoE:
    """``DeepMoE(in_features, num_classes, **options)``; see :class:`DeepMoE`."""
    return DeepMoE(in_features, num_classes, **options)  # type: ignore[arg-type]

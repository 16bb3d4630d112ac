"""ReLU routing with an adaptive L1 penalty (ReMoE; Wang, Chen & Zhu, ICLR 2025)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routelab._validate import require_bool, require_float
from routelab.balancing import BalancingState
from routelab.router import Router, check_k, router_logits
from routelab.routing import Routing

__all__ = ["ReMoEGate", "SparsityCoefficient", "relu_l1_penalty"]


class SparsityCoefficient(BalancingState):
    """ReMoE's adaptive L1 coefficient ``lambda``, updated only in the explicit update step.

    Update rule (Wang, Chen & Zhu 2025), once per optimiser step::

        S = 1 - (number of non-zero gates) / (number of gates T * E)   observed sparsity
        lambda <- lambda * alpha ** sign(target - S)

    so lambda grows while the routing is denser than ``target = 1 - k / E`` and shrinks
    while it is sparser. The counts of every forward since the last update (and, with a
    process group, of every rank) are summed, so S is the sparsity of the whole step; a
    controller shared by several layers' gates measures the sparsity over all of them,
    as the paper does. ``forward`` only observes (``routelab.balancing.BalancingState``).

    Buffers: ``coefficient`` (float64 scalar, lambda), plus the pending counts.

    Args:
        target_sparsity: the target fraction of zero gates, in ``[0, 1)``.
        initial: lambda_0 > 0 (the paper uses 1e-8).
        multiplier: alpha > 1 (the paper uses 1.2).
    """

    coefficient: Tensor

    def __init__(
        self, target_sparsity: float, *, initial: float = 1e-8, multiplier: float = 1.2
    ) -> None:
        super().__init__()
        self.target_sparsity = require_float(
            "target_sparsity", target_sparsity, minimum=0.0, below=1.0
        )
        self.multiplier = require_float("multiplier", multiplier, above=1.0)
        initial = require_float("initial", initial, above=0.0)
        self.register_buffer("coefficient", torch.tensor(initial, dtype=torch.float64))
        self.register_statistic("active", ())
        self.register_statistic("gates", ())

    def observe_gates(self, gates: Tensor) -> bool:
        """Count the non-zero entries of one batch's gates ``[T, E]`` (pending)."""
        return self.observe(
            active=(gates.detach() > 0).sum().double(),
            gates=torch.tensor(float(gates.numel()), dtype=torch.float64),
        )

    def apply_update(self, statistics: Mapping[str, Tensor]) -> None:
        gates = float(statistics["gates"])
        if gates <= 0:
            return
        sparsity = 1.0 - float(statistics["active"]) / gates
        step = math.copysign(1.0, self.target_sparsity - sparsity)
        if sparsity == self.target_sparsity:
            step = 0.0
        value = float(self.coefficient) * self.multiplier**step
        self.coefficient.fill_(value)

    def extra_repr(self) -> str:
        return (
            f"target_sparsity={self.target_sparsity}, multiplier={self.multiplier}, "
            f"coefficient={float(self.coefficient):.3g}"
        )


class ReMoEGate(Router):
    """ReMoE's ReLU router (Wang, Chen & Zhu, ICLR 2025, "ReMoE: Fully Differentiable
    Mixture-of-Experts with ReLU Routing").

    Formula (``x [T, d]``)::

        G(x) = ReLU(x W + b)                     [T, E], the combine weights themselves
        entries of x: every expert with G(x)_e > 0 (0 to E per token, varying)

    The routing is continuous in W (no top-k jump); sparsity comes from the L1 penalty,
    whose coefficient lambda adapts toward the target sparsity ``1 - k / E`` (k is the
    average number of experts per token it aims at, as in top-k)::

        aux["l1"] = lambda * L_reg
        L_reg    = (1/T) sum_x sum_e G(x)_e                          (load_balanced=False)
        L_reg,lb = (1/T) sum_x sum_e f_e G(x)_e,                     (load_balanced=True)
                   f_e = E / (k T) * sum_x 1[G(x)_e > 0]            (not differentiated)

    The load-balanced variant (the paper's default) penalises busy experts' gates more.
    lambda lives in ``controller`` (``SparsityCoefficient``): forward observes the
    number of non-zero gates, ``routelab.balancing.update_balancing(model)`` after
    ``optimizer.step()`` applies ``lambda <- lambda * alpha ** sign(target - S)``.
    ``probs`` is None (ReLU gates are not a distribution). Logits in at least fp32.

    Args:
        d_model: d.
        num_experts: E.
        k: the target average experts per token, ``1 <= k <= E`` (target sparsity 1 - k/E).
        load_balanced: use the load-balanced penalty L_reg,lb (else the plain L1 norm).
        initial_coefficient: lambda_0 > 0 (1e-8 in the paper).
        multiplier: alpha > 1 (1.2 in the paper).
        bias: whether the router has a bias b.
        controller: a ``SparsityCoefficient`` to share (one lambda over several
            layers, as in the paper); default: a new one of this gate.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        k: int = 2,
        load_balanced: bool = True,
        initial_coefficient: float = 1e-8,
        multiplier: float = 1.2,
        bias: bool = False,
        controller: SparsityCoefficient | None = None,
    ) -> None:
        super().__init__(d_model, num_experts)
        self.k = check_k(k, num_experts)
        if k == num_experts:
            raise ValueError(f"k must be < num_experts = {num_experts} (target sparsity > 0)")
        self.load_balanced = require_bool("load_balanced", load_balanced)
        target = 1.0 - self.k / num_experts
        if controller is None:
            controller = SparsityCoefficient(
                target, initial=initial_coefficient, multiplier=multiplier
            )
        elif not isinstance(controller, SparsityCoefficient):
            raise TypeError(
                f"controller must be a SparsityCoefficient, got {type(controller).__name__}"
            )
        elif abs(controller.target_sparsity - target) > 1e-12:
            raise ValueError(
                f"controller targets sparsity {controller.target_sparsity}, this gate "
                f"1 - k/E = {target}"
            )
        self.controller = controller
        self.proj = nn.Linear(d_model, num_experts, bias=bias)

    def route(self, x: Tensor, token_ids: Tensor | None) -> Routing:
        gates = F.relu(router_logits(x, self.proj.weight.t(), self.proj.bias))  # [T, E]
        self.controller.observe_gates(gates)
        penalty = relu_l1_penalty(gates, self.k if self.load_balanced else None)
        aux = {"l1": self.controller.coefficient.to(penalty.dtype) * penalty}
        return Routing.from_dense(gates, aux=aux)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}, load_balanced={self.load_balanced}"


def relu_l1_penalty(gates: Tensor, k: int | None = None) -> Tensor:
    """ReMoE's L1 penalty of ReLU gates ``[T, E]`` (Wang, Chen & Zhu 2025).

    ``k=None``: ``(1/T) sum_x sum_e G(x)_e``. With ``k``: the load-balanced form
    ``(1/T) sum_x sum_e f_e G(x)_e``, ``f_e = E / (k T) * sum_x 1[G(x)_e > 0]`` (f is a
    count: no gradient flows through it). 0 for an empty batch.
    """
    num_tokens, num_experts = gates.shape
    if num_tokens == 0:
        return gates.sum() * 0.0
    if k is None:
        return gates.sum() / num_tokens
    active = (gates.detach() > 0).sum(dim=0).to(gates.dtype)  # [E]
    fraction = active * (num_experts / (k * num_tokens))
    return (gates * fraction).sum() / num_tokens

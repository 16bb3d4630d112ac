"""The MoE++ router: top-k over FFN and zero-computation experts, with gating residuals
(Jin et al. 2024, ICLR 2025)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from routelab._validate import require_bool, require_int
from routelab.losses import check_loss_weight, expert_load, load_balance_loss
from routelab.router import check_k, router_logits
from routelab.routers.topk import Selection, TokenChoiceRouter, TopKSelection

__all__ = ["MoEPlusPlusGate", "link_gating_residuals"]


class MoEPlusPlusGate(TokenChoiceRouter):
    """MoE++ gate (Jin, Zhu, Yuan & Yan 2024, "MoE++: Accelerating Mixture-of-Experts
    Methods with Zero-Computation Experts", ICLR 2025).

    E experts: the first ``E - num_null`` are FFN experts, the last ``num_null`` are
    zero-computation experts (zero / copy / constant; run them with
    ``routelab.null_experts.NullExperts``, whose ids follow the same layout).

    Formula for layer j (``x [T, d]``)::

        r^j = x W^j + r^{j-1} W_g^j                  [T, E], gating residual
        G(x) = softmax(KeepTopK(r^j, k))            [T, E], k non-zeros

    ``r^{j-1}`` are the previous MoE++ layer's router logits on the same tokens and
    ``W_g^j [E_{j-1}, E]`` a learned map (as in the authors' code, a bias-free linear
    layer); with ``residual_map=False`` the previous logits are added as they are (the
    two layers need the same E). A token may pick only null experts and skip the FFNs.
    The selection is the token-choice ``TopKSelection(k, softmax_after_topk=True)``
    (``routelab.routers.topk``).

    Gating residuals, the design: the gate of layer j is linked to the gate of layer j-1
    (``residual_from=`` at construction, ``link_residual``, or
    ``link_gating_residuals`` over a model's layers, which ``routelab.DeepMoE``
    calls) and reads that gate's ``last_logits`` (the ``[T, E]`` logits of its most
    recent forward, kept in the autograd graph so the residual's gradient reaches layer
    j-1, as in the paper). No signature changes: the model runs its layers in order as
    usual. A gate raises a clear error when the previous gate has not run on the same
    tokens since this gate's last forward (an eager check: under ``torch.compile`` the
    forward counter is left alone, since the compiler would recompile for every new
    count; compile the whole model, whose graph runs the layers in order).

    Loss (heterogeneous load balance): ``aux["balance"] = balance_weight * E *
    sum_i eta_i f_i P_i`` with ``eta_i = 1`` for FFN experts and ``tau`` for null
    experts (``routelab.losses.load_balance_loss`` of ``eta * probs``): tau < 1 lets
    more tokens go to the zero-computation experts. The z-loss of the base class is
    ``aux["z"]``. Logits in at least fp32.

    Args:
        d_model: d.
        num_experts: E, FFN and null experts together.
        k: experts per token, ``1 <= k <= E``.
        num_null: the number of null experts (the last ids), ``0 <= num_null < E``.
        tau: eta of the null experts in the balance loss, >= 0.
        balance_weight: >= 0 (absent from ``aux`` when 0).
        residual_from: the previous layer's MoEPlusPlusGate (None: no gating residual).
        residual_map: learn ``W_g`` (True) or add the previous logits unchanged.
        gating_residual: whether ``link_gating_residuals`` (which ``DeepMoE`` calls)
            links this gate to the previous layer's; ``residual_from`` links it anyway.
        bias: whether the router has a bias.
        z_weight: router z-loss coefficient >= 0.
    """

    expert_scale: Tensor

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        k: int = 2,
        num_null: int = 0,
        tau: float = 0.75,
        balance_weight: float = 1e-2,
        residual_from: MoEPlusPlusGate | None = None,
        residual_map: bool = True,
        gating_residual: bool = True,
        bias: bool = False,
        z_weight: float = 0.0,
    ) -> None:
        selection = TopKSelection(check_k(k, num_experts), softmax_after_topk=True)
        super().__init__(d_model, num_experts, selection, z_weight=z_weight)
        self.num_null = require_int("num_null", num_null, 0)
        if self.num_null >= num_experts:
            raise ValueError(
                f"num_null must be < num_experts = {num_experts} (at least one FFN expert), "
                f"got {num_null}"
            )
        self.tau = check_loss_weight("tau", tau)
        self.balance_weight = check_loss_weight("balance_weight", balance_weight)
        self.differentiable = self.k > 1 or self.balance_weight > 0 or self.z_weight > 0
        self.proj = nn.Linear(d_model, num_experts, bias=bias)
        self.use_residual_map = require_bool("residual_map", residual_map)
        self.gating_residual = require_bool("gating_residual", gating_residual)
        # a reference, not a submodule: the previous gate's parameters stay its own
        self._residual_from: tuple[MoEPlusPlusGate, ...] = ()
        self.residual_map: nn.Linear | None = None
        if residual_from is not None:
            self.link_residual(residual_from)
        scale = torch.ones(num_experts, dtype=torch.float64)
        scale[num_experts - self.num_null :] = self.tau
        self.register_buffer("expert_scale", scale, persistent=False)
        self.last_logits: Tensor | None = None
        self.forward_count = 0
        self._consumed = -1

    def link_residual(self, previous: MoEPlusPlusGate) -> None:
        """Take gating residuals from ``previous`` (the gate of the layer before this one);
        creates ``W_g`` (``residual_map``) when the gate has one. Call it before building
        the optimiser."""
        if not isinstance(previous, MoEPlusPlusGate):
            raise TypeError(
                f"residual_from must be a MoEPlusPlusGate, got {type(previous).__name__}"
            )
        if previous is self or self._residual_from:
            raise ValueError("this gate already has its residual source (or it is itself)")
        if not self.use_residual_map and previous.num_experts != self.num_experts:
            raise ValueError(
                "residual_map=False adds the previous logits as they are: it needs the "
                f"same num_experts, got {previous.num_experts} and {self.num_experts}"
            )
        self._residual_from = (previous,)
        if self.use_residual_map:
            weight = self.proj.weight
            self.residual_map = nn.Linear(
                previous.num_experts,
                self.num_experts,
                bias=False,
                device=weight.device,
                dtype=weight.dtype,
            )

    @property
    def residual_from(self) -> MoEPlusPlusGate | None:
        """The previous layer's gate whose logits are added, or None."""
        return self._residual_from[0] if self._residual_from else None

    def residual_logits(self, num_tokens: int) -> Tensor | None:
        """The previous gate's logits of the same forward pass ``[T, E_{j-1}]``, or None."""
        source = self.residual_from
        if source is None:
            return None
        logits = source.last_logits
        eager = not torch.compiler.is_compiling()  # the counter is eager-only (class doc)
        if logits is None or (eager and source.forward_count == self._consumed):
            raise RuntimeError(
                "gating residual: the previous MoE++ layer's gate (residual_from) has not run "
                "since this gate's last forward; run the layers in order on the same tokens"
            )
        if logits.shape[0] != num_tokens:
            raise ValueError(
                f"gating residual: the previous gate routed {logits.shape[0]} tokens, this "
                f"gate gets {num_tokens}"
            )
        if eager:
            self._consumed = source.forward_count
        return logits

    def logits(self, x: Tensor) -> Tensor:
        """``r^j = x W^j + r^{j-1} W_g^j`` ``[T, E]`` (at least fp32); kept as ``last_logits``."""
        logits = router_logits(x, self.proj.weight.t(), self.proj.bias)
        previous = self.residual_logits(x.shape[0])
        if previous is not None:
            if self.residual_map is not None:
                previous = router_logits(previous, self.residual_map.weight.t())
            logits = logits + previous.to(logits.dtype)
        self.last_logits = logits
        if not torch.compiler.is_compiling():
            self.forward_count += 1
        return logits

    def aux_losses(
        self, logits: Tensor, selection: Selection, sequence_length: int | None
    ) -> dict[str, Tensor]:
        aux = super().aux_losses(logits, selection, sequence_length)
        if self.balance_weight > 0:
            load = expert_load(selection.indices, self.num_experts)
            scaled = selection.probs * self.expert_scale.to(selection.probs.dtype)
            aux["balance"] = self.balance_weight * load_balance_loss(scaled, load)
        return aux

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_null={self.num_null}, tau={self.tau}, "
            f"gating_residual={self.residual_from is not None}"
        )


def link_gating_residuals(layers: Iterable[nn.Module]) -> int:
    """Link every MoE++ gate of consecutive layers to the gate of the layer before it.

    ``layers`` in model order: MoE layers (their ``router``) or gates. A gate is linked
    when the layer before it also has a ``MoEPlusPlusGate``, it has
    ``gating_residual=True`` and no source yet. Returns the number of links made.
    """
    previous: MoEPlusPlusGate | None = None
    linked = 0
    for layer in layers:
        gate = getattr(layer, "router", layer)
        if not isinstance(gate, MoEPlusPlusGate):
            previous = None
            continue
        if previous is not None and gate.gating_residual and gate.residual_from is None:
            gate.link_residual(previous)
            linked += 1
        previous = gate
    return linked

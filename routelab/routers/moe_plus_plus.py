"""The MoE++ router: top-k over FFN and zero-computation experts, with gating residuals
(Jin et al. 2024, ICLR 2025)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from routelab._validate import require_bool, require_int
from routelab.losses import check_loss_weight, load_balance_loss
from routelab.router import check_k, router_logits
from routelab.routers.topk import Selection, TokenChoiceRouter, TopKSelection

__all__ = ["MoEPlusPlusGate"]


class MoEPlusPlusGate(TokenChoiceRouter):
    """MoE++ gate (Jin, Zhu, Yuan & Yan 2024, "MoE++: Accelerating Mixture-of-Experts
    Methods with Zero-Computation Experts", ICLR 2025).

    E experts: the first ``E - num_null`` are FFN experts, the last ``num_null`` are
    zero-computation experts (zero / copy / constant; run them with
    :class:`routelab.null_experts.NullExperts`, whose ids follow the same layout).

    Formula for layer j (``x [T, d]``)::

        r^j = x W^j + r^{j-1} W_g^j                  [T, E], gating residual
        G(x) = softmax(KeepTopK(r^j, k))            [T, E], k non-zeros

    ``r^{j-1}`` are the previous MoE++ layer's router logits on the same tokens and
    ``W_g^j [E_{j-1}, E]`` a learned map (as in the authors' code, a bias-free linear
    layer); with ``residual_map=False`` the previous logits are added as they are (the
    two layers need the same E). A token may pick only null experts and skip the FFNs.
    The selection is the token-choice ``TopKSelection(k, softmax_after_topk=True)``
    (:mod:`routelab.routers.topk`).

    Gating residuals, the design: the gate of layer j is built with
    ``residual_from=<the gate of layer j-1>`` and reads that gate's ``last_logits`` (the
    ``[T, E]`` logits of its most recent forward, kept in the autograd graph so the
    residual's gradient reaches layer j-1, as in the paper). No signature changes: the
    model runs its layers in order as usual. A gate raises a clear error when the
    previous gate has not run on the same tokens since this gate's last forward.

    Loss (heterogeneous load balance): ``aux["balance"] = balance_weight * E *
    sum_i eta_i f_i P_i`` with ``eta_i = 1`` for FFN experts and ``tau`` for null
    experts (:func:`routelab.losses.load_balance_loss` of ``eta * probs``): tau < 1 lets
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
        bias: whether the router has a bias.
        z_weight: router z-loss coefficient >= 0.
    """

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
        if residual_from is not None and not isinstance(residual_from, MoEPlusPlusGate):
            raise TypeError(
                f"residual_from must be a MoEPlusPlusGate, got {type(residual_from).__name__}"
            )
        # a reference, not a submodule: the previous gate's parameters stay its own
        self._residual_from = (residual_from,) if residual_from is not None else ()
        self.residual_map: nn.Linear | None = None
        if residual_from is not None:
            if require_bool("residual_map", residual_map):
                self.residual_map = nn.Linear(residual_from.num_experts, num_experts, bias=False)
            elif residual_from.num_experts != num_experts:
                raise ValueError(
                    "residual_map=False adds the previous logits as they are: it needs the "
                    f"same num_experts, got {residual_from.num_experts} and {num_experts}"
                )
        scale = torch.ones(num_experts, dtype=torch.float64)
        scale[num_experts - self.num_null :] = self.tau
        self.register_buffer("expert_scale", scale, persistent=False)
        self.last_logits: Tensor | None = None
        self.forward_count = 0
        self._consumed = -1

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
        if logits is None or source.forward_count == self._consumed:
            raise RuntimeError(
                "gating residual: the previous MoE++ layer's gate (residual_from) has not run "
                "since this gate's last forward; run the layers in order on the same tokens"
            )
        if logits.shape[0] != num_tokens:
            raise ValueError(
                f"gating residual: the previous gate routed {logits.shape[0]} tokens, this "
                f"gate gets {num_tokens}"
            )
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
        self.forward_count += 1
        return logits

    def aux_losses(
        self, logits: Tensor, selection: Selection, sequence_length: int | None
    ) -> dict[str, Tensor]:
        aux = super().aux_losses(logits, selection, sequence_length)
        if self.balance_weight > 0:
            load = torch.bincount(selection.indices.reshape(-1), minlength=self.num_experts)
            scaled = selection.probs * self.expert_scale.to(selection.probs.dtype)
            aux["balance"] = self.balance_weight * load_balance_loss(scaled, load)
        return aux

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_null={self.num_null}, tau={self.tau}, "
            f"gating_residual={self.residual_from is not None}"
        )

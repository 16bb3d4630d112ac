"""Cosine routing in a low-dimensional space (X-MoE; Chi et al. 2022)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routelab._validate import require_bool, require_float, require_int
from routelab.losses import check_loss_weight, expert_load, load_balance_loss
from routelab.router import MIN_TEMPERATURE, check_k, router_logits, upcast_half
from routelab.routers.topk import Selection, TokenChoiceRouter, TopKSelection

__all__ = ["CosineTopKGate"]


class CosineTopKGate(TokenChoiceRouter):
    """Cosine top-k gate (Chi et al. 2022, "On the Representation Collapse of Sparse
    Mixture of Experts", X-MoE).

    Formula (``x [T, d]``, projection ``W [d, d_e]``, expert embeddings ``e [E, d_e]``)::

        h = x W                                          [T, d_e], d_e << d
        s_i(x) = cos(h, e_i) / tau = (h . e_i) / (|h| |e_i| tau)     [T, E]
        G(x) = softmax(KeepTopK(s(x), k))               [T, E], k non-zeros

    Routing by dot product with E expert embeddings pulls the token representations
    toward the E-dimensional span of those embeddings (representation collapse); X-MoE
    scores in a low dimension d_e and L2-normalises both sides, so the scores are
    bounded by ``1 / tau``. ``tau`` is learned (parametrised as ``log tau``), initialised to
    ``temperature`` and clamped below by ``min_temperature``. ``probs = softmax(s)``.
    The selection is the token-choice ``TopKSelection(k, softmax_after_topk=True)``
    (``routelab.routers.topk``); ``analysis.representation_collapse`` measures the
    collapse on routed representations.

    Losses (absent at weight 0): ``aux["balance"] = balance_weight * E * sum_i f_i P_i``
    over the top-k entries (``routelab.losses.load_balance_loss``) and the router
    z-loss ``aux["z"]`` of the base class.

    Args:
        d_model: d.
        num_experts: E.
        k: experts per token, ``1 <= k <= E``.
        d_proj: d_e, the routing dimension (X-MoE uses 16).
        temperature: the initial tau > 0 (X-MoE initialises it to 0.07).
        learn_temperature: whether tau is a parameter (else a fixed buffer).
        min_temperature: lower bound on tau (keeps the scores finite).
        balance_weight: >= 0.
        z_weight: >= 0.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        k: int = 2,
        d_proj: int = 16,
        temperature: float = 0.07,
        learn_temperature: bool = True,
        min_temperature: float = 0.01,
        balance_weight: float = 1e-2,
        z_weight: float = 0.0,
    ) -> None:
        selection = TopKSelection(check_k(k, num_experts), softmax_after_topk=True)
        super().__init__(d_model, num_experts, selection, z_weight=z_weight)
        self.d_proj = require_int("d_proj", d_proj, 1)
        self.min_temperature = require_float(
            "min_temperature", min_temperature, minimum=MIN_TEMPERATURE
        )
        temperature = require_float("temperature", temperature, minimum=self.min_temperature)
        self.balance_weight = check_loss_weight("balance_weight", balance_weight)
        self.differentiable = self.k > 1 or self.balance_weight > 0 or self.z_weight > 0
        self.proj = nn.Parameter(torch.empty(d_model, self.d_proj))
        nn.init.normal_(self.proj, std=d_model**-0.5)
        self.expert_embeddings = nn.Parameter(torch.empty(num_experts, self.d_proj))
        nn.init.orthogonal_(self.expert_embeddings)
        log_tau = torch.tensor(math.log(temperature))
        if require_bool("learn_temperature", learn_temperature):
            self.log_temperature = nn.Parameter(log_tau)
        else:
            self.register_buffer("log_temperature", log_tau)

    @property
    def temperature(self) -> Tensor:
        """tau, clamped below by ``min_temperature`` (a scalar tensor, at least fp32)."""
        return upcast_half(self.log_temperature).exp().clamp(min=self.min_temperature)

    def logits(self, x: Tensor) -> Tensor:
        """``s(x) = cos(x W, e) / tau`` ``[T, E]`` in at least fp32."""
        h = F.normalize(router_logits(x, self.proj), dim=-1)  # [T, d_e]
        e = F.normalize(upcast_half(self.expert_embeddings).to(h.dtype), dim=-1)
        return (h @ e.t()) / self.temperature.to(h.dtype)

    def aux_losses(
        self, logits: Tensor, selection: Selection, sequence_length: int | None
    ) -> dict[str, Tensor]:
        aux = super().aux_losses(logits, selection, sequence_length)
        if self.balance_weight > 0:
            load = expert_load(selection.indices, self.num_experts)
            aux["balance"] = self.balance_weight * load_balance_loss(selection.probs, load)
        return aux

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, d_proj={self.d_proj}, balance_weight={self.balance_weight}"

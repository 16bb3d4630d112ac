"""Soft MoE: every expert processes weighted averages of the tokens (Puigcerver et al. 2024).

Soft MoE is a layer, not a token-to-expert assignment: each of the E experts owns p
slots, every slot is a convex combination of all tokens of a group (sequence or
image), and every token's output a convex combination of all slot outputs. Nothing
is dropped and every expert processes exactly p slots, so the layer is balanced by
construction. The slots run through the same expert engine as token routing
(``FFNExperts``) via a slot-to-expert ``routelab.Routing``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routelab._validate import require_bool, require_int
from routelab.experts import Experts
from routelab.router import upcast_half
from routelab.routing import Routing

__all__ = ["SoftMoE", "SoftMoEOutput"]


class SoftMoEOutput(NamedTuple):
    """What a ``SoftMoE`` forward returns.

    Fields (G groups of S tokens, E experts with p slots each, n = E * p):
        output: ``[..., S, d]``, the input's shape.
        routing: the token-level view for the analysis tools: a dense Routing over the
            ``T = G * S`` tokens whose weight for (t, e) is the combine mass
            ``sum over e's slots s of C[t, s]`` (each token's weights sum to 1); ``probs``
            is the same ``[T, E]`` matrix. Every token reaches every expert.
        dispatch: D ``[G, S, E, p]``, softmax over the S tokens of each slot's logits: the
            weight of token t in slot s's input (each slot's column sums to 1).
        combine: C ``[G, S, E, p]``, softmax over the n slots of each token's logits.
        slot_routing: the slot-to-expert Routing the experts ran (``G * n`` slots, slot
            ``g * n + e * p + j`` is slot j of expert e in group g, weight 1).
    """

    output: Tensor
    routing: Routing
    dispatch: Tensor
    combine: Tensor
    slot_routing: Routing

    @property
    def aux_loss(self) -> Tensor:
        """Soft MoE needs no auxiliary loss: a zero scalar (for uniform training loops)."""
        return self.routing.aux_loss


class SoftMoE(nn.Module):
    """Soft MoE layer (Puigcerver, Riquelme, Mustafa & Houlsby 2024, "From Sparse to
    Soft Mixtures of Experts", ICLR 2024).

    Formula for one group ``X [S, d]`` (Phi ``[d, n]``, n = E * p slots)::

        L = scale * l2norm(X, rows) @ l2norm(Phi, columns)    [S, n]   (normalize=True)
        L = X Phi                                             [S, n]   (normalize=False)
        D = softmax over tokens (dim 0) of L                  [S, n]   dispatch weights
        C = softmax over slots (dim 1) of L                   [S, n]   combine weights
        X~ = D^T X                                            [n, d]   slot inputs
        Y~_s = f_{expert(s)}(X~_s),  expert(s) = s // p       [n, d]   each expert its p slots
        Y = C Y~                                              [S, d]

    The paper's normalisation (l2-normalised inputs and Phi with a learned scalar
    ``scale``, initialised to 1) keeps the logits from growing with d. The experts run
    through ``experts`` (an ``routelab.experts.Experts`` executor over E experts,
    e.g. ``FFNExperts``) on the ``G * n`` slot rows with a slot-to-expert Routing; the
    dispatch and combine weights come back in ``SoftMoEOutput`` for
    ``analysis.soft_moe_stats`` (slot mass per expert, specialisation over tokens).

    Groups: ``x [S, d]`` is one group; ``x [..., S, d]`` has one group per leading index
    (a sequence or an image): tokens mix only within their group. With ``group_size`` g
    the T tokens of ``x [..., d]`` are instead taken in consecutive groups of g, for
    flattened batches; a last, incomplete group is padded with masked positions (zero
    dispatch and combine weight, no output), which come last in ``dispatch`` and
    ``combine``.

    Limitation (causal masking): every slot averages over all S tokens of its group,
    so a token's output depends on every other token of the group, the later ones
    included. Soft MoE therefore cannot be used as is in a causal (autoregressive)
    decoder, and a group's output depends on what else is in it; use groups that may
    see each other (an encoder, an image, or one token per group).

    Args:
        d_model: d.
        num_experts: E.
        experts: the executor over E experts (d -> d).
        slots_per_expert: p >= 1.
        normalize: the paper's l2 normalisation with a learned scale (else ``X Phi``).
        group_size: tokens per group for flattened inputs (None: the layout of ``x``).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        experts: Experts,
        *,
        slots_per_expert: int = 1,
        normalize: bool = True,
        group_size: int | None = None,
    ) -> None:
        super().__init__()
        self.d_model = require_int("d_model", d_model, 1)
        self.num_experts = require_int("num_experts", num_experts, 1)
        self.slots_per_expert = require_int("slots_per_expert", slots_per_expert, 1)
        self.normalize = require_bool("normalize", normalize)
        self.group_size = None if group_size is None else require_int("group_size", group_size, 1)
        if not isinstance(experts, nn.Module) or not hasattr(experts, "num_experts"):
            raise TypeError(f"experts must be an Experts executor, got {type(experts).__name__}")
        if experts.num_experts != num_experts:
            raise ValueError(
                f"experts has {experts.num_experts} experts, expected num_experts = {num_experts}"
            )
        self.experts = experts
        num_slots = num_experts * self.slots_per_expert
        self.phi = nn.Parameter(torch.randn(d_model, num_slots) * d_model**-0.5)
        self.scale = nn.Parameter(torch.ones(())) if self.normalize else None

    @property
    def num_slots(self) -> int:
        """n = E * p."""
        return self.num_experts * self.slots_per_expert

    def slot_logits(self, x: Tensor) -> Tensor:
        """``L [G, S, n]`` of grouped tokens ``x [G, S, d]``, in at least fp32."""
        x = upcast_half(x)
        phi = upcast_half(self.phi).to(x.dtype)
        if not self.normalize:
            return x @ phi
        assert self.scale is not None
        logits = F.normalize(x, dim=-1) @ F.normalize(phi, dim=0)
        return upcast_half(self.scale).to(x.dtype) * logits

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> SoftMoEOutput:
        """``x [S, d]`` or ``[..., S, d]`` -> ``SoftMoEOutput`` (output in x's shape).

        ``token_ids`` is accepted and ignored, so that the layer drops in where an
        ``routelab.MoE`` is called.
        """
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating torch.Tensor, got {type(x).__name__}")
        if x.dim() < 2 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"x must be [..., S, d_model] = [..., S, {self.d_model}], got {tuple(x.shape)}"
            )
        d = x.shape[-1]
        total = x.numel() // d
        if self.group_size is not None:
            num_tokens = self.group_size
            groups = -(-total // num_tokens)
            padding = groups * num_tokens - total  # the last group's missing tokens
            flat = x.reshape(total, d)
            if padding:
                flat = torch.cat([flat, flat.new_zeros(padding, d)])
            grouped = flat.view(groups, num_tokens, d)  # [G, S, d]
        else:
            num_tokens, groups, padding = x.shape[-2], math.prod(x.shape[:-2]), 0
            grouped = x.reshape(groups, num_tokens, d)  # [G, S, d]
        n, p = self.num_slots, self.slots_per_expert
        logits = self.slot_logits(grouped)  # [G, S, n]
        valid = torch.ones(groups * num_tokens, dtype=torch.bool, device=x.device)
        if padding:
            valid[total:] = False
        valid = valid.view(groups, num_tokens, 1)
        dispatch = torch.softmax(logits.masked_fill(~valid, float("-inf")), dim=1)
        combine = torch.softmax(logits, dim=2) * valid
        slots = dispatch.transpose(1, 2).to(x.dtype) @ grouped  # [G, n, d]
        slot_ids = torch.arange(groups * n, device=x.device)
        slot_routing = Routing(
            token=slot_ids,
            expert=slot_ids.remainder(n).div(p, rounding_mode="floor"),
            weight=x.new_ones(groups * n),
            num_tokens=groups * n,
            num_experts=self.num_experts,
        )
        slot_out = self.experts(slots.reshape(groups * n, d), slot_routing)  # [G * n, d]
        y = combine.to(x.dtype) @ slot_out.reshape(groups, n, d)  # [G, S, d]
        shape = (groups, num_tokens, self.num_experts, p)
        mass = combine.reshape(shape).sum(-1).reshape(groups * num_tokens, self.num_experts)
        routing = Routing.from_dense(mass[:total], probs=mass[:total], keep_zeros=True)
        return SoftMoEOutput(
            y.reshape(groups * num_tokens, d)[:total].reshape(x.shape),
            routing,
            dispatch.reshape(shape),
            combine.reshape(shape),
            slot_routing,
        )

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, "
            f"slots_per_expert={self.slots_per_expert}, normalize={self.normalize}"
        )

"""The base class of every router, and the input checks they share."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from routelab._validate import (
    all_finite,
    require_int,
    set_validation,
    validation,
    validation_enabled,
)
from routelab.routing import Routing

__all__ = [
    "MIN_TEMPERATURE",
    "Router",
    "check_router_input",
    "check_sequence_length",
    "router_logits",
    "set_validation",
    "validation",
    "validation_enabled",
]


def check_router_input(
    x: object, d_model: int, token_ids: object = None, *, need_token_ids: bool = False
) -> None:
    """Validate a router's ``x [T, d]`` and ``token_ids int64 [T]``; raise a clear error."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be [T, d_model] = [T, {d_model}], got shape {tuple(x.shape)}")
    if x.shape[1] != d_model:
        raise ValueError(f"x has last dimension {x.shape[1]}, expected d_model = {d_model}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor, got {x.dtype}")
    if token_ids is None:
        if need_token_ids:
            raise ValueError(
                "token_ids is required by this router (it routes by token id); "
                "pass token_ids=int64 [T] to forward / MoE"
            )
    else:
        if not isinstance(token_ids, Tensor):
            raise TypeError(f"token_ids must be a torch.Tensor, got {type(token_ids).__name__}")
        if token_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"token_ids must be an integer tensor (int64), got {token_ids.dtype}")
        if tuple(token_ids.shape) != (x.shape[0],):
            raise ValueError(
                f"token_ids must have shape [T] = [{x.shape[0]}], got {tuple(token_ids.shape)}"
            )
        if token_ids.device != x.device:
            raise ValueError(f"token_ids is on {token_ids.device} but x is on {x.device}")
    if validation_enabled() and not all_finite(x):
        raise ValueError("x contains NaN or inf (disable with routelab.validation(False))")


class Router(nn.Module):
    """Base class of every router: ``forward(x [T, d], token_ids [T] | None) -> Routing``.

    Subclasses implement :meth:`route` and get input validation for free. Class flags
    tell the test kit and the MoE layer what to expect:

    - ``differentiable``: gradients reach the router's parameters through the routing
      weights or aux losses (False for hash routers).
    - ``requires_token_ids``: the router routes by token id (hash routers).
    - ``stochastic_in_training``: training-mode routing draws random numbers (noise,
      jitter); seeded runs must still repeat exactly.
    - ``uses_sequence_layout``: the router needs the sequence layout of its tokens (the
      sequence-wise balance loss). Then ``forward``'s ``sequence_length`` reaches
      ``route(x, token_ids, sequence_length=S)``; every other router's
      ``route(x, token_ids)`` never sees it.

    Sequence layout (the one way a router learns sequence boundaries): the tokens of
    ``x [T, d]`` are ``B = T / S`` sequences of ``sequence_length`` S in sequence-major
    order (token ``b * S + j`` is position j of sequence b), the flattening of
    ``x [B, S, d]``. ``MoE`` passes ``sequence_length = x.shape[-2]`` for inputs with 3 or
    more dimensions to routers with ``uses_sequence_layout``; None (2-D input, or a
    direct call without it) means the batch is one sequence.
    """

    differentiable: bool = True
    requires_token_ids: bool = False
    stochastic_in_training: bool = False
    uses_sequence_layout: ClassVar[bool] = False

    def __init__(self, d_model: int, num_experts: int) -> None:
        super().__init__()
        self.d_model = require_int("d_model", d_model, 1)
        self.num_experts = require_int("num_experts", num_experts, 1)

    def forward(
        self, x: Tensor, token_ids: Tensor | None = None, *, sequence_length: int | None = None
    ) -> Routing:
        check_router_input(x, self.d_model, token_ids, need_token_ids=self.requires_token_ids)
        if token_ids is not None:
            token_ids = token_ids.long()
        if sequence_length is not None:
            sequence_length = check_sequence_length(sequence_length, x.shape[0])
        if self.uses_sequence_layout:
            return self.route(x, token_ids, sequence_length=sequence_length)  # type: ignore[call-arg]
        return self.route(x, token_ids)

    def route(self, x: Tensor, token_ids: Tensor | None) -> Routing:
        """Compute the routing for validated input ``x [T, d]``."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}"


#: The smallest softmax temperature (and DSelect-k smooth-step width) routers accept: below
#: it a softmax of fp32 logits is an argmax at fp32 resolution, and ``logits / tau`` or
#: ``t^3 / gamma^3`` come close to overflowing. Values below are refused as mistakes.
MIN_TEMPERATURE = 1e-6


def upcast_half(t: Tensor) -> Tensor:
    """Router arithmetic in at least fp32: half-precision tensors are upcast, fp64 is kept."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def router_logits(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x W (+ b)`` with fp32 operands (fp64 kept): every router's logits, ``[T, E]``.

    ``x [T, d]``; ``weight`` is ``[d, E]`` (a parameter laid out input-major) and ``bias``
    ``[E]`` or None. For an ``nn.Linear`` pass ``linear.weight.t()`` and ``linear.bias``.

    The product is computed in ``promote(fp32, x.dtype, weight.dtype)``: half-precision
    inputs into an fp32 router are upcast before the matmul (as autocast does for
    Switch's router), so bf16/fp16 ``x`` selects the same experts as the fp32
    computation on the same values and fp16 cannot overflow to inf in the logits.
    Gradients flow back to ``x`` in its own dtype.
    """
    if not x.is_floating_point() or not weight.is_floating_point():
        raise TypeError(
            f"router_logits needs floating x and weight, got {x.dtype} and {weight.dtype}"
        )
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[0]:
        raise ValueError(
            f"router_logits needs x [T, d] and weight [d, E], got {tuple(x.shape)} and "
            f"{tuple(weight.shape)} (for an nn.Linear pass linear.weight.t())"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[1],):
        raise ValueError(f"bias must be [E] = [{weight.shape[1]}], got {tuple(bias.shape)}")
    dtype = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)
    with torch.autocast(device_type=x.device.type, enabled=False):
        logits = x.to(dtype) @ weight.to(dtype)
        if bias is not None:
            logits = logits + bias.to(dtype)
    return logits


def check_sequence_length(sequence_length: object, num_tokens: int) -> int:
    """Validate a sequence layout: ``sequence_length`` S >= 1 dividing T (any S for T = 0)."""
    length = require_int("sequence_length", sequence_length, 1)
    if num_tokens % length:
        raise ValueError(
            f"sequence_length = {length} must divide the number of tokens T = {num_tokens}"
        )
    return length


def check_k(k: object, num_experts: int) -> int:
    """Validate the number of experts per token: ``1 <= k <= num_experts``."""
    k = require_int("k", k, 1)
    if k > num_experts:
        raise ValueError(f"k must be <= num_experts = {num_experts}, got k = {k}")
    return k

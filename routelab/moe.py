"""The MoE layer: router -> policies -> experts, for inputs of any leading shape."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from routelab._validate import require_bool, require_int
from routelab.experts import Experts, FFNExperts
from routelab.policies import policy_list
from routelab.replay import run_router
from routelab.router import Router, router_logits
from routelab.routing import Routing

__all__ = ["MoE", "MoEOutput", "SharedExperts", "flatten_tokens", "sequence_length_of"]


class MoEOutput(NamedTuple):
    """``output`` in the input's shape ``[..., d]``; ``routing`` over the flattened tokens."""

    output: Tensor
    routing: Routing

    @property
    def aux_loss(self) -> Tensor:
        """The routing's summed auxiliary losses, to add to the task loss."""
        return self.routing.aux_loss


class MoE(nn.Module):
    """A Mixture-of-Experts layer: ``y = sum over routed experts e of G(x)_e * E_e(x)``
    (``+ shared(x)`` with shared experts).

    Pipeline: ``x [..., d] -> [T, d] -> router -> Routing -> policies -> experts ->
    y [T, d] -> [..., d]`` (Shazeer et al. 2017, with the router, the capacity and
    balancing policies and the expert executor each pluggable).

    Sequence layout: for ``x [..., S, d]`` (3 or more dimensions) the router gets
    ``sequence_length = S`` when it declares ``uses_sequence_layout`` (the flattened
    tokens are sequence-major, token ``b * S + j`` = position j of sequence b); other
    routers are called as ``router(x [T, d], token_ids)``. See ``routelab.Router``.

    Router replay: inside ``routelab.replay.RouterReplay.record`` / ``replay`` the
    router's routing is recorded / replayed (``routelab.replay``).

    Args:
        router: a ``routelab.Router`` with ``num_experts`` E.
        experts: a ``routelab.experts.Experts`` executor over the same E experts.
        policies: ``Routing -> Routing`` transforms applied in order (capacity, balancing).
        shared_experts: an always-on module ``[T, d] -> [T, d]`` whose output is added to
            the routed output (DeepSeekMoE; ``SharedExperts``), or None.
    """

    supports_router_replay: ClassVar[bool] = True

    def __init__(
        self,
        router: Router,
        experts: Experts,
        policies: Sequence[nn.Module] = (),
        *,
        shared_experts: nn.Module | None = None,
    ) -> None:
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
        router_width = getattr(router, "d_model", None)
        experts_width = getattr(experts, "d_model", None)
        if router_width is not None and experts_width is not None and router_width != experts_width:
            raise ValueError(
                f"router has d_model = {router_width} but experts has d_model = {experts_width}"
            )
        self.router = router
        self.experts = experts
        self.policies = policy_list(policies)
        self.shared_experts = check_shared_experts(shared_experts, router)
        self._router_replay = None

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> MoEOutput:
        """``x [..., d]`` (and ``token_ids [...]``) -> ``MoEOutput(output [..., d], routing)``."""
        flat_x, flat_ids, leading = flatten_tokens(x, token_ids)
        routing = run_router(
            self, self.router, flat_x, flat_ids, sequence_length=sequence_length_of(x)
        )
        for policy in self.policies:
            routing = policy(routing)
        y = self.experts(flat_x, routing)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat_x)
        return MoEOutput(y.reshape(*leading, y.shape[-1]), routing)


class SharedExperts(nn.Module):
    """Always-on shared experts (DeepSeekMoE, Dai et al. 2024), optionally gated as in
    Qwen2-MoE, added to the routed output by ``MoE(..., shared_experts=...)``.

    Formula (``x [T, d]``)::

        shared(x) = g(x) * sum_{j=1..n} FFN_j(x)                   [T, d]
        g(x) = sigmoid(x w_g)  [T, 1]  if gated, else 1             (Qwen2-MoE)

    The n FFNs of hidden size h are stored as one FFN of hidden size ``n * h`` (a sum of
    FFNs is the FFN over their concatenated hidden units; DeepSeek-V3 builds its shared
    expert so): ``ffn`` is an ``FFNExperts(1, d, n * h)``; with ``bias`` its one output
    bias is the sum of the n. ``w_g`` is computed with fp32 operands like a router.
    Under ``ExpertParallelMoE`` shared experts are replicated on every rank (their
    gradients are those of the replicated parameters).

    Args:
        d_model: d.
        d_hidden: h, each shared expert's hidden size.
        num_experts: n >= 1 shared experts.
        activation: as ``FFNExperts`` (``"relu"``, ``"gelu"``, ``"silu"``, ``"swiglu"``).
        bias: biases in the FFN projections.
        gated: multiply by ``sigmoid(x w_g)`` (Qwen2-MoE's shared-expert gate).
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        *,
        num_experts: int = 1,
        activation: str = "relu",
        bias: bool = False,
        gated: bool = False,
    ) -> None:
        super().__init__()
        self.d_model = require_int("d_model", d_model, 1)
        self.d_hidden = require_int("d_hidden", d_hidden, 1)
        self.num_experts = require_int("num_experts", num_experts, 1)
        self.ffn = FFNExperts(
            1, d_model, self.num_experts * self.d_hidden, activation=activation, bias=bias
        )
        self.gate = nn.Linear(d_model, 1, bias=False) if require_bool("gated", gated) else None

    def forward(self, x: Tensor) -> Tensor:
        """``x [T, d] -> shared(x) [T, d]``."""
        y = self.ffn.expert_forward(0, x)
        if self.gate is not None:
            y = torch.sigmoid(router_logits(x, self.gate.weight.t())).to(y.dtype) * y
        return y

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_hidden={self.d_hidden}, num_experts={self.num_experts}, "
            f"gated={self.gate is not None}"
        )


def check_shared_experts(shared_experts: object, router: Router) -> nn.Module | None:
    """Validate ``MoE``'s ``shared_experts`` option: None or an ``nn.Module`` (of the
    router's ``d_model`` where it declares one)."""
    if shared_experts is None:
        return None
    if not isinstance(shared_experts, nn.Module):
        raise TypeError(
            f"shared_experts must be an nn.Module [T, d] -> [T, d] (e.g. SharedExperts), "
            f"got {type(shared_experts).__name__}"
        )
    width = getattr(shared_experts, "d_model", None)
    if width is not None and width != getattr(router, "d_model", width):
        raise ValueError(
            f"shared_experts has d_model = {width} but the router has {router.d_model}"
        )
    return shared_experts


def sequence_length_of(x: Tensor) -> int | None:
    """The sequence layout of ``x [..., S, d]``: S for 3 or more dimensions (and S > 0),
    else None."""
    return int(x.shape[-2]) if x.dim() >= 3 and x.shape[-2] > 0 else None


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

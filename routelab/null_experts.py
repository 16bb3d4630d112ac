"""Zero-computation experts beside FFN experts (MoE++; Jin et al. 2024, ICLR 2025).

``NullExperts`` wraps any expert executor (``FFNExperts``, ``ModuleExperts``)
over ``E_ffn`` experts and adds the three zero-computation experts of MoE++ after them::

    ids [0, E_ffn)                     the wrapped FFN experts
    next num_zero ids    zero expert:      E(x) = 0          (discard: the token skips)
    next num_copy ids    copy expert:      E(x) = x          (skip the layer)
    next num_constant    constant expert:  E(x) = a_1 x + a_2 v,  [a_1, a_2] = softmax(x W_c)
                                            (replace x by a learned vector v; W_c [d, 2])

``forward(x [T, d], routing)`` over all ``E = E_ffn + num_zero + num_copy +
num_constant`` experts: the FFN entries are selected first and only they reach the
wrapped executor (its public ``forward`` on a Routing over ``E_ffn`` experts), so a
token routed to null experts costs no FFN compute. The copy and constant entries are
folded per token into ``c_t * x_t + sum_c m_tc v_c`` (a scale ``c [T]`` and a ``[T, C]``
mixing matrix): O(T d) work however many null entries, no gathered ``[N, d]`` rows;
zero entries cost nothing. ``benchmarks/null_experts.py``
measures it. MoE++ routes with ``routelab.routers.MoEPlusPlusGate``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from routelab._validate import require_int
from routelab.experts import Experts, ExpertSegments
from routelab.routing import Routing

__all__ = ["NULL_KINDS", "NullExperts"]

NULL_KINDS = ("zero", "copy", "constant")


class NullExperts(Experts):
    """An expert executor with zero, copy and constant experts after ``experts``' E_ffn.

    ``y_t = sum over entries n of t: weight_n * E_{expert_n}(x_t)`` with the null experts of
    the module docstring; gradients reach x, the routing weights, the wrapped experts, the
    constant vectors ``constant [C, d]`` and their mixing weights ``constant_gate [C, d, 2]``.

    Args:
        experts: the FFN experts (any executor with ``num_experts`` and ``d_model``).
        num_zero: zero experts (>= 0).
        num_copy: copy experts (>= 0).
        num_constant: constant experts (>= 0; need the model width d).
        d_model: d (default: ``experts.d_model``; ModuleExperts has none).
    """

    def __init__(
        self,
        experts: Experts,
        *,
        num_zero: int = 1,
        num_copy: int = 1,
        num_constant: int = 1,
        d_model: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(experts, nn.Module) or not hasattr(experts, "num_experts"):
            raise TypeError(f"experts must be an Experts executor, got {type(experts).__name__}")
        self.experts = experts
        self.num_ffn = int(experts.num_experts)
        counts = {
            "zero": require_int("num_zero", num_zero, 0),
            "copy": require_int("num_copy", num_copy, 0),
            "constant": require_int("num_constant", num_constant, 0),
        }
        self.null_counts = counts
        self.num_experts = self.num_ffn + sum(counts.values())
        self.d_model = getattr(experts, "d_model", None) if d_model is None else d_model
        if self.d_model is not None:
            require_int("d_model", self.d_model, 1)
        if counts["constant"] and self.d_model is None:
            raise ValueError("constant experts need d_model (give d_model= for ModuleExperts)")
        width = self.d_model or 0
        self.constant = nn.Parameter(torch.randn(counts["constant"], width))
        self.constant_gate = nn.Parameter(torch.randn(counts["constant"], width, 2) * width**-0.5)

    def kind_range(self, kind: str) -> range:
        """The expert ids of one null-expert kind (``"zero"``, ``"copy"``, ``"constant"``)."""
        if kind not in NULL_KINDS:
            raise ValueError(f"kind must be one of {NULL_KINDS}, got {kind!r}")
        start = self.num_ffn
        for name in NULL_KINDS:
            if name == kind:
                return range(start, start + self.null_counts[name])
            start += self.null_counts[name]
        raise AssertionError("unreachable")

    @property
    def null_expert_ids(self) -> range:
        """Every null expert id, ``[E_ffn, E)`` (no FFN compute: ``analysis.load_stats``'s
        ``null_experts``)."""
        return range(self.num_ffn, self.num_experts)

    def ffn_routing(self, routing: Routing) -> Routing:
        """The FFN entries of ``routing`` as a Routing over the E_ffn wrapped experts."""
        keep = routing.expert < self.num_ffn
        return Routing(
            routing.token[keep],
            routing.expert[keep],
            routing.weight[keep],
            routing.num_tokens,
            self.num_ffn,
        )

    def forward(self, x: Tensor, routing: Routing) -> Tensor:
        self.check_call(x, routing)
        y = self.experts(x, self.ffn_routing(routing))
        copy_ids, constant_ids = self.kind_range("copy"), self.kind_range("constant")
        expert, dtype = routing.expert, x.dtype
        # Per token, the null entries add  c_t * x_t + sum_c m_tc * v_c : no [N, d] rows.
        scale = x.new_zeros(x.shape[0])  # c_t, the copy and constant experts' share of x_t
        if len(copy_ids):
            hit = (expert >= copy_ids.start) & (expert < copy_ids.stop)
            scale = scale.index_add(0, routing.token[hit], routing.weight[hit].to(dtype))
        if len(constant_ids):
            hit = (expert >= constant_ids.start) & (expert < constant_ids.stop)
            token, weight = routing.token[hit], routing.weight[hit].to(dtype)
            which = expert[hit] - constant_ids.start  # [n] constant expert index
            count = len(constant_ids)
            mix = torch.softmax(self.mixing_logits(x)[token, which], dim=-1)  # [n, 2]: a_1, a_2
            scale = scale.index_add(0, token, weight * mix[:, 0])
            vector = x.new_zeros(x.shape[0] * count)  # m_tc [T, C]
            vector = vector.index_add(0, token * count + which, weight * mix[:, 1])
            y = y + vector.view(-1, count) @ self.constant.to(dtype)
        if len(copy_ids) or len(constant_ids):
            y = y + scale[:, None] * x
        return y

    def mixing_logits(self, rows: Tensor) -> Tensor:
        """``rows W_c`` of every constant expert c: ``[n, C, 2]`` for ``rows [n, d]``."""
        gates = self.constant_gate.to(rows.dtype)  # [C, d, 2]
        flat = gates.permute(1, 0, 2).reshape(rows.shape[1], -1)  # [d, C * 2]
        return (rows @ flat).view(rows.shape[0], gates.shape[0], 2)

    def run_sorted(self, xs: Tensor, counts: ExpertSegments | Tensor | Sequence[int]) -> Tensor:
        """Rows in expert order -> each row's expert output, unweighted (the executor
        protocol of ``routelab.experts.Experts``): the FFN rows (they come first) through
        the wrapped executor's ``run_sorted``, then 0, the row itself, or ``a_1 x + a_2 v``."""
        segments = counts if isinstance(counts, ExpertSegments) else ExpertSegments(counts)
        sizes = segments.sizes()
        if len(sizes) != self.num_experts or sum(sizes) != xs.shape[0]:
            raise ValueError(
                f"counts must be {self.num_experts} segment sizes summing to {xs.shape[0]}"
            )
        ffn_rows = sum(sizes[: self.num_ffn])
        parts = [self.experts.run_sorted(xs[:ffn_rows], sizes[: self.num_ffn])]
        rows = torch.split(xs[ffn_rows:], sizes[self.num_ffn :])
        copy_ids, constant_ids = self.kind_range("copy"), self.kind_range("constant")
        for expert, part in zip(self.null_expert_ids, rows):
            if expert in copy_ids:
                parts.append(part)
            elif expert in constant_ids:
                c = expert - constant_ids.start
                mix = torch.softmax(self.mixing_logits(part)[:, c], dim=-1)  # [n, 2]
                parts.append(mix[:, :1] * part + mix[:, 1:] * self.constant[c].to(part.dtype))
            else:  # zero
                parts.append(part * 0.0)
        return torch.cat(parts)

    def extra_repr(self) -> str:
        counts = ", ".join(f"num_{k}={v}" for k, v in self.null_counts.items())
        return f"num_ffn={self.num_ffn}, {counts}"
